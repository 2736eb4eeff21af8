"""``covnet_train FOLD``: train one cross-validation fold under the plan, resumably, then validate it.

Everything it reads is the workspace (``plans.json``, the preprocessed cases, ``splits.json``); everything it
writes goes to ``results/fold_K/``: checkpoints (latest, best, final), ``training_log.txt``, ``progress.png``,
``settings.json`` and ``validation/``. Settings are flags (``TrainingSettings``), never subclasses.
"""
from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from covnet.checkpoint import Checkpoint
from covnet.dataset import DatasetDescription, find_cases
from covnet.inference.predictor import InferenceSettings
from covnet.planning.plans import Plan
from covnet.preprocessing.storage import properties_file
from covnet.runtime.atomic import sweep_dead_temporaries, write_json
from covnet.runtime.devices import resolve_device
from covnet.runtime.errors import CovnetError
from covnet.runtime.locking import exclusive
from covnet.runtime.log import logger, setup_logging
from covnet.training.distributed import context_from_environment, device_for, initialise, shutdown
from covnet.training.session import TrainingSession
from covnet.training.splits import cases_for_fold, load_or_create_splits
from covnet.training.validation import validate_fold, validation_is_complete
from covnet.workspace import Workspace

log = logger(__name__)


@dataclass
class TrainingSettings:
    fold: str
    epochs: int = 1000
    iterations_per_epoch: int = 250
    validation_iterations: int = 50
    device: str = "auto"
    num_workers: int | None = None          # None: from the CPU count
    seed: int = 0
    checkpoint_every: int = 50
    pretrained: str | None = None
    compile: bool = False
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    gradient_clip: float = 12.0
    oversample_foreground: float = 0.33
    batch_dice: bool = True                 # nnU-Net's choice for 3D full-resolution configurations
    validation_step_size: float = 0.5
    validation_mirroring: bool = True

    def __post_init__(self):
        for name in ("epochs", "iterations_per_epoch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise CovnetError(None, f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.validation_iterations < 0:
            raise CovnetError(None, f"--val-iters must be >= 0, not {self.validation_iterations}")
        if self.num_workers is not None and self.num_workers < 0:
            raise CovnetError(None, f"--num-workers must be >= 0, not {self.num_workers}")

    @property
    def data_workers(self) -> int:
        """Background augmentation processes: every core but one for the network, at most 12 (nnU-Net's)."""
        if self.num_workers is not None:
            return self.num_workers
        return max(1, min(12, (os.cpu_count() or 2) - 1))

    def to_json(self) -> dict:
        return asdict(self)


def preprocessed_cases(workspace: Workspace) -> list[str]:
    """The labelled cases, each of which must be preprocessed."""
    description = DatasetDescription.load(workspace.dataset_json)
    cases = find_cases(workspace.images_tr, description.file_ending)
    missing = [case for case in cases if not properties_file(workspace.preprocessed_cases, case).is_file()]
    if not cases or missing:
        raise CovnetError(workspace.preprocessed_cases, f"cases {', '.join(missing[:5]) or 'all'} are not "
                                                        "preprocessed; run covnet_plan_and_preprocess first")
    return cases


class _StopRequest:
    """SIGINT/SIGTERM ask the loop to stop after the current iteration and save ``checkpoint_latest``."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self, signal_number, _frame) -> None:
        self.signal = signal_number

    def install(self) -> None:
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signal_number, self)


@dataclass
class TrainingJob:
    """What to train and where: a cross-validation fold, or a self-training round."""
    name: str                                   # recorded in checkpoints: "0".."4", "all", "selftrain_round_01"
    plan: Plan
    train_cases: list[str]
    validation_cases: list[str]
    output_dir: Path
    case_folders: dict[str, Path]               # case -> folder of its preprocessed arrays
    case_weights: dict[str, float] | None = None   # relative draw probabilities (default uniform)


def fold_job(workspace: Workspace, fold: str, context=None) -> TrainingJob:
    """The job of cross-validation fold ``fold``: its split (``splits.json``, created once) and folder."""
    context = context or context_from_environment()
    plan = Plan.load(workspace.plans_json)
    description = DatasetDescription.load(workspace.dataset_json)
    cases = preprocessed_cases(workspace)
    splits = load_or_create_splits(workspace.splits_json, cases, description.groups) if context.is_main else None
    context.barrier()
    splits = splits or load_or_create_splits(workspace.splits_json, cases, description.groups)
    train_cases, validation_cases = cases_for_fold(splits, fold)
    folders = {case: workspace.preprocessed_cases for case in train_cases + validation_cases}
    return TrainingJob(str(fold), plan, train_cases, validation_cases, workspace.fold(fold), folders)


def train_fold(workspace: Workspace, settings: TrainingSettings, resume: bool = False,
               validate_only: bool = False) -> dict | None:
    """Train (or resume) the fold and validate it; return the validation summary (None for fold 'all')."""
    context = context_from_environment()
    device = device_for(context, resolve_device(settings.device))
    initialise(context, device)
    try:
        fold_dir = workspace.fold(settings.fold)
        with _holding(workspace, f"fold_{settings.fold}", context, fold_dir):
            setup_logging(fold_dir / "training_log.txt" if context.is_main else None, rank=context.rank)
            job = fold_job(workspace, settings.fold, context)
            return run_training(workspace, job, settings, resume, validate_only, context, device)
    finally:
        shutdown(context)


@contextlib.contextmanager
def _holding(workspace: Workspace, scope: str, context, folder: Path):
    """Rank 0 holds the lock on the output folder and clears a dead run's temporaries from it."""
    if not context.is_main:
        yield
        return
    with exclusive(workspace.root, scope, "covnet_train"):
        sweep_dead_temporaries(folder)
        yield


def run_training(workspace: Workspace, job: TrainingJob, settings: TrainingSettings, resume: bool,
                 validate_only: bool, context, device: torch.device) -> dict | None:
    """Train ``job`` into ``job.output_dir`` (resuming from its latest checkpoint with ``resume``), then
    predict and score its validation cases whole. A finished job is not redone."""
    output_dir = job.output_dir
    final, latest = output_dir / "checkpoint_final.pth", output_dir / "checkpoint_latest.pth"
    inference = InferenceSettings(step_size=settings.validation_step_size, use_mirroring=settings.validation_mirroring)

    def validate(resume_validation: bool):
        return validate_fold(workspace, Checkpoint.load(final), job.validation_cases, output_dir / "validation",
                             device, inference, resume=resume_validation)

    if validate_only or final.is_file():
        if not final.is_file():
            raise CovnetError(final, "not found: training has not finished (run without --validate-only, or "
                                     "with --continue)")
        if not (validate_only or resume):
            raise CovnetError(output_dir, "already holds a finished training; pass --continue to complete its "
                                          "validation, --validate-only to redo it, or delete the folder to retrain")
        if context.is_main and (validate_only or not validation_is_complete(output_dir / "validation")):
            return validate(resume_validation=not validate_only)
        return None
    if latest.is_file() and not resume:
        raise CovnetError(output_dir, "holds an unfinished training; pass --continue to resume it, or delete the "
                                      "folder to start again")
    if job.plan.device == "cuda" and device.type == "cpu" and context.is_main:
        log.warning("plans.json was made for a GPU (--device cuda) but training runs on the CPU, where its "
                    "network and patch are slow; for CPU training re-plan with covnet_plan_and_preprocess "
                    "--device cpu")
    if context.is_main:
        write_json(output_dir / "settings.json", {"settings": settings.to_json(), "world_size": context.world_size,
                                                  "device": str(device), "train": job.train_cases,
                                                  "validation": job.validation_cases,
                                                  "case_weights": job.case_weights})
    session = TrainingSession(job, settings, context, device)
    if resume and latest.is_file():
        session.restore(Checkpoint.load(latest, map_location=device))
    elif settings.pretrained:
        session.load_pretrained(Checkpoint.load(settings.pretrained, map_location=device))
    stop = _StopRequest()
    stop.install()
    finished = session.run(should_stop=lambda: stop.signal is not None)
    if not finished:
        raise KeyboardInterrupt
    context.barrier()
    return validate(resume_validation=False) if context.is_main else None
