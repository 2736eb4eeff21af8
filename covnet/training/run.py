"""``covnet_train FOLD``: train one cross-validation fold under the plan, resumably, then validate it.

Everything it reads is the workspace (``plans.json``, the preprocessed cases, ``splits.json``); everything it
writes goes to ``results/fold_K/``: checkpoints (latest, best, final), ``training_log.txt``, ``progress.png``,
``settings.json`` and ``validation/``. Settings are flags (``TrainingSettings``), never subclasses.
"""
from __future__ import annotations

import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from covnet.atomic import sweep_dead_temporaries, write_json
from covnet.checkpoint import Checkpoint
from covnet.dataset import DatasetDescription, find_cases
from covnet.errors import CovnetError
from covnet.inference.predictor import InferenceSettings, resolve_device
from covnet.locking import exclusive
from covnet.log import logger, setup_logging
from covnet.planning.plans import Plan
from covnet.preprocessing.storage import properties_file
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
    # Self-training: extra (pseudo-labelled) case folders and the weight their cases are drawn with.
    extra_case_folders: list[str] = field(default_factory=list)
    extra_case_weight: float = 1.0

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


def train_fold(workspace: Workspace, settings: TrainingSettings, resume: bool = False,
               validate_only: bool = False) -> dict | None:
    """Train (or resume) the fold and validate it; return the validation summary (None for fold 'all')."""
    context = context_from_environment()
    device = device_for(context, resolve_device(settings.device))
    fold_dir = workspace.fold(settings.fold)
    initialise(context, device)
    try:
        if context.is_main:
            with exclusive(workspace.root, f"fold_{settings.fold}", "covnet_train"):
                sweep_dead_temporaries(fold_dir)
                return _train_and_validate(workspace, settings, resume, validate_only, context, device, fold_dir)
        return _train_and_validate(workspace, settings, resume, validate_only, context, device, fold_dir)
    finally:
        shutdown(context)


def _train_and_validate(workspace, settings, resume, validate_only, context, device, fold_dir: Path):
    setup_logging(fold_dir / "training_log.txt" if context.is_main else None, rank=context.rank)
    plan = Plan.load(workspace.plans_json)
    description = DatasetDescription.load(workspace.dataset_json)
    cases = preprocessed_cases(workspace)
    splits = load_or_create_splits(workspace.splits_json, cases, description.groups) if context.is_main else None
    context.barrier()
    splits = splits or load_or_create_splits(workspace.splits_json, cases, description.groups)
    train_cases, validation_cases = cases_for_fold(splits, settings.fold)
    final, latest = fold_dir / "checkpoint_final.pth", fold_dir / "checkpoint_latest.pth"
    inference = InferenceSettings(step_size=settings.validation_step_size, use_mirroring=settings.validation_mirroring)

    if validate_only or final.is_file():
        if not final.is_file():
            raise CovnetError(final, "not found: the fold has not finished training (run covnet_train without "
                                     "--validate-only, or with --continue)")
        if not (validate_only or resume):
            raise CovnetError(fold_dir, "already holds a finished training; pass --continue to complete its "
                                        "validation, --validate-only to redo it, or delete the folder to retrain")
        if context.is_main and (validate_only or not validation_is_complete(fold_dir / "validation")):
            return validate_fold(workspace, Checkpoint.load(final), validation_cases, fold_dir / "validation",
                                 device, inference, resume=not validate_only)
        return None
    if latest.is_file() and not resume:
        raise CovnetError(fold_dir, "holds an unfinished training; pass --continue to resume it, or delete the "
                                    "folder to start again")

    if context.is_main:
        write_json(fold_dir / "settings.json", {"settings": settings.to_json(), "world_size": context.world_size,
                                                "device": str(device), "train": train_cases,
                                                "validation": validation_cases})
    if plan.device == "cuda" and device.type == "cpu" and context.is_main:
        log.warning("plans.json was made for a GPU (--device cuda) but training runs on the CPU, where its "
                    "network and patch are slow; for CPU training re-plan with covnet_plan_and_preprocess "
                    "--device cpu")
    session = TrainingSession(workspace, plan, settings, train_cases, validation_cases, context, device, fold_dir)
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
    if context.is_main:
        return validate_fold(workspace, Checkpoint.load(final), validation_cases, fold_dir / "validation", device,
                             inference)
    return None
