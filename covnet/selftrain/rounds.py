"""The self-training loop: each round the teacher pseudo-labels the unused pool, a student initialised from
the teacher is fine-tuned on the expert cases plus every pseudo-labelled case so far, and becomes the next
teacher. Everything goes to ``results/selftrain/`` under the workspace lock scope ``selftrain``.

Resumable per round: a round with ``selection.json`` keeps its pseudo-labels; its student resumes from
``checkpoint_latest.pth`` through ``run_training`` (or is skipped once finished and validated). Each round
seeds the global random generators from (seed, round), so a student retrained after a kill sees the same
patches and augmentations as in an uninterrupted run (on a CPU with ``--num-workers 0``, bit for bit).
"""
from __future__ import annotations

import math
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from covnet.atomic import atomic_path, read_json, sweep_dead_temporaries, write_json
from covnet.checkpoint import Checkpoint
from covnet.errors import CovnetError
from covnet.inference.predictor import InferenceSettings, Predictor, resolve_device
from covnet.locking import exclusive
from covnet.log import logger, setup_logging
from covnet.planning.plans import Plan
from covnet.selftrain.pseudo_labels import (PSEUDO_LABELS, check_pool_names, pool_cases, pseudo_label_round,
                                            read_selection, self_training_plan)
from covnet.selftrain.report import plot_rounds, round_entry, validation_table, write_summary
from covnet.selftrain.teacher import Teacher, choose_teacher, ranking_score
from covnet.training.distributed import context_from_environment
from covnet.training.run import TrainingJob, TrainingSettings, run_training
from covnet.training.validation import validate_fold
from covnet.workspace import Workspace

log = logger(__name__)
LOCK_SCOPE = "selftrain"
COMMAND = "covnet_selftrain"
# Settings that define the experiment: a --continue with other values would mix two experiments.
FIXED_SETTINGS = ("teacher", "cases_per_round", "epochs_per_round", "iterations_per_epoch", "validation_iterations",
                  "min_confidence", "pseudo_weight", "seed", "tta", "initial_lr")


