"""``covnet_train FOLD``: train one cross-validation fold under the plan, resumably, then validate it.

Everything it reads is the workspace (``plans.json``, the preprocessed cases, ``splits.json``); everything it
writes goes to the fold's model folder (``covnet.workspace.ModelFolder``): checkpoints (latest, best, final),
``training_log.txt``, ``progress.png``, ``settings.json`` and ``validation/``. Settings are flags
(``covnet.training.settings.TrainingSettings``), never subclasses.

``train_fold`` is the command; ``run_training`` trains any ``TrainingJob`` (a self-training round's student too)
into its folder. Every refusal (a fold that does not exist, a finished training without ``--continue``, a
continued one with another recipe, a missing ``--pretrained``) comes before anything is written, so a refused
start leaves nothing behind.

``--continue`` (``resume``) picks up ``checkpoint_latest.pth``; on a finished training with more ``--epochs``
than it ran, it extends it from ``checkpoint_final.pth`` (the learning rate follows the longer schedule) and
redoes the validation; with as many, it completes the validation; with fewer, it is refused. With no
checkpoint at all it says so and starts from scratch.
"""
from __future__ import annotations

import contextlib
import shutil
import signal
from dataclasses import fields

import torch

from covnet.checkpoint import Checkpoint
from covnet.dataset import DatasetDescription, find_cases
from covnet.inference.predictor import InferenceSettings
from covnet.planning.plans import Plan
from covnet.preprocessing.run import require_current_cases
from covnet.preprocessing.storage import properties_file
from covnet.runtime.atomic import sweep_dead_temporaries, write_json
from covnet.runtime.devices import resolve_device
from covnet.runtime.errors import CovnetError
from covnet.runtime.locking import holding
from covnet.runtime.log import logger, setup_logging
from covnet.runtime.settings import flag_text
from covnet.training.distributed import DistributedContext, context_from_environment, device_for, initialise, shutdown
from covnet.training.session import TrainingSession
from covnet.training.settings import TrainingJob, TrainingSettings
from covnet.training.splits import cases_for_fold, fold_names, load_or_make_splits, save_splits
from covnet.training.validation import validate_fold
from covnet.workspace import ALL_FOLDS, PREPROCESSED_SCOPE, ModelFolder, Workspace, check_fold, fold_scope

log = logger(__name__)
COMMAND = "covnet_train"


def preprocessed_cases(workspace: Workspace, description: DatasetDescription) -> list[str]:
    """The labelled cases, each of which must be preprocessed."""
    cases = find_cases(workspace.images_tr, description.file_ending)
    missing = [case for case in cases if not properties_file(workspace.preprocessed_cases, case).is_file()]
    if not cases or missing:
        raise CovnetError(workspace.preprocessed_cases, f"cases {', '.join(missing[:5]) or 'all'} are not "
                                                        "preprocessed; run covnet_plan_and_preprocess first")
    require_current_cases(workspace.preprocessed_cases, cases, Plan.load(workspace.plans_json))
    return cases


def fold_job(workspace: Workspace, fold: int | str, *, num_folds: int | None = None,
             context: DistributedContext | None = None, save_new_split: bool = True) -> TrainingJob:
    """The job of cross-validation fold ``fold`` (or ``all``): its cases and its model folder. The split is
    ``splits.json``, made with ``num_folds`` folds (default 5) when there is none yet and written (by rank 0,
    unless ``save_new_split`` is off) only once the fold is known to exist in it."""
    context = context or context_from_environment()
    plan = Plan.load(workspace.plans_json)
    description = DatasetDescription.load(workspace.dataset_json)
    cases = preprocessed_cases(workspace, description)
    if str(fold).strip().lower() == ALL_FOLDS:
        name, train_cases, validation_cases = ALL_FOLDS, sorted(cases), []
    else:
        splits, is_new = load_or_make_splits(workspace.splits_json, cases, description.groups, num_folds)
        name = check_fold(fold, fold_names(splits))
        if is_new and context.is_main and save_new_split:
            save_splits(workspace.splits_json, splits)
        train_cases, validation_cases = cases_for_fold(splits, name)
    folders = {case: workspace.preprocessed_cases for case in train_cases + validation_cases}
    return TrainingJob(name=name, plan=plan, workspace=workspace, folder=workspace.fold(name),
                       train_cases=train_cases, validation_cases=validation_cases, case_folders=folders)


