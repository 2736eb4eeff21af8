"""Does self-training on unlabelled CTs beat a supervised control? A paired, multi-arm experiment on phantoms.

    python benchmarks/selftrain_experiment.py --root /tmp/st --regimes shift scarcity --seeds 0 1 2 3 4 5 --workers 2
    python benchmarks/selftrain_analysis.py --root /tmp/st --output benchmarks/results/selftrain   # tables, figure
    python benchmarks/selftrain_experiment.py --root /tmp/st_tiny --regimes shift --seeds 0 --tiny  # a few minutes

Regimes (phantoms, ``covnet_make_phantoms``' acquisition profiles):

* ``scarcity``: 4 expert cases, 16 pool cases and 24 held-out cases, all from one scanner (``standard``);
* ``shift``: 4 expert cases from the ``standard`` scanner, pool and held-out cases from another
  (``low_dose_soft``: thick slices, soft kernel, grainy noise, +50 HU, fainter and more numerous lesions);
* ``varied``: as ``scarcity``, from a cohort at every stage of the disease (``varied_lesions``: each patient's
  lesions share one stage, faint ground glass to consolidation), so that 4 expert cases see only a few stages.

Per seed, a fresh draw of every case (the data seed is the seed), one plan for the regime (made once from seed 0's
expert cases), and these arms, every one measured on the same held-out cases without test-time mirroring:

* ``base``: the 4-fold (leave-one-out) ensemble trained on the expert cases: what a user has before
  self-training, and the teacher of every self-training arm;
* ``control``: one model trained on the expert cases alone for as many iterations as the base's folds and the
  full recipe's students together;
* ``full``: ``covnet_selftrain`` with the published recipe (``FULL_RECIPE``: the defaults before the
  compute-matched benchmark changed some), ``--holdout none`` (students train on all 4 expert cases);
* ``seed recipe``: covnet's first recipe (best fold, threshold 0.9, most confident cases, fine-tuned student,
  standard augmentation, labels kept, 4 cases a round);
* ``-<element>``: the full recipe with one element changed to its alternative (leave-one-out);
* ``oracle``: the full recipe with the pool's true labels instead of a teacher's: the ceiling.

Every job (a fold, the control, an arm, an evaluation) runs in its own single-threaded process, ``--workers``
at a time, and is resumable: a rerun with the same ``--root`` skips finished jobs and continues unfinished ones.
Per-case scores go to ``<root>/<regime>/seed_<s>/<arm>/test_summary.json``; ``selftrain_analysis.py`` makes
the tables and figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REGIMES = {"scarcity": ("standard", "standard"), "shift": ("standard", "low_dose_soft"),
           "varied": ("varied_lesions", "varied_lesions")}
EXPERTS, POOL, HELD_OUT, FOLDS = 4, 16, 24, 4
# The full recipe, spelled out so that an arm means the same whatever covnet_selftrain's defaults become (runs 1
# and 2 in BENCHMARKS.md ran it with strong noise on, then the default), and what each element is replaced by in
# its leave-one-out arm.
FULL_RECIPE = {"teacher": "ensemble", "teacher_mirroring": True, "pseudo_labels": "argmax", "selection": "agreement",
               "select_fraction": 0.5, "student": "retrain", "strong_noise": False, "refresh": True}
ARMS = {
    "full": {},
    "seed recipe": {"teacher": "best", "pseudo_labels": "threshold", "selection": "confidence", "cases_per_round": 4,
                    "student": "finetune", "strong_noise": False, "refresh": False, "max_rounds": 4},
    "-ensemble teacher": {"teacher": "best", "teacher_mirroring": False},
    "-argmax labels": {"pseudo_labels": "class_balanced"},
    "-agreement selection": {"selection": "random"},
    "-retrained student": {"student": "finetune"},
    "+strong noise": {"strong_noise": True},
    "-refreshed labels": {"refresh": False},
    "oracle": {},
}
SUPERVISED = ("base", "control")


@dataclass(frozen=True)
class Schedule:
    """The experiment's training budget, network and data: small enough for a 2-core CPU."""
    epochs: int = 32
    iterations_per_epoch: int = 25
    features: tuple[int, ...] = (8, 16, 32, 64)
    patch: tuple[int, int, int] = (32, 48, 48)
    rounds: int = 2
    # nnU-Net's share of patches centred on foreground.
    oversample_foreground: float = 0.33
    # Every phantom infected, 5-30% of the lungs (log-uniform), as the COVID-19-CT-Seg cases are. Pilots (one model
    # on 4 expert cases, infection Dice on 12 low-dose test phantoms): with the default burden (a third of the
    # cases clean) a model learns infection late: 400 iterations 0.00 (all 16 self-trained students of the first
    # run, true labels included); with this range 600 iterations reach 0.67.
    burden_range: tuple[float, float] | None = (0.05, 0.3)

    @property
    def base_iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch


