"""The self-training loop: each round the teacher pseudo-labels the unused pool, a student initialised from
the teacher is fine-tuned on the expert cases plus every pseudo-labelled case so far, and becomes the next
teacher. Everything goes to ``results/selftrain/`` under the workspace lock scope ``selftrain``.

Resumable per round: a round with ``selection.json`` keeps its pseudo-labels; its student resumes from
``checkpoint_latest.pth`` through ``run_training`` (or is skipped once finished and validated). Each round
seeds the global random generators from (seed, round), so a student retrained after a kill sees the same
patches and augmentations as in an uninterrupted run (on a CPU with ``--num-workers 0``, bit for bit).

Scale. Under torchrun every rank pseudo-labels its share of the unused pool (case i goes to rank i mod N), rank 0
selects, and the student is fine-tuned with DistributedDataParallel like ``covnet_train``; only rank 0 writes
summaries and validates. Across independent machines, ``run_pseudo_label_part`` (``--num-parts P --part-id I``)
predicts one part of the current round's candidates and stops; the ordinary run (``--continue``) is the merge:
it finds those candidates, predicts any that are missing, selects and fine-tunes.
"""
from __future__ import annotations

import contextlib
import math
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from covnet.checkpoint import Checkpoint
from covnet.inference.predictor import InferenceSettings, Predictor
from covnet.planning.plans import Plan
from covnet.runtime.atomic import atomic_path, read_json, sweep_dead_temporaries, write_json
from covnet.runtime.devices import resolve_device
from covnet.runtime.errors import CovnetError
from covnet.runtime.locking import exclusive
from covnet.runtime.log import logger, setup_logging
from covnet.runtime.sharding import shard
from covnet.selftrain.pseudo_labels import (
    CANDIDATES,
    PSEUDO_LABELS,
    check_pool_names,
    pool_cases,
    predict_candidates,
    pseudo_label_round,
    read_selection,
    self_training_plan,
)
from covnet.selftrain.report import plot_rounds, round_entry, validation_table, write_summary
from covnet.selftrain.teacher import Teacher, choose_teacher, ranking_score
from covnet.training.distributed import DistributedContext, context_from_environment, device_for, initialise, shutdown
from covnet.training.run import run_training
from covnet.training.settings import TrainingJob, TrainingSettings
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
                     teacher: Teacher | None = None) -> dict | None:
    """Self-train into ``results/selftrain/`` and return its summary (None on the ranks other than 0 under
    torchrun). ``teacher`` overrides ``settings.teacher`` (e.g. a model trained on a custom split); on --continue
    the recorded teacher is used."""
    context = context_from_environment()
    device = device_for(context, resolve_device(settings.device))
    initialise(context, device)
    root = workspace.selftrain
    try:
        with _holding(workspace, context):
            if context.is_main:
                if root.exists() and not resume:
                    raise CovnetError(root, "already holds a self-training; pass --continue to resume it, or "
                                            "delete the folder to start again")
                root.mkdir(parents=True, exist_ok=True)
                sweep_dead_temporaries(root)
                teacher = _start_or_resume(workspace, settings, teacher)
            setup_logging(root / "selftrain_log.txt" if context.is_main else None, rank=context.rank)
            context.barrier()                 # rank 0 has recorded the teacher: the others read it back
            if not context.is_main:
                teacher = _start_or_resume(workspace, settings, None)
            return _run_rounds(workspace, settings, teacher, device, context)
    finally:
        shutdown(context)


@contextlib.contextmanager
def _holding(workspace: Workspace, context: DistributedContext):
    """Rank 0 holds the self-training lock for every rank."""
    if not context.is_main:
        yield
        return
    with exclusive(workspace.root, LOCK_SCOPE, COMMAND):
        yield


def run_pseudo_label_part(workspace: Workspace, settings: SelfTrainingSettings, num_parts: int, part_id: int,
                          teacher: Teacher | None = None) -> list[str]:
    """Predict part ``part_id`` of ``num_parts`` of the current round's pseudo-label candidates (the first
    round without ``selection.json``) and stop; return the cases of this part. Parts run at the same time on
    other machines sharing the workspace; ``run_selftraining(..., resume=True)`` afterwards is the merge."""
    if context_from_environment().enabled:
        raise CovnetError(None, "--num-parts/--part-id split the pool across separate runs; under torchrun the "
                                "ranks share it without them")
    shard([], num_parts, part_id)                       # a bad part is refused before any work
    device = resolve_device(settings.device)
    root = workspace.selftrain
    with exclusive(workspace.root, f"{LOCK_SCOPE}_part_{part_id}_of_{num_parts}", COMMAND):
        root.mkdir(parents=True, exist_ok=True)
        setup_logging(root / f"pseudo_label_part_{part_id}_of_{num_parts}_log.txt")
        teacher = _start_or_resume(workspace, settings, teacher)
        plan = self_training_plan(Plan.load(workspace.plans_json))
        pool = _checked_pool(workspace, teacher)
        round_index, used = 1, []
        while (selection := read_selection(workspace.selftrain_round(round_index))) is not None:
            used += selection["cases_added"]
            round_index += 1
        if settings.max_rounds is not None and round_index > settings.max_rounds:
            raise CovnetError(root, f"--max-rounds {settings.max_rounds} rounds are already selected; nothing to do")
        models = _round_teacher_models(workspace, teacher, round_index)
        mine = shard([case for case in pool if case not in used], num_parts, part_id, key=lambda case: case)
        log.info(f"round {round_index}, part {part_id} of {num_parts}: the teacher pseudo-labels {len(mine)} "
                 f"of the unused pool case(s)")
        predictor = Predictor.from_files(models, device, InferenceSettings(use_mirroring=settings.tta))
        predict_candidates(workspace, predictor, plan, mine, workspace.selftrain_round(round_index) / CANDIDATES,
                           settings.min_confidence, _candidate_key(workspace, models, settings))
        log.info(f"round {round_index}, part {part_id} of {num_parts} done; when every part is done, "
                 f"covnet_selftrain --continue selects and fine-tunes")
        return mine


