"""Training speed on CPU: covnet's trainer vs nnU-Net v2's trainer on the same phantom dataset.

For each tool, with its own plan, this measures seconds per training iteration and the share of the step time
spent waiting for data:

* nnU-Net v2 (optional, only in its own venv, never imported here): the phantoms are converted to nnU-Net's raw
  format (Dataset500_Phantoms, symlinks), planned and preprocessed with ``nnUNetv2_plan_and_preprocess -d 500 -c
  3d_fullres -np 2``, then a small timing driver run by the nnU-Net venv's python builds ``nnUNetTrainer(plans,
  '3d_fullres', 0, dataset_json, device=cpu)``, calls ``initialize()``, ``on_train_start()`` and times
  ``--iterations`` calls of ``train_step(next(dataloader_train))``; the data wait is the time inside
  ``next(dataloader_train)``. nnU-Net's data-augmentation worker count is ``nnUNet_n_proc_DA`` (``--nnunet-workers``:
  1 matches covnet's ``--num-workers 1``; ``default`` leaves nnU-Net's own choice, min(12, CPU count)). torch uses
  one thread per CPU, as ``nnUNetv2_train -device cpu`` sets, counting the CPUs this process may use
  (``covnet.runtime.cpus``; nnU-Net counts the host's, which differs only in a container or under taskset).
* covnet: ``covnet_plan_and_preprocess --device cpu`` (the CPU plan) and, in a second copy of the workspace,
  ``--device cuda`` (the GPU plan, a network of nnU-Net's size), then ``covnet_train 0 --epochs 1
  --iters-per-epoch N --val-iters 1 --num-workers 1 --no-val-mirroring``; s/it and "% waiting for data" are read
  from the epoch line of ``results/fold_0/training_log.txt`` (covnet counts ``next(loader)`` plus the copy to the
  device as waiting, over the epoch's training steps).

The nnU-Net environment variables (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) are set only in the
subprocesses' environment. Tools run back to back (``--repeats`` rounds) and /proc/loadavg is recorded before and
after every run, because other jobs on a small machine distort the timings.

Usage (the nnU-Net venv: python3 -m venv /tmp/nnunet_venv && /tmp/nnunet_venv/bin/pip install torch==2.13.0 &&
/tmp/nnunet_venv/bin/pip install nnunetv2):
    .venv/bin/python benchmarks/compare_nnunet_training.py --work /tmp/cmp --iterations 15 --json /tmp/cmp/result.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from covnet.runtime.cpus import usable_cpu_count

DATASET_ID = 500
DATASET_NAME = f"Dataset{DATASET_ID:03d}_Phantoms"

# Run by the nnU-Net venv's python: nnunetv2 is imported there only.
NNUNET_DRIVER = r'''
import json, os, statistics, sys, time
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

iterations, dataset_name, threads = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)          # what nnUNetv2_train -device cpu does
folder = join(nnUNet_preprocessed, dataset_name)
plans = load_json(join(folder, "nnUNetPlans.json"))
dataset_json = load_json(join(folder, "dataset.json"))
plans["continue_training"] = False               # as nnunetv2.run.run_training.get_trainer_from_args sets
trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
started = time.perf_counter()
trainer.initialize()
trainer.on_train_start()
setup_seconds = time.perf_counter() - started
trainer.on_epoch_start()
trainer.on_train_epoch_start()
waits, steps, cpu = [], [], []
for _ in range(iterations):
    t0, c0 = time.perf_counter(), time.process_time()
    batch = next(trainer.dataloader_train)
    t1 = time.perf_counter()
    trainer.train_step(batch)
    t2 = time.perf_counter()
    waits.append(t1 - t0)
    steps.append(t2 - t0)
    cpu.append(time.process_time() - c0)
configuration = plans["configurations"]["3d_fullres"]
architecture = configuration["architecture"]
result = {
    "setup_seconds": setup_seconds,
    "iterations": iterations,
    "iteration_seconds": steps,
    "data_wait_seconds": waits,
    "main_process_cpu_seconds": cpu,
    "seconds_per_iteration": sum(steps) / iterations,
    "median_seconds_per_iteration": statistics.median(steps),
    "data_wait_share": sum(waits) / sum(steps),
    "data_augmentation_workers": get_allowed_n_proc_DA(),
    "torch_threads": torch.get_num_threads(),
    "torch": torch.__version__,
    "patch_size": configuration["patch_size"],
    "batch_size": configuration["batch_size"],
    "spacing": configuration["spacing"],
    "network_class": architecture["network_class_name"],
    "features_per_stage": architecture["arch_kwargs"]["features_per_stage"],
    "n_conv_per_stage": architecture["arch_kwargs"]["n_conv_per_stage"],
    "n_conv_per_stage_decoder": architecture["arch_kwargs"]["n_conv_per_stage_decoder"],
    "strides": architecture["arch_kwargs"]["strides"],
    "parameters": sum(p.numel() for p in trainer.network.parameters()),
    "deep_supervision": trainer.enable_deep_supervision,
}
for loader in (trainer.dataloader_train, trainer.dataloader_val):
    if hasattr(loader, "_finish"):
        loader._finish()
print("RESULT " + json.dumps(result), flush=True)
os._exit(0)
'''

EPOCH_LINE = re.compile(r"epoch 1: .*\(([\d.]+) s/it\), (\d+)% waiting for data")


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def run(command: list[str], log: Path, env: dict | None = None) -> float:
    started = time.perf_counter()
    with open(log, "w") as out:
        completed = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if completed.returncode != 0:
        sys.exit(f"failed ({completed.returncode}): {' '.join(command)}; see {log}")
    return time.perf_counter() - started


def nnunet_env(work: Path, workers: str) -> dict:
    env = dict(os.environ, nnUNet_raw=str(work / "nnunet_raw"), nnUNet_preprocessed=str(work / "nnunet_preprocessed"),
               nnUNet_results=str(work / "nnunet_results"))
    env.pop("nnUNet_n_proc_DA", None)
    if workers != "default":
        env["nnUNet_n_proc_DA"] = workers
    return env


def convert_to_nnunet(covnet_raw: Path, target: Path) -> int:
    """nnU-Net raw layout from covnet's raw/ (the case names already end in _0000): symlinks + dataset.json."""
    source = json.loads((covnet_raw / "dataset.json").read_text())
    for part in ("imagesTr", "labelsTr"):
        (target / part).mkdir(parents=True, exist_ok=True)
        for file in sorted((covnet_raw / part).glob("*.nii.gz")):
            link = target / part / file.name
            if not link.exists():
                link.symlink_to(file.resolve())
    cases = len(list((target / "labelsTr").glob("*.nii.gz")))
    dataset = {"channel_names": {"0": "CT"},
               "labels": {"background": 0, "left_lung": 1, "right_lung": 2, "infection": 3},
               "numTraining": cases, "file_ending": ".nii.gz", "name": "Phantoms"}
    assert {k: v for k, v in source["labels"].items()} == dataset["labels"], source["labels"]
    (target / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return cases


def covnet_plan_summary(workspace: Path) -> dict:
    plan = json.loads((workspace / "preprocessed" / "plans.json").read_text())
    return {"device": plan["device"], "patch_size": plan["patch_size"], "batch_size": plan["batch_size"],
            "spacing": plan["target_spacing"], "features_per_stage": plan["network"]["features_per_stage"],
            "n_blocks_per_stage": plan["network"]["n_blocks_per_stage"],
            "n_conv_per_stage_decoder": plan["network"]["n_conv_per_stage_decoder"],
            "strides": plan["network"]["strides"], "mixed_precision": plan.get("mixed_precision"),
            "estimated_seconds_per_iteration": plan.get("estimated_seconds_per_iteration")}


def covnet_checkpoint_facts(checkpoint: Path) -> dict:
    """Parameter count and the unrounded epoch-1 s/it and data-wait share (the log line rounds to whole %)."""
    import torch
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    history = state.get("history", {})
    facts = {"parameters": sum(v.numel() for k, v in state["network_state"].items()
                               if v.is_floating_point() and "running_" not in k)}
    if history.get("data_wait_share"):
        facts["data_wait_share_exact"] = history["data_wait_share"][0]
    if history.get("seconds_per_iteration"):
        facts["seconds_per_iteration_exact"] = history["seconds_per_iteration"][0]
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cmp"))
    parser.add_argument("--nnunet-venv", type=Path, default=Path("/tmp/nnunet_venv"))
    parser.add_argument("--covnet-venv", type=Path, default=Path(sys.executable).parent.parent)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--nnunet-workers", default="1",
                        help="comma-separated nnUNet_n_proc_DA values; 'default' = unset (nnU-Net's own choice)")
    parser.add_argument("--tools", default="nnunet,covnet_cpu,covnet_gpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work, covnet_bin, nnunet_bin = args.work, args.covnet_venv / "bin", args.nnunet_venv / "bin"
    tools = args.tools.split(",")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    # --- data + planning (not timed here) -------------------------------------------------------------------
    covnet_ws = {"covnet_cpu": work / "covnet", "covnet_gpu": work / "covnet_gpu"}
    if not (covnet_ws["covnet_cpu"] / "raw" / "dataset.json").exists():
        run([str(covnet_bin / "covnet_make_phantoms"), "--workspace", str(covnet_ws["covnet_cpu"]),
             "--num-labelled", str(args.cases), "--num-unlabelled", "0", "--num-test", "0", "--seed", "0"],
            logs / "make_phantoms.log")
    for tool, device in (("covnet_cpu", "cpu"), ("covnet_gpu", "cuda")):
        if tool not in tools:
            continue
        workspace = covnet_ws[tool]
        if not (workspace / "raw").exists():
            shutil.copytree(covnet_ws["covnet_cpu"] / "raw", workspace / "raw")
        if not (workspace / "preprocessed" / "plans.json").exists():
            run([str(covnet_bin / "covnet_plan_and_preprocess"), "--workspace", str(workspace), "--device", device],
                logs / f"{tool}_plan.log")
    if "nnunet" in tools:
        cases = convert_to_nnunet(covnet_ws["covnet_cpu"] / "raw", work / "nnunet_raw" / DATASET_NAME)
        if not (work / "nnunet_preprocessed" / DATASET_NAME / "nnUNetPlans.json").exists():
            run([str(nnunet_bin / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres",
                 "-np", "2"], logs / "nnunet_plan.log", env=nnunet_env(work, "default"))
        print(f"nnU-Net raw: {cases} cases in {work / 'nnunet_raw' / DATASET_NAME}")

    # --- timing, back to back --------------------------------------------------------------------------------
    runs = []
    for repeat in range(args.repeats):
        for tool in tools:
            for workers in (args.nnunet_workers.split(",") if tool == "nnunet" else ["1"]):
                name = f"{tool}" + (f"_workers{workers}" if tool == "nnunet" else "")
                load_before = loadavg()
                started = time.strftime("%H:%M:%S")
                if tool == "nnunet":
                    shutil.rmtree(work / "nnunet_results", ignore_errors=True)
                    driver = work / "nnunet_timing_driver.py"
                    driver.write_text(NNUNET_DRIVER)
                    log = logs / f"{name}_r{repeat}.log"
                    wall = run([str(nnunet_bin / "python"), str(driver), str(args.iterations), DATASET_NAME,
                                str(usable_cpu_count())], log,
                               env=nnunet_env(work, workers))
                    line = [x for x in log.read_text().splitlines() if x.startswith("RESULT ")][-1]
                    result = json.loads(line[len("RESULT "):])
                else:
                    workspace = covnet_ws[tool]
                    shutil.rmtree(workspace / "results", ignore_errors=True)
                    wall = run([str(covnet_bin / "covnet_train"), "0", "--workspace", str(workspace), "--epochs", "1",
                                "--iters-per-epoch", str(args.iterations), "--val-iters", "1", "--num-workers", "1",
                                "--no-val-mirroring"], logs / f"{name}_r{repeat}.log")
                    text = (workspace / "results" / "fold_0" / "training_log.txt").read_text()
                    match = EPOCH_LINE.search(text)
                    result = {"seconds_per_iteration": float(match.group(1)),
                              "data_wait_share": int(match.group(2)) / 100, "epoch_line": match.group(0),
                              **covnet_plan_summary(workspace),
                              **covnet_checkpoint_facts(workspace / "results" / "fold_0" / "checkpoint_final.pth")}
                result.update(tool=name, repeat=repeat, started=started, command_seconds=wall,
                              loadavg_before=load_before, loadavg_after=loadavg())
                runs.append(result)
                print(f"{name:20s} r{repeat}: {result['seconds_per_iteration']:.2f} s/it, "
                      f"{100 * result.get('data_wait_share_exact', result['data_wait_share']):.1f}% waiting for data, patch {result['patch_size']} "
                      f"batch {result['batch_size']}, {result['parameters'] / 1e6:.1f} M parameters; load "
                      f"{load_before} -> {result['loadavg_after']} ({started})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