TINY = Schedule(epochs=2, iterations_per_epoch=3, features=(4, 8, 16), patch=(16, 32, 32))
SCHEDULE_FILE = "schedule.json"


def slug(arm: str) -> str:
    """An arm's folder name: a leading "-" (one element left out) reads "minus_", spaces become "_"."""
    return re.sub(r"(^| )-", r"\1minus_", arm).replace(" ", "_")


# ------------------------------------------------------------------------------------------------ data
def regime_root(root: Path, regime: str) -> Path:
    return root / regime


def data_workspace(root: Path, regime: str, seed: int):
    from covnet.workspace import Workspace
    return Workspace(regime_root(root, regime) / f"seed_{seed}" / "data")


def experiment_plan(root: Path, regime: str, schedule: Schedule):
    """The regime's plan, made once from seed 0's expert cases, with the experiment's network and patch."""
    from covnet.planning.planner import plan_dataset
    from covnet.planning.plans import Plan
    path = regime_root(root, regime) / "plans.json"
    if path.is_file():
        return Plan.load(path)
    workspace = data_workspace(root, regime, 0)
    make_data(workspace, regime, 0, schedule)
    plan = with_network(plan_dataset(workspace, device="cpu", measure_cpu_time=False), schedule.features,
                        schedule.patch)
    plan.save(path)
    return plan


def with_network(plan, features: tuple[int, ...], patch: tuple[int, int, int]):
    """``plan`` with the experiment's small residual UNet (``features`` per stage), ``patch`` and batch 2."""
    from covnet.network.topology import Topology
    stages = len(features)
    network = Topology(in_channels=plan.in_channels, num_classes=plan.num_classes,
                       features_per_stage=tuple(features), kernel_sizes=((3, 3, 3),) * stages,
                       strides=((1, 1, 1),) + ((2, 2, 2),) * (stages - 1), n_blocks_per_stage=(1,) + (2,) * (stages - 1),
                       n_conv_per_stage_decoder=(1,) * (stages - 1), deep_supervision=True)
    return dataclasses.replace(plan, patch_size=list(patch), batch_size=2, network=network)


def make_data(workspace, regime: str, seed: int, schedule: Schedule) -> None:
    from covnet.phantoms.acquisition import profile_named
    from covnet.phantoms.generate import make_phantom_dataset
    if workspace.dataset_json.is_file():
        return
    expert, target = REGIMES[regime]
    scale = 4 if schedule == TINY else 1
    make_phantom_dataset(workspace, num_labelled=EXPERTS, num_unlabelled=POOL // scale, num_test=HELD_OUT // scale,
                         seed=1000 + seed, spacing_mode="isotropic", overwrite=True,
                         profile=profile_named(expert), unlabelled_profile=profile_named(target),
                         test_profile=profile_named(target), pool_truth=True,
                         distinct_patients=True,
                         burden_range=None if schedule.burden_range is None else tuple(schedule.burden_range))