def _checked_pool(workspace: Workspace, teacher: Teacher) -> list[str]:
    pool = pool_cases(workspace)
    if not pool:
        raise CovnetError(workspace.preprocessed_pool, "holds no preprocessed unlabelled CTs; import a pool "
                                                       "(covnet_import_unlabelled) and run covnet_plan_and_preprocess")
    check_pool_names(pool, teacher.train_cases + teacher.validation_cases)
    return pool


def _student_checkpoint(workspace: Workspace, round_index: int) -> Path:
    return workspace.selftrain_round(round_index).checkpoint("final")


def _round_teacher_models(workspace: Workspace, teacher: Teacher, round_index: int) -> list[Path]:
    """Who pseudo-labels round ``round_index``: the teacher's models, then each round's student."""
    if round_index == 1:
        return list(teacher.checkpoints)
    previous = _student_checkpoint(workspace, round_index - 1)
    if not previous.is_file():
        raise CovnetError(previous, f"not found: round {round_index - 1}'s student is not trained yet; run "
                                    "covnet_selftrain --continue first")
    return [previous]


def _candidate_key(workspace: Workspace, models: list[Path], settings: SelfTrainingSettings) -> dict:
    """What a stored candidate was predicted with: a candidate of another teacher or setting is redone."""
    return {"teacher": [_relative(workspace, model) for model in models], "tta": settings.tta,
            "min_confidence": settings.min_confidence}


def _fold_validation(workspace: Workspace, teacher: Teacher, inference: InferenceSettings) -> Path | None:
    """The teacher fold's own ``validation/summary.json`` when it measured the same model on the same cases
    with the same inference settings (so it need not be redone), else None."""
    folder = workspace.fold(teacher.fold)
    summary, stored = folder.validation_summary_file, folder.settings()
    if teacher.pretrained != folder.checkpoint("final") or not summary.is_file() or stored is None:
        return None
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
                   round_index: int, pseudo_folders: dict[str, Path], pretrained: Path, device,
                   context: DistributedContext) -> dict | None:
    round_folder = workspace.selftrain_round(round_index)
    pseudo = list(pseudo_folders)
    train = list(teacher.train_cases) + pseudo
    leaked = sorted(set(train) & set(teacher.validation_cases))
    if leaked:
        raise CovnetError(None, f"held-out case(s) {', '.join(leaked)} would be trained on")
    folders = {case: workspace.preprocessed_cases for case in teacher.train_cases + teacher.validation_cases}
    folders.update(pseudo_folders)
    weights = {**{case: 1.0 for case in teacher.train_cases}, **{case: settings.pseudo_weight for case in pseudo}}
    job = TrainingJob(name=f"selftrain_round_{round_index:02d}", plan=plan, workspace=workspace, folder=round_folder,
                      train_cases=train, validation_cases=list(teacher.validation_cases), case_folders=folders,
                      case_weights=weights)
    training = TrainingSettings(epochs=settings.epochs_per_round,
                                iterations_per_epoch=settings.iterations_per_epoch,
                                validation_iterations=settings.validation_iterations, device=settings.device,
                                num_workers=settings.num_workers, seed=settings.seed + round_index,
                                checkpoint_every=settings.checkpoint_every, pretrained=str(pretrained),
                                initial_lr=settings.initial_lr, validation_mirroring=settings.tta)
    seed_round(settings.seed, round_index)
    log.info(f"round {round_index}: student fine-tuned from {_relative(workspace, pretrained)} on "
             f"{len(teacher.train_cases)} expert + {len(pseudo)} pseudo-labelled cases (weight "
             f"{settings.pseudo_weight:g}), {settings.epochs_per_round} x {settings.iterations_per_epoch} iterations")
    started = any(round_folder.checkpoint(name).is_file() for name in ("latest", "final"))
    run_training(job, training, resume=started, validate_only=False, context=context, device=device)
    return round_folder.validation_summary()


