"""The check's steps, in the order they run: the most important first, so that a budget cut drops the least.

environment → small_data → phantom_model → correctness → clinical_data (prepared in the background since the
start) → memory → training_speed → inference → training_speed_compile → step_profile → step_variants (the
last two: benchmarks/gpu_check/speed.py).
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path
from typing import Sequence

from benchmarks.gpu_check import data, speed
from benchmarks.gpu_check.packing import PACK_SUFFIX, pack_nifti, unpack_nifti
from benchmarks.gpu_check.runner import REPOSITORY, RESERVE_S, Report, StepSkipped, StepTimeout, python_command
from benchmarks.gpu_check.scale import Scale

WORKERS = "benchmarks.gpu_check.workers"
CUDA_TESTS = REPOSITORY / "tests" / "test_cuda.py"
# What tests/test_cuda.py reads (defined there, repeated here as plain strings to keep torch out of this process).
TESTS_DEVICE_VARIABLE = "COVNET_CUDA_TESTS_DEVICE"
TESTS_WORKSPACE_VARIABLE = "COVNET_GPU_CHECK_WORKSPACE"
TRAINING_SPEED_GOAL_S = 45.0       # per 250 iterations on an H100 (nnU-Net v1 on an A100: 41-47 s)
DATA_WAIT_GOAL = 0.10
MEMORY_ERROR_GOAL = 0.15
TTA_NETWORK_GOAL_S = 10.0


def training_history(checkpoint: Path) -> dict:
    from covnet.checkpoint import Checkpoint

    return Checkpoint.load(checkpoint).history


# What the dry run does in place of each step's CUDA path.
DRY_RUN_EXERCISES = {
    "environment": "no wheels to install unless --wheels is given; the CPU is the device",
    "small_data": "a tiny network replaces the planned one (hand edit of plans.json)",
    "phantom_model": "a few iterations of the tiny network on the CPU",
    "correctness": f"{TESTS_DEVICE_VARIABLE}=cpu: every CUDA test runs on the CPU (no autocast, gloo for nccl, "
                   "--compile is a no-op there)",
    "clinical_data": "small phantoms stand in for clinical ones",
    "memory": "CPU: float32 step, resident-set peak against covnet's float32 model",
    "training_speed": "the tiny network on the CPU",
    "inference": "a small test phantom stands in for the CT, packed and unpacked as the CT is",
    "training_speed_compile": "the tiny network on the CPU, where --compile is a no-op",
    "step_profile": "the tiny network on an 8x16x16 patch on the CPU: no device times or CUDA sync counts",
    "step_variants": "the tiny network on an 8x16x16 patch on the CPU, 1 warm-up + 1 timed iteration per variant; "
                     "CUDA-only ones run their code where they can (compiled: dynamo with backend='eager')",
}


class Check:
    def __init__(self, report: Report, scale: Scale, work: Path, *, wheels: Path | None, ct: Path | None,
                 dry_run: bool, skip: Sequence[str] = ()):
        self.report, self.scale, self.work, self.wheels, self.ct = report, scale, work, wheels, ct
        self.dry_run, self.skip = dry_run, set(skip)
        self.device = scale.device
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
        self._set_python_path(REPOSITORY)
        self.small = work / "small"
        self.clinical = work / "clinical"
        self.cannot_run = ""            # why the environment cannot run any step

    def _set_python_path(self, *folders: Path) -> None:
        existing = [part for part in self.env.get("PYTHONPATH", "").split(os.pathsep) if part]
        self.env["PYTHONPATH"] = os.pathsep.join([*map(str, folders), *existing])
        for folder in reversed(folders):
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))

    def command(self, argv, **kwargs):
        return self.report.command(argv, env=self.env, **kwargs)

    def step(self, name: str, body, estimate_s: float | None = None) -> bool:
        exercised = DRY_RUN_EXERCISES[name] if self.dry_run else f"{self.device}: the real path"
        if name in self.skip:
            body = self._skipped
        return self.report.run_step(name, self.scale.estimates_s[name] if estimate_s is None else estimate_s, body,
                                    exercised)

    @staticmethod
    def _skipped(record: dict) -> None:
        raise StepSkipped("--skip")

    def needs(self, *steps: str) -> None:
        missing = [step for step in steps if self.report.status(step) != "ok"]
        if missing:
            raise StepSkipped(f"needs {', '.join(missing)}, which did not succeed")

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> None:
        self.step("environment", self.environment)
        if self.cannot_run:
            self.report.log(f"stopping: {self.cannot_run}")
            return
        background = None if "clinical_data" in self.skip else self.start_clinical_data()
        try:
            self.step("small_data", self.small_data)
            self.step("phantom_model", self.phantom_model)
            self.step("correctness", self.correctness)
            self.step("clinical_data", lambda record: self.clinical_data(record, *background), estimate_s=0.0)
            self.step("memory", self.memory)
            self.step("training_speed", functools.partial(self.training_speed, compile_network=False))
            self.step("inference", self.inference)
            self.step("training_speed_compile", functools.partial(self.training_speed, compile_network=True))
            self.step("step_profile", functools.partial(speed.step_profile, self))
            self.step("step_variants", functools.partial(speed.step_variants, self))
        finally:
            if background is not None and background[0].poll() is None:
                os.killpg(background[0].pid, signal.SIGKILL)
                background[0].wait()

    # ------------------------------------------------------------------------------------------ steps
    def environment(self, record: dict) -> None:
        if self.wheels is not None:
            record["figures"]["install"] = self._install_wheels(self.work / "site")
        probe = self.work / "environment.json"
        self.command(python_command("-m", WORKERS, "environment", probe))
        figures = _read_json(probe)
        record["figures"].update(figures)
        self.report.set("machine", {key: figures.get(key) for key in (
            "gpu", "gpu_memory_gib", "capability", "cuda", "cudnn", "torch", "python", "cpu_count", "load_average")})
        if figures["missing"]:
            self.cannot_run = f"cannot import {', '.join(figures['missing'])}"
        elif self.device == "cuda" and not figures["cuda_available"]:
            self.cannot_run = "torch sees no CUDA device"
        if self.cannot_run:
            raise RuntimeError(self.cannot_run)
        broken = [f"{module} ({problem})" for module, problem in figures["commands"].items() if problem != "ok"]
        if figures["imports_not_carried"] or broken:    # the steps that need them fail on their own; others run
            raise RuntimeError(f"covnet's commands import {', '.join(figures['imports_not_carried']) or 'nothing'} "
                               f"that the GPU machine lacks and the check does not carry (import it where it is "
                               f"used); commands that cannot start: {', '.join(broken) or 'none'}")

    def _install_wheels(self, site: Path) -> dict:
        wheels = sorted(self.wheels.glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"{self.wheels}: no wheels (run benchmarks/gpu_wheels.sh where pip can download)")
        started = time.perf_counter()
        completed = self.command(python_command("-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                                "--no-compile", "--no-cache-dir", "--upgrade", "--target", site,
                                                *wheels), check=False)
        how = "pip install --no-index --no-deps --target"
        if completed.returncode != 0:      # a pip that cannot read them: a wheel is a zip of site-packages
            how = f"unzipped (pip exited {completed.returncode})"
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(site)
        self._set_python_path(site)
        return {"wheels": [wheel.name for wheel in wheels], "how": how, "site": str(site),
                "seconds": round(time.perf_counter() - started, 1)}

    def start_clinical_data(self) -> tuple[subprocess.Popen, float]:
        """The clinical phantoms take minutes of CPU: they are made while the GPU checks correctness."""
        phantoms = self.scale.clinical
        argv = python_command("-m", WORKERS, "prepare", self.clinical, "--size", phantoms.size, "--labelled",
                              phantoms.labelled, "--test", phantoms.test, "--seed", phantoms.seed, "-np",
                              self.scale.preprocessing_processes, "--out", self.work / "clinical_data.json",
                              *(["--tiny"] if phantoms.tiny_network else []))
        self.report.log("$ (in the background) " + " ".join(map(str, argv)))
        with open(self.work / "clinical_data.log", "w") as log:
            process = subprocess.Popen([str(arg) for arg in argv], cwd=REPOSITORY, env=self.env, stdout=log,
                                       stderr=subprocess.STDOUT, process_group=0)
        return process, time.monotonic()

    def clinical_data(self, record: dict, process: subprocess.Popen, started: float) -> None:
        phantoms = self.scale.clinical
        record["figures"].update(size=phantoms.size, labelled=phantoms.labelled,
                                 processes=self.scale.preprocessing_processes)
        try:
            process.wait(timeout=max(1.0, self.report.budget.left - RESERVE_S))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise StepTimeout("the clinical phantoms were not ready within the budget") from None
        finally:
            log = (self.work / "clinical_data.log").read_text(errors="replace")
            with open(self.report.log_path, "a") as main_log:
                main_log.write(f"---- clinical_data, in the background ----\n{log}---- end of clinical_data ----\n")
        if process.returncode != 0:
            raise RuntimeError(f"preparing the clinical phantoms exited {process.returncode} (see the log)")
        record["figures"].update(seconds=_read_json(self.work / "clinical_data.json")["seconds"],
                                 waited_s=round(time.monotonic() - started, 1),
                                 plan=_plan_summary(self.clinical / "preprocessed" / "plans.json"))

    def small_data(self, record: dict) -> None:
        data.prepare_workspace(self.small, self.scale.small, self.command, self.scale.preprocessing_processes)
        record["figures"]["plan"] = _plan_summary(self.small / "preprocessed" / "plans.json")

    def phantom_model(self, record: dict) -> None:
        self.needs("small_data")
        self.command(data.train_command(self.small, self.device, self.scale.model_training))
        history = training_history(data.final_checkpoint(self.small))
        record["figures"].update(flags=list(self.scale.model_training), train_loss=history["train_loss"],
                                 training_s=round(sum(history["epoch_seconds"]), 1))

    def correctness(self, record: dict) -> None:
        results = self.report.out / "cuda_tests.xml"
        env = {**self.env, TESTS_WORKSPACE_VARIABLE: str(self.small)}
        if self.dry_run:
            env[TESTS_DEVICE_VARIABLE] = "cpu"
        completed = self.report.command(python_command(
            "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--basetemp", self.work / "pytest", "-m", "cuda",
            CUDA_TESTS, "--junitxml", results, "-o", "junit_family=legacy"), env=env, check=False)
        record["figures"].update(_junit_summary(results))
        failed = [test["name"] for test in record["figures"]["tests"] if test["outcome"] in ("failed", "error")]
        if failed or completed.returncode != 0:
            raise RuntimeError(f"pytest exited {completed.returncode}; failed: {', '.join(failed) or 'none'}")
        if not record["figures"]["passed"]:
            raise RuntimeError("no CUDA test ran (all skipped)")

    def memory(self, record: dict) -> None:
        self.needs("clinical_data")
        plans = [data.plan_with_budget(self.clinical, self.work / f"memory_{budget:g}gb", budget, self.command)
                 for budget in self.scale.memory_budgets_gb]
        out = self.work / "memory.json"
        self.command(python_command("-m", WORKERS, "memory", out, "--device", self.device, "--steps",
                                    self.scale.memory_steps, *plans))
        figures = _read_json(out)
        record["figures"].update(figures)
        errors = [plan["error"] for plan in figures["plans"] if "error" in plan]
        if errors:
            raise RuntimeError(f"{len(errors)} plan(s) could not be measured: {'; '.join(errors)}")

    def training_speed(self, record: dict, *, compile_network: bool) -> None:
        self.needs("clinical_data")
        scale = self.scale
        root = data.sibling_workspace(self.clinical, self.work / "clinical_compiled") if compile_network \
            else self.clinical
        flags = ("--epochs", scale.speed_epochs, "--iters-per-epoch", scale.speed_iterations, "--val-iters", 0,
                 "--checkpoint-every", 1)
        started = time.perf_counter()
        try:
            self.command(data.train_command(root, self.device, list(map(str, flags)), compile_network=compile_network))
        finally:   # a run cut short still leaves its finished epochs in checkpoint_latest.pth
            record["figures"].update(command_s=round(time.perf_counter() - started, 1),
                                     **_speed_figures(root, scale.speed_iterations))

    def inference(self, record: dict) -> None:
        model = data.final_checkpoint(self.clinical)
        if not model.is_file():
            raise StepSkipped("needs the clinical model that training_speed trains")
        inputs = self.work / "ct"
        record["figures"]["image"] = self._prepare_ct(inputs)
        for tta in ("off", "on"):
            out, started = self.work / f"predict_tta_{tta}.json", time.perf_counter()
            self.command(python_command("-m", WORKERS, "predict", out, self.device, "--", "-i", inputs, "-o",
                                        self.work / f"predicted_tta_{tta}", "--model", model,
                                        *(["--disable-tta"] if tta == "off" else [])))
            record["figures"][f"tta_{tta}"] = {"process_wall_s": round(time.perf_counter() - started, 2),
                                               **_read_json(out)}

    def _prepare_ct(self, folder: Path) -> dict:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        started = time.perf_counter()
        if self.dry_run or self.ct is None:
            images = sorted((self.small / "raw" / "imagesTs").glob("*.nii.gz")) if self.dry_run else \
                sorted((self.clinical / "raw" / "imagesTr").glob("*.nii.gz"))
            if not images:
                raise RuntimeError("no phantom to stand in for the CT")
            packed = self.work / (images[0].name + PACK_SUFFIX)
            pack_nifti(images[0], packed, preset=1)
            image = unpack_nifti(packed, folder)
            described = "phantom stand-in (dry run)" if self.dry_run else \
                "clinical phantom stand-in: the CT was not carried"
        elif self.ct.name.endswith(PACK_SUFFIX):
            image, described = unpack_nifti(self.ct, folder), "real chest CT (unpacked)"
        else:
            image, described = folder / self.ct.name, "real chest CT"
            image.symlink_to(self.ct.resolve())
        from covnet.image.io import read_image

        _, geometry = read_image(image)
        return {"file": image.name, "what": described, "shape_zyx": list(geometry.shape),
                "spacing_zyx": [round(value, 4) for value in geometry.spacing],
                "megabytes": round(image.stat().st_size / 1e6, 1), "prepare_s": round(time.perf_counter() - started, 2)}


# ---------------------------------------------------------------------------------------------- readers
def _read_json(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text())


def _plan_summary(plans_json: Path) -> dict:
    plan = _read_json(plans_json)
    return {key: plan[key] for key in ("patch_size", "batch_size", "target_spacing", "gpu_memory_gb",
                                       "estimated_memory_gb")} | {
        "features": plan["network"]["features_per_stage"]}


def _junit_summary(path: Path) -> dict:
    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = " ".join((element.get("message") or "").split())[:300]
        properties = {prop.get("name"): _number(prop.get("value")) for prop in case.iter("property")}
        tests.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                      "message": message, "figures": properties})
    counts = {outcome: sum(test["outcome"] == outcome for test in tests)
              for outcome in ("passed", "failed", "error", "skipped")}
    return {**counts, "tests": tests}


def _number(text: str | None):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def _speed_figures(root: Path, iterations_per_epoch: int) -> dict:
    folder = root / "results" / "fold_all"
    checkpoint = next((path for path in (folder / "checkpoint_final.pth", folder / "checkpoint_latest.pth")
                       if path.is_file()), None)
    if checkpoint is None:
        return {"epochs": 0}
    history = training_history(checkpoint)
    per_iteration, waiting = history["seconds_per_iteration"], history["data_wait_share"]
    timed = list(range(1, len(per_iteration)))        # epoch 1 warms up (and compiles)
    figures = {"epochs": len(per_iteration), "seconds_per_iteration": per_iteration, "data_wait_share": waiting,
               "warm_up_epoch_s": history["epoch_seconds"][0] if history["epoch_seconds"] else None}
    if timed:
        seconds = sum(per_iteration[epoch] * iterations_per_epoch for epoch in timed)
        iterations = iterations_per_epoch * len(timed)
        figures.update(timed_iterations=iterations, timed_s=round(seconds, 2),
                       seconds_per_250_iterations=round(seconds / iterations * 250, 2),
                       data_wait_share_timed=round(sum(waiting[epoch] * per_iteration[epoch] for epoch in timed)
                                                   / (seconds / iterations_per_epoch), 4))
    return figures


def goals(steps: dict, *, dry_run: bool = False) -> dict:
    """The issue's goals against what was measured (None where not measured)."""
    def figures(step):
        return steps.get(step, {}).get("figures", {}) if steps.get(step, {}).get("status") == "ok" else {}

    result = {}
    plans = [plan for plan in figures("memory").get("plans", []) if "relative_error" in plan]
    result["memory_error_within_15_percent"] = all(abs(p["relative_error"]) <= MEMORY_ERROR_GOAL for p in plans) \
        if plans else None
    result["no_oom_at_planned_budget"] = not any(p.get("oom_at_budget") for p in plans) if plans else None
    for step in ("training_speed", "training_speed_compile"):
        speed = figures(step)
        if "seconds_per_250_iterations" in speed:
            result[f"{step}_250_iterations_s"] = speed["seconds_per_250_iterations"]
            result[f"{step}_within_45_s_and_10_percent_wait"] = (
                speed["seconds_per_250_iterations"] <= TRAINING_SPEED_GOAL_S
                and speed["data_wait_share_timed"] < DATA_WAIT_GOAL)
    fastest = figures("step_variants").get("fastest_250_iterations_s")
    if fastest is not None:
        result["step_variants_fastest"] = figures("step_variants")["fastest"]
        result["step_variants_fastest_within_45_s"] = fastest <= TRAINING_SPEED_GOAL_S
    tta = figures("inference").get("tta_on", {})
    if tta.get("network_s"):
        result["tta_network_s"] = round(sum(tta["network_s"]), 2)
        result["tta_network_within_10_s"] = sum(tta["network_s"]) <= TTA_NETWORK_GOAL_S
    if dry_run:
        result["note"] = "dry run: CPU stand-ins at tiny sizes, not the conditions the goals are set for"
    return {key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in result.items()}