def prepare_seed(root: Path, regime: str, seed: int, schedule: Schedule) -> None:
    """Phantoms, the regime's plan, preprocessed expert and pool cases, and the pool's truth on the plan's grid."""
    from covnet.preprocessing.run import CaseJob, preprocess_dataset, run_case_job
    plan = experiment_plan(root, regime, schedule)
    workspace = data_workspace(root, regime, seed)
    make_data(workspace, regime, seed, schedule)
    plan.save(workspace.plans_json)
    preprocess_dataset(workspace, plan, num_processes=1)
    truth = oracle_folder(root, regime, seed)
    for index, image in enumerate(sorted(workspace.images_unlabelled.glob("*_0000.nii.gz"))):
        case = image.name[: -len("_0000.nii.gz")]
        if not (truth / f"{case}.json").is_file():
            run_case_job(CaseJob(case, image, workspace.labels_unlabelled / f"{case}.nii.gz", truth, index), plan)


def oracle_folder(root: Path, regime: str, seed: int) -> Path:
    return regime_root(root, regime) / f"seed_{seed}" / "pool_truth"


# ------------------------------------------------------------------------------------------------ models
def arm_workspace(root: Path, regime: str, seed: int, arm: str):
    """An arm's own workspace: raw/, preprocessed/ and the trained folds shared with the data workspace."""
    from covnet.workspace import Workspace
    data = data_workspace(root, regime, seed)
    workspace = Workspace(regime_root(root, regime) / f"seed_{seed}" / slug(arm))
    (workspace.results).mkdir(parents=True, exist_ok=True)
    for link, target in [(workspace.root / "raw", data.raw), (workspace.root / "preprocessed", data.preprocessed)] + \
            [(workspace.results / f"fold_{k}", data.results / f"fold_{k}") for k in range(FOLDS)]:
        if not link.is_symlink():
            link.symlink_to(target)
    return workspace