def _pseudo_label(workspace: Workspace, settings: SelfTrainingSettings, plan: Plan, round_index: int,
                  models: list[Path], unused: list[str], device, context: DistributedContext) -> dict:
    """Round ``round_index``'s selection: every rank predicts its share of the unused pool, rank 0 selects."""
    round_dir = workspace.selftrain_round(round_index)
    log.info(f"round {round_index}: the teacher ({', '.join(_relative(workspace, m) for m in models)}) "
             f"pseudo-labels {len(unused)} unused pool case(s)")
    key = _candidate_key(workspace, models, settings)
    predictor = Predictor.from_files(models, device, InferenceSettings(use_mirroring=settings.tta))
    if context.enabled:
        predict_candidates(workspace, predictor, plan, shard(unused, context.world_size, context.rank,
                                                             key=lambda case: case),
                           round_dir / CANDIDATES, settings.min_confidence, key)
        context.barrier()
    if context.is_main:               # every candidate is there by now (the ranks' or an earlier part's)
        pseudo_label_round(workspace, round_index, round_dir, predictor, plan, unused, settings.cases_per_round,
                           settings.min_confidence, key, settings.seed)
    context.barrier()
    return read_selection(round_dir)


def _run_rounds(workspace: Workspace, settings: SelfTrainingSettings, teacher: Teacher, device,
                context: DistributedContext) -> dict | None:
    plan = self_training_plan(Plan.load(workspace.plans_json))
    pool = _checked_pool(workspace, teacher)
    inference = InferenceSettings(use_mirroring=settings.tta)
    log.info(f"teacher: {teacher.describe()}; held-out validation cases: {', '.join(teacher.validation_cases)}")
    teacher_entry = _teacher_entry(workspace, teacher, device, inference) if context.is_main else None
    used: list[str] = []
    pseudo_folders: dict[str, Path] = {}
    rounds: list[dict] = []
    round_index = 1
    while settings.max_rounds is None or round_index <= settings.max_rounds:
        round_dir = workspace.selftrain_round(round_index)
        selection = read_selection(round_dir)
        if selection is None:
            unused = [case for case in pool if case not in used]
            if not unused:
                break
            models = _round_teacher_models(workspace, teacher, round_index)
            selection = _pseudo_label(workspace, settings, plan, round_index, models, unused, device, context)
        taken = ", ".join(f"{case} ({'n/a' if c is None else f'{c:.4f}'})"
                          for case, c in selection["confidence"].items())
        log.info(f"round {round_index}: pool {selection['pool_size_before']} -> {selection['pool_size']} case(s); "
                 f"taken (confidence): {taken}")
        for case in selection["cases_added"]:
            used.append(case)
            pseudo_folders[case] = round_dir / PSEUDO_LABELS
        pretrained = teacher.pretrained if round_index == 1 else _student_checkpoint(workspace, round_index - 1)
        validation = _train_student(workspace, settings, plan, teacher, round_index, pseudo_folders, pretrained,
                                    device, context)
        if context.is_main:
            rounds.append(round_entry(selection, validation))
            _publish(workspace, teacher_entry, rounds)
        round_index += 1
    if round_index == 1:
        raise CovnetError(workspace.selftrain, "no round was run (the pool is empty or already used)")
    if not context.is_main:
        return None
    final = _write_final(workspace, settings, rounds, plan)
    summary = _publish(workspace, teacher_entry, rounds, final)
    log.info("validation on the held-out cases (teacher vs each round's student):\n" + validation_table(summary))
    log.info(f"final model: round {final['round']} ({final['reason']}): "
             f"{workspace.selftrain_final / 'checkpoint_final.pth'}")
    return summary


def _publish(workspace: Workspace, teacher_entry: dict | None, rounds: list[dict], final: dict | None = None
             ) -> dict:
    """Rewrite ``summary.json`` and ``progress.png`` from the rounds so far; return the summary."""
    summary = write_summary(workspace.selftrain / "summary.json", teacher_entry, rounds, final)
    plot_rounds(summary, workspace.selftrain / "progress.png")
    return summary


def _write_final(workspace: Workspace, settings: SelfTrainingSettings, rounds: list[dict], plan: Plan) -> dict:
    """``final/checkpoint_final.pth``: a copy of the last student, or of the best one with ``keep_best``."""
    chosen, reason = rounds[-1], "last"
    if settings.keep_best:
        def score(entry):
            value = ranking_score(entry["validation"] or {}, plan)
            return -math.inf if math.isnan(value) else value
        chosen, reason = max(rounds, key=score), "best"
    source = _student_checkpoint(workspace, chosen["round"])
    with atomic_path(workspace.selftrain_final / "checkpoint_final.pth") as temporary:
        shutil.copyfile(source, temporary)
    final = {"round": chosen["round"], "reason": reason, "source": _relative(workspace, source),
             "validation": chosen["validation"]}
    write_json(workspace.selftrain_final / "model.json", final)
    return final