def recorded_settings(folder: ModelFolder) -> TrainingSettings | None:
    """The settings a training in ``folder`` was started with (its ``settings.json``), if any."""
    stored = folder.settings()
    return None if stored is None else TrainingSettings.from_json(stored.get("settings", {}))


def train_fold(workspace: Workspace, fold: int | str, settings: TrainingSettings, *, resume: bool = False,
               validate_only: bool = False, num_folds: int | None = None) -> dict | None:
    """Train (or resume, or extend) fold ``fold`` and validate it; return the validation summary (None for fold
    'all', and on the ranks other than 0 under torchrun)."""
    context = context_from_environment()
    device = device_for(context, resolve_device(settings.device))
    initialise(context, device)
    try:
        name = fold_job(workspace, fold, num_folds=num_folds, context=context, save_new_split=False).name
        # Rank 0 holds, for every rank, the fold's folder for writing and the preprocessed cases for reading (so
        # that covnet_plan_and_preprocess cannot rewrite them under the training); a new split is written only
        # then, so that a refused start writes nothing.
        with holding(workspace.root, fold_scope(name), COMMAND, reading=(PREPROCESSED_SCOPE,),
                     main_process=context.is_main):
            job = fold_job(workspace, fold, num_folds=num_folds, context=context)
            context.barrier()           # the other ranks read the split rank 0 has just written
            return run_training(job, settings, resume=resume, validate_only=validate_only, context=context,
                                device=device, log_to_folder=True)
    finally:
        shutdown(context)