def training_settings(schedule: Schedule, seed: int, epochs: int | None = None):
    from covnet.training.settings import TrainingSettings
    return TrainingSettings(epochs=epochs or schedule.epochs, iterations_per_epoch=schedule.iterations_per_epoch,
                            validation_iterations=0, seed=seed, device="cpu", num_workers=0,
                            checkpoint_every=max(1, (epochs or schedule.epochs) // 4), validation_mirroring=False,
                            oversample_foreground=schedule.oversample_foreground)


def train_fold_job(root: Path, regime: str, seed: int, fold: int, schedule: Schedule) -> None:
    from covnet.training.run import train_fold
    workspace = data_workspace(root, regime, seed)
    train_fold(workspace, str(fold), training_settings(schedule, seed), resume=True, num_folds=FOLDS)


def train_control(root: Path, regime: str, seed: int, schedule: Schedule) -> None:
    from covnet.training.run import train_fold
    workspace = arm_workspace(root, regime, seed, "control")
    epochs = schedule.epochs * (FOLDS + schedule.rounds)
    train_fold(workspace, "all", training_settings(schedule, seed, epochs), resume=True)


def arm_settings(arm: str, seed: int, schedule: Schedule):
    from covnet.selftrain.settings import SelfTrainingSettings
    overrides = {"device": "cpu", "num_workers": 0, "seed": seed, "validation_mirroring": False,
                 "validation_iterations": 0}
    recipe = {**FULL_RECIPE, "holdout": "none", "max_rounds": schedule.rounds, "keep_candidates": True, **ARMS[arm]}
    return SelfTrainingSettings(**recipe, training_overrides=overrides)


def shares_first_labels(arm: str) -> bool:
    """Arms whose round 1 is labelled by the full recipe's teacher (the mirrored ensemble): they share one
    labelling of the pool (its candidates hold no policy or selection, only the teacher's predictions)."""
    return arm != "oracle" and not {"teacher", "teacher_mirroring"} & set(ARMS[arm])


def label_first_round(root: Path, regime: str, seed: int, schedule: Schedule) -> None:
    """The mirrored ensemble's predictions of the pool, once per seed, for every arm that shares them."""
    from covnet.selftrain.run import run_pseudo_label_part
    run_pseudo_label_part(arm_workspace(root, regime, seed, "labels"), arm_settings("full", seed, schedule), 1, 0)


def selftrain_arm(root: Path, regime: str, seed: int, arm: str, schedule: Schedule) -> None:
    from covnet.selftrain.run import run_selftraining
    workspace = arm_workspace(root, regime, seed, arm)
    first = workspace.selftrain_round(1).path / "candidates"
    if shares_first_labels(arm) and not (workspace.selftrain_round(1).path / "selection.json").is_file():
        shared = arm_workspace(root, regime, seed, "labels").selftrain_round(1).path / "candidates"
        first.mkdir(parents=True, exist_ok=True)
        for source in shared.iterdir():
            if not (first / source.name).exists():
                os.link(source, first / source.name)
    run_selftraining(workspace, arm_settings(arm, seed, schedule), resume=True,
                     oracle_folder=oracle_folder(root, regime, seed) if arm == "oracle" else None)


# ------------------------------------------------------------------------------------------------ evaluation
def models_of(root: Path, regime: str, seed: int, arm: str) -> dict[str, list[Path]]:
    """The model(s) to score for an arm: name -> checkpoints (self-training arms: every round's student)."""
    data = data_workspace(root, regime, seed)
    if arm == "base":
        return {"base": [data.fold(k).checkpoint("final") for k in range(FOLDS)]}
    workspace = arm_workspace(root, regime, seed, arm)
    if arm == "control":
        return {"control": [workspace.fold("all").checkpoint("final")]}
    rounds = sorted(workspace.selftrain.glob("round_*/checkpoint_final.pth"))
    return {f"round_{path.parent.name[-2:]}": [path] for path in rounds}


def evaluate_arm(root: Path, regime: str, seed: int, arm: str) -> None:
    folder = regime_root(root, regime) / f"seed_{seed}" / slug(arm)
    for name, checkpoints in models_of(root, regime, seed, arm).items():
        score_on_held_out(data_workspace(root, regime, seed), checkpoints, folder / "test" / name)


def score_on_held_out(data, checkpoints: list[Path], folder: Path) -> None:
    """Predict the held-out cases of the data workspace ``data`` with the model ``checkpoints`` (no mirroring)
    into ``folder`` and score them (``folder/summary.json``); a scored folder is left as it is."""
    import torch

    from covnet.dataset import DatasetDescription
    from covnet.evaluation.folders import evaluate_folders
    from covnet.image.io import read_image
    from covnet.inference.predictor import InferenceSettings, Predictor
    summary_file = folder / "summary.json"
    if summary_file.is_file():
        return
    predictor = Predictor.from_files(checkpoints, torch.device("cpu"), InferenceSettings(use_mirroring=False))
    for image_file in sorted(data.images_ts.glob("*_0000.nii.gz")):
        output = folder / image_file.name.replace("_0000", "")
        if not output.is_file():
            image, geometry = read_image(image_file)
            predictor.predict_image(image, geometry, output_file=output)
    evaluate_folders(data.labels_ts, folder, DatasetDescription.load(data.dataset_json), output_json=summary_file)


# ------------------------------------------------------------------------------------------------ scheduling
@dataclass
class Job:
    name: str
    command: list[str]
    needs: list[str]


def jobs_for(regime: str, seeds: list[int], arms: list[str]) -> list[Job]:
    jobs = []
    for seed in seeds:
        prefix = f"{regime}/seed_{seed}"
        jobs.append(Job(f"{prefix}/data", ["data", regime, str(seed)], [] if seed == 0 else [f"{regime}/seed_0/data"]))
        folds = [f"{prefix}/fold_{k}" for k in range(FOLDS)]
        jobs += [Job(name, ["fold", regime, str(seed), str(k)], [f"{prefix}/data"]) for k, name in enumerate(folds)]
        jobs.append(Job(f"{prefix}/control", ["control", regime, str(seed)], [f"{prefix}/data"]))
        jobs.append(Job(f"{prefix}/labels", ["labels", regime, str(seed)], folds))
        for arm in arms:
            needs = folds + ([f"{prefix}/labels"] if shares_first_labels(arm) else [])
            jobs.append(Job(f"{prefix}/{slug(arm)}", ["arm", regime, str(seed), arm], needs))
        for arm in list(SUPERVISED) + arms:
            trained = folds if arm == "base" else [f"{prefix}/{slug(arm)}"]
            jobs.append(Job(f"{prefix}/{slug(arm)}/test", ["evaluate", regime, str(seed), arm], trained))
    return jobs


def run_jobs(root: Path, jobs: list[Job], workers: int, extra: list[str]) -> None:
    """Run the jobs, ``workers`` at a time, each in its own single-threaded process, dependencies first."""
    done_dir = root / ".done"
    done_dir.mkdir(parents=True, exist_ok=True)

    def done(name):
        return (done_dir / slug(name).replace("/", "__")).is_file()
    running: dict[str, subprocess.Popen] = {}
    failed: set[str] = set()
    pending = [job for job in jobs if not done(job.name)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while pending or running:
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                if process.returncode == 0:
                    (done_dir / slug(name).replace("/", "__")).touch()
                else:
                    failed.add(name)
                    print(f"FAILED {name} (exit {process.returncode}); see {root / 'logs'}", flush=True)
        blocked = [job for job in pending if any(need in failed for need in job.needs)]
        for job in blocked:
            failed.add(job.name)
            pending.remove(job)
        ready = [job for job in pending if all(done(need) for need in job.needs)]
        while ready and len(running) < workers:
            job = ready.pop(0)
            pending.remove(job)
            log = root / "logs" / (slug(job.name).replace("/", "__") + ".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as handle:
                running[job.name] = subprocess.Popen([sys.executable, __file__, "--root", str(root), *extra, "--job",
                                                      *job.command], stdout=handle, stderr=subprocess.STDOUT,
                                                     env=environment)
            print(f"{time.strftime('%H:%M:%S')} started {job.name}", flush=True)
        time.sleep(2)
    if failed:
        raise SystemExit(f"{len(failed)} job(s) failed or were blocked: {', '.join(sorted(failed))}")


def run_job(root: Path, command: list[str], schedule: Schedule) -> None:
    import torch
    torch.set_num_threads(1)
    kind, regime, seed = command[0], command[1], int(command[2])
    if kind == "data":
        prepare_seed(root, regime, seed, schedule)
    elif kind == "fold":
        train_fold_job(root, regime, seed, int(command[3]), schedule)
    elif kind == "control":
        train_control(root, regime, seed, schedule)
    elif kind == "labels":
        label_first_round(root, regime, seed, schedule)
    elif kind == "arm":
        selftrain_arm(root, regime, seed, command[3], schedule)
    elif kind == "evaluate":
        evaluate_arm(root, regime, seed, command[3])


def load_schedule(root: Path) -> Schedule:
    """The schedule an experiment folder was started with (its jobs all use it)."""
    values = json.loads((root / SCHEDULE_FILE).read_text())
    values.setdefault("burden_range", None)            # folders made before the field existed
    return Schedule(**{name: tuple(value) if isinstance(value, list) else value for name, value in values.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="experiment folder (resumable)")
    parser.add_argument("--regimes", nargs="+", choices=tuple(REGIMES), default=list(REGIMES))
    parser.add_argument("--seed-batch", type=int, default=3,
                        help="seeds of every regime before the next seeds (partial results stay balanced)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--workers", type=int, default=2, help="jobs at a time (one core each)")
    parser.add_argument("--tiny", action="store_true", help="tiny network and data: proves the script, measures nothing")
    parser.add_argument("--job", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    schedule = TINY if args.tiny else Schedule()
    if args.job:
        run_job(args.root, args.job, load_schedule(args.root))
        return
    args.root.mkdir(parents=True, exist_ok=True)
    stored = args.root / SCHEDULE_FILE
    if stored.is_file() and load_schedule(args.root) != schedule:
        raise SystemExit(f"{args.root}: made with another schedule ({stored}); use a new --root")
    stored.write_text(json.dumps(dataclasses.asdict(schedule)))
    started = time.monotonic()
    batches = [args.seeds[start:start + args.seed_batch] for start in range(0, len(args.seeds), args.seed_batch)]
    jobs = [job for batch in batches for regime in args.regimes for job in jobs_for(regime, batch, args.arms)]
    run_jobs(args.root, jobs, args.workers, ["--tiny"] if args.tiny else [])
    print(f"{', '.join(args.regimes)}: all jobs done in {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