@dataclass
class SelfTrainingSettings:
    teacher: str = "best"
    cases_per_round: int = 2
    epochs_per_round: int = 50
    iterations_per_epoch: int = 250
    validation_iterations: int = 50
    min_confidence: float = 0.9
    pseudo_weight: float = 0.5
    max_rounds: int | None = None            # None: until the pool is used up
    keep_best: bool = False
    device: str = "auto"
    num_workers: int | None = None
    seed: int = 0
    tta: bool = True                         # mirroring for the pseudo-labels and every validation
    initial_lr: float = 1e-3
    checkpoint_every: int = 10

    def __post_init__(self):
        for name in ("cases_per_round", "epochs_per_round", "iterations_per_epoch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise CovnetError(None, f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.max_rounds is not None and self.max_rounds < 1:
            raise CovnetError(None, f"--max-rounds must be at least 1, not {self.max_rounds}")
        if not 0 <= self.min_confidence <= 1.01:
            raise CovnetError(None, f"--min-confidence must lie in [0, 1] (above 1: ignore every voxel), "
                                    f"not {self.min_confidence}")
        if not (self.pseudo_weight > 0 and math.isfinite(self.pseudo_weight)):
            raise CovnetError(None, f"--pseudo-weight must be > 0, not {self.pseudo_weight}")
        if self.initial_lr <= 0:
            raise CovnetError(None, f"--lr must be > 0, not {self.initial_lr}")


def _relative(workspace: Workspace, path: Path) -> str:
    path = Path(path)
    return str(path.relative_to(workspace.root)) if path.is_relative_to(workspace.root) else str(path)


def _absolute(workspace: Workspace, path: str) -> Path:
    return workspace.root / path if not Path(path).is_absolute() else Path(path)


def _teacher_json(workspace: Workspace, teacher: Teacher) -> dict:
    data = asdict(teacher)
    data["checkpoints"] = [_relative(workspace, path) for path in teacher.checkpoints]
    data["pretrained"] = _relative(workspace, teacher.pretrained)
    return data


def _teacher_from_json(workspace: Workspace, data: dict) -> Teacher:
    return Teacher(**{**data, "checkpoints": [_absolute(workspace, path) for path in data["checkpoints"]],
                      "pretrained": _absolute(workspace, data["pretrained"])})


def _start_or_resume(workspace: Workspace, settings: SelfTrainingSettings, teacher: Teacher | None) -> Teacher:
    """The teacher of this self-training: recorded in ``settings.json`` at the start, read back on --continue."""
    path = workspace.selftrain / "settings.json"
    if path.is_file():
        stored = read_json(path, "")
        changed = [name for name in FIXED_SETTINGS if stored["settings"].get(name) != getattr(settings, name)]
        if changed:
            flags = ", ".join(f"--{name.replace('_', '-')} {stored['settings'].get(name)}" for name in changed)
            raise CovnetError(path, f"this self-training was started with {flags}; continue it with the same "
                                    "settings, or delete results/selftrain to start another")
        return _teacher_from_json(workspace, stored["teacher"])
    teacher = teacher or choose_teacher(workspace, settings.teacher)
    write_json(path, {"settings": asdict(settings), "teacher": _teacher_json(workspace, teacher)})
    return teacher


def seed_round(seed: int, round_index: int) -> None:
    """Seed python, numpy and torch from (seed, round): a retrained student repeats the same draws."""
    value = (seed * 1_000_003 + round_index) % (2 ** 31)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def run_selftraining(workspace: Workspace, settings: SelfTrainingSettings, resume: bool = False,
                     teacher: Teacher | None = None) -> dict:
    """Self-train into ``results/selftrain/`` and return its summary. ``teacher`` overrides ``settings.teacher``
    (e.g. a model trained on a custom split); on --continue the recorded teacher is used."""
    if context_from_environment().enabled:
        raise CovnetError(None, "covnet_selftrain runs in one process: start it without torchrun (its student "
                                "training does not use DistributedDataParallel yet)")
    device = resolve_device(settings.device)
    root = workspace.selftrain
    with exclusive(workspace.root, LOCK_SCOPE, COMMAND):
        if root.exists() and not resume:
            raise CovnetError(root, "already holds a self-training; pass --continue to resume it, or delete the "
                                    "folder to start again")
        root.mkdir(parents=True, exist_ok=True)
        sweep_dead_temporaries(root)
        setup_logging(root / "selftrain_log.txt")
        teacher = _start_or_resume(workspace, settings, teacher)
        return _run_rounds(workspace, settings, teacher, device)


def _fold_validation(workspace: Workspace, teacher: Teacher, inference: InferenceSettings) -> Path | None:
    """The teacher fold's own ``validation/summary.json`` when it measured the same model on the same cases
    with the same inference settings (so it need not be redone), else None."""
    folder = workspace.fold(teacher.fold)
    summary, settings_file = folder / "validation" / "summary.json", folder / "settings.json"
    if teacher.pretrained != folder / "checkpoint_final.pth" or not (summary.is_file() and settings_file.is_file()):
        return None
    stored = read_json(settings_file, "")
    same = (stored["settings"].get("validation_mirroring") == inference.use_mirroring
            and stored["settings"].get("validation_step_size") == inference.step_size
            and sorted(stored.get("validation", [])) == sorted(teacher.validation_cases))
    return summary if same else None


def _teacher_entry(workspace: Workspace, teacher: Teacher, device, inference: InferenceSettings) -> dict:
    """The teacher's validation on the held-out cases, predicted with the students' inference settings (for
    an ensemble: its fold ``teacher.fold`` alone, the only member that never trained on those cases)."""
    folder = workspace.selftrain / "teacher_validation"
    source = _fold_validation(workspace, teacher, inference) or folder / "summary.json"
    summary = read_json(source, "") if source.is_file() else \
        validate_fold(workspace, Checkpoint.load(teacher.pretrained), teacher.validation_cases, folder, device,
                      inference, resume=True)
    return {"mode": teacher.mode, "fold": teacher.fold, "folds": teacher.folds,
            "validated_model": _relative(workspace, teacher.pretrained),
            "validation_summary": _relative(workspace, source),
            "validation": None if summary is None else summary["mean"]}


def _train_student(workspace: Workspace, settings: SelfTrainingSettings, plan: Plan, teacher: Teacher,
                   round_index: int, pseudo_folders: dict[str, Path], pretrained: Path, device) -> dict | None:
    round_dir = workspace.selftrain_round(round_index)
    pseudo = list(pseudo_folders)
    train = list(teacher.train_cases) + pseudo
    leaked = sorted(set(train) & set(teacher.validation_cases))
    if leaked:
        raise CovnetError(None, f"held-out case(s) {', '.join(leaked)} would be trained on")
    folders = {case: workspace.preprocessed_cases for case in teacher.train_cases + teacher.validation_cases}
    folders.update(pseudo_folders)
    weights = {**{case: 1.0 for case in teacher.train_cases}, **{case: settings.pseudo_weight for case in pseudo}}
    job = TrainingJob(f"selftrain_round_{round_index:02d}", plan, train, list(teacher.validation_cases), round_dir,
                      folders, weights)
    training = TrainingSettings(fold=job.name, epochs=settings.epochs_per_round,
                                iterations_per_epoch=settings.iterations_per_epoch,
                                validation_iterations=settings.validation_iterations, device=settings.device,
                                num_workers=settings.num_workers, seed=settings.seed + round_index,
                                checkpoint_every=settings.checkpoint_every, pretrained=str(pretrained),
                                initial_lr=settings.initial_lr, validation_mirroring=settings.tta)
    seed_round(settings.seed, round_index)
    log.info(f"round {round_index}: student fine-tuned from {_relative(workspace, pretrained)} on "
             f"{len(teacher.train_cases)} expert + {len(pseudo)} pseudo-labelled cases (weight "
             f"{settings.pseudo_weight:g}), {settings.epochs_per_round} x {settings.iterations_per_epoch} iterations")
    run_training(workspace, job, training, True, False, context_from_environment(), device)
    summary_file = round_dir / "validation" / "summary.json"
    return read_json(summary_file, "") if summary_file.is_file() else None


def _run_rounds(workspace: Workspace, settings: SelfTrainingSettings, teacher: Teacher, device) -> dict:
    plan = self_training_plan(Plan.load(workspace.plans_json))
    pool = pool_cases(workspace)
    if not pool:
        raise CovnetError(workspace.preprocessed_pool, "holds no preprocessed unlabelled CTs; import a pool "
                                                       "(covnet_import_unlabelled) and run covnet_plan_and_preprocess")
    check_pool_names(pool, teacher.train_cases + teacher.validation_cases)
    inference = InferenceSettings(use_mirroring=settings.tta)
    log.info(f"teacher: {teacher.describe()}; held-out validation cases: {', '.join(teacher.validation_cases)}")
    teacher_entry = _teacher_entry(workspace, teacher, device, inference)
    used: list[str] = []
    pseudo_folders: dict[str, Path] = {}
    rounds: list[dict] = []
    round_index = 1
    while settings.max_rounds is None or round_index <= settings.max_rounds:
        round_dir = workspace.selftrain_round(round_index)
        previous = workspace.selftrain_round(round_index - 1) / "checkpoint_final.pth"
        models = teacher.checkpoints if round_index == 1 else [previous]
        selection = read_selection(round_dir)
        if selection is None:
            unused = [case for case in pool if case not in used]
            if not unused:
                break
            log.info(f"round {round_index}: the teacher ({', '.join(_relative(workspace, m) for m in models)}) "
                     f"pseudo-labels {len(unused)} unused pool case(s)")
            key = {"teacher": [_relative(workspace, model) for model in models], "tta": settings.tta,
                   "min_confidence": settings.min_confidence}
            predictor = Predictor.from_files(models, device, inference)
            selection = pseudo_label_round(workspace, round_index, round_dir, predictor, plan, unused,
                                           settings.cases_per_round, settings.min_confidence, key, settings.seed)
            del predictor
        taken = ", ".join(f"{case} ({'n/a' if c is None else f'{c:.4f}'})"
                          for case, c in selection["confidence"].items())
        log.info(f"round {round_index}: pool {selection['pool_size_before']} -> {selection['pool_size']} case(s); "
                 f"taken (confidence): {taken}")
        for case in selection["cases_added"]:
            used.append(case)
            pseudo_folders[case] = round_dir / PSEUDO_LABELS
        pretrained = teacher.pretrained if round_index == 1 else previous
        validation = _train_student(workspace, settings, plan, teacher, round_index, pseudo_folders, pretrained,
                                    device)
        rounds.append(round_entry(selection, validation))
        summary = write_summary(workspace.selftrain / "summary.json", teacher_entry, rounds)
        plot_rounds(summary, workspace.selftrain / "progress.png")
        round_index += 1
    if not rounds:
        raise CovnetError(workspace.selftrain, "no round was run (the pool is empty or already used)")
    final = _write_final(workspace, settings, rounds, plan)
    summary = write_summary(workspace.selftrain / "summary.json", teacher_entry, rounds, final)
    plot_rounds(summary, workspace.selftrain / "progress.png")
    log.info("validation on the held-out cases (teacher vs each round's student):\n" + validation_table(summary))
    log.info(f"final model: round {final['round']} ({final['reason']}): "
             f"{workspace.selftrain_final / 'checkpoint_final.pth'}")
    return summary


def _write_final(workspace: Workspace, settings: SelfTrainingSettings, rounds: list[dict], plan: Plan) -> dict:
    """``final/checkpoint_final.pth``: a copy of the last student, or of the best one with ``keep_best``."""
    chosen, reason = rounds[-1], "last"
    if settings.keep_best:
        def score(entry):
            value = ranking_score(entry["validation"] or {}, plan)
            return -math.inf if math.isnan(value) else value
        chosen, reason = max(rounds, key=score), "best"
    source = workspace.selftrain_round(chosen["round"]) / "checkpoint_final.pth"
    with atomic_path(workspace.selftrain_final / "checkpoint_final.pth") as temporary:
        shutil.copyfile(source, temporary)
    final = {"round": chosen["round"], "reason": reason, "source": _relative(workspace, source),
             "validation": chosen["validation"]}
    write_json(workspace.selftrain_final / "model.json", final)
    return final