class _StopRequest:
    """SIGINT/SIGTERM ask the loop to stop after the current iteration and save ``checkpoint_latest``. Under
    torchrun a signal reaches the ranks at different moments, or only one of them: the ranks agree on it
    (``DistributedContext.any_rank``) at every check, so that all stop at the same iteration instead of one
    leaving the others waiting in the gradient all-reduce."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self, signal_number, _frame) -> None:
        self.signal = signal_number

    def agreed(self, context: DistributedContext, device: torch.device) -> bool:
        """Whether any rank was asked to stop (every rank calls this at the same points of the loop)."""
        return context.any_rank(self.signal is not None, device)

    @contextlib.contextmanager
    def installed(self):
        """The handlers for the block only: after it (validation, the next self-training round) Ctrl-C and
        SIGTERM stop the process again."""
        previous = {number: signal.signal(number, self) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def check_same_recipe(folder: ModelFolder, recorded: TrainingSettings, settings: TrainingSettings) -> None:
    """A continued training keeps its recipe: only ``TrainingSettings.CHANGEABLE_ON_CONTINUE`` may differ."""
    changed = [item.name for item in fields(TrainingSettings) if item.name not in
               TrainingSettings.CHANGEABLE_ON_CONTINUE and getattr(recorded, item.name) != getattr(settings, item.name)]
    if changed:
        started = ", ".join(flag_text(TrainingSettings, name, getattr(recorded, name)) for name in changed)
        asked = ", ".join(flag_text(TrainingSettings, name, getattr(settings, name)) for name in changed)
        raise CovnetError(folder.path, f"holds a training started with {started}; it cannot be continued with "
                                       f"{asked} (continue it with its own settings, or delete the folder to start "
                                       "again)")


def _starting_point(job: TrainingJob, settings: TrainingSettings, resume: bool, device) -> Checkpoint | None:
    """The checkpoint a training continues from (None: from scratch); every refusal of a start is here."""
    folder = job.folder
    final, latest = folder.checkpoint("final"), folder.checkpoint("latest")
    if not resume:
        if final.is_file():
            raise CovnetError(folder.path, "already holds a finished training; pass --continue to complete its "
                                           "validation or to extend it (with more --epochs), --validate-only to "
                                           "redo the validation, or delete the folder to retrain")
        if latest.is_file():
            raise CovnetError(folder.path, "holds an unfinished training; pass --continue to resume it, or delete the "
                                           "folder to start again")
        return None
    source = latest if latest.is_file() else final if final.is_file() else None
    if source is None:
        return None
    checkpoint = Checkpoint.load(source, map_location=device)
    check_same_recipe(folder, TrainingSettings.from_json(checkpoint.settings), settings)
    if settings.epochs < checkpoint.epoch:
        raise CovnetError(source, f"holds {checkpoint.epoch} epochs; --epochs {settings.epochs} cannot shorten a "
                                  "training (delete the folder to retrain with fewer)")
    return checkpoint


def run_training(job: TrainingJob, settings: TrainingSettings, *, resume: bool, validate_only: bool,
                 context: DistributedContext, device: torch.device, log_to_folder: bool = False) -> dict | None:
    """Train ``job`` into ``job.folder`` (with ``resume``: from its latest checkpoint, or extending a finished
    one to ``settings.epochs``), then predict and score its validation cases whole; return the validation
    summary. ``validate_only`` redoes only the validation of the final checkpoint. ``log_to_folder``: the log
    also goes to the folder's ``training_log.txt``. A finished job is not redone."""
    folder = job.folder
    final = folder.checkpoint("final")
    inference = InferenceSettings(step_size=settings.validation_step_size, use_mirroring=settings.validation_mirroring)
    if validate_only:
        if not final.is_file():
            raise CovnetError(final, "not found: training has not finished (run without --validate-only, or "
                                     "with --continue)")
        start, finished, pretrained = None, True, None
    else:
        start = _starting_point(job, settings, resume, device)
        finished = start is not None and final.is_file() and start.epoch == settings.epochs
        pretrained = Checkpoint.load(settings.pretrained, map_location=device) \
            if start is None and settings.pretrained else None
    # Every check has passed: from here on the folder is written.
    if context.is_main:
        folder.path.mkdir(parents=True, exist_ok=True)
        sweep_dead_temporaries(folder.path)
    if log_to_folder:
        setup_logging(folder.log_file if context.is_main else None, rank=context.rank)

    def validate(resume_validation: bool) -> dict | None:
        return validate_fold(job.workspace, Checkpoint.load(final), job.validation_cases, folder.validation_dir,
                             device, inference, resume=resume_validation)

    if finished:
        if not context.is_main:
            return None
        if validate_only or folder.validation_summary() is None:
            return validate(resume_validation=not validate_only)
        log.info(f"{folder.path}: the training finished ({start.epoch} epochs) and is validated; nothing to do")
        return folder.validation_summary()
    if resume and start is None:
        log.info(f"{folder.path} holds no checkpoint yet; training starts at epoch 1")
    extending = start is not None and final.is_file() and not folder.checkpoint("latest").is_file()
    if extending and context.is_main:
        log.info(f"extending the finished training from {start.epoch} to {settings.epochs} epochs (the learning "
                 f"rate follows the {settings.epochs}-epoch schedule); its validation is redone at the end")
        shutil.rmtree(folder.validation_dir, ignore_errors=True)
    if job.plan.device == "cuda" and device.type == "cpu" and context.is_main:
        log.warning("plans.json was made for a GPU (--device cuda) but training runs on the CPU, where its "
                    "network and patch are slow; for CPU training re-plan with covnet_plan_and_preprocess "
                    "--device cpu")
    if context.is_main:
        write_json(folder.settings_file, {"settings": settings.to_json(), "world_size": context.world_size,
                                          "device": str(device), "train": job.train_cases,
                                          "validation": job.validation_cases, "pseudo_cases": job.pseudo_cases,
                                          "expert_share": job.expert_share, "strong_noise": job.strong_noise})
    session = TrainingSession(job, settings, context, device)
    if start is not None:
        session.restore(start)
    elif pretrained is not None:
        session.load_pretrained(pretrained)
    with _StopRequest().installed() as stop:
        finished = session.run(should_stop=lambda: stop.agreed(context, device))
        context.barrier()           # the ranks leave together, after rank 0 has written its checkpoint
    if not finished:
        raise KeyboardInterrupt
    return validate(resume_validation=False) if context.is_main else None
