"""Starting, resuming and sharding a self-training: the entry points ``covnet_selftrain`` calls.

A start checks everything it needs (a trained teacher, cases to hold out, a preprocessed pool) before it writes
anything, so a refused start leaves nothing behind; it then records its settings and teacher in
``results/selftrain/settings.json``. ``--continue`` reads them back and refuses other settings than those a
continuation may change (``--max-rounds``, ``--keep-best``, the machine), naming the flags.
"""
from __future__ import annotations

import json
from pathlib import Path

from covnet.planning.plans import Plan
from covnet.runtime.atomic import read_json, sweep_dead_temporaries, write_json
from covnet.runtime.devices import resolve_device
from covnet.runtime.errors import CovnetError
from covnet.runtime.locking import holding
from covnet.runtime.log import logger, setup_logging
from covnet.runtime.settings import flag_text
from covnet.runtime.sharding import shard
from covnet.selftrain.candidates import predict_candidates
from covnet.selftrain.rounds import COMMAND, SelfTrainingRun, checked_pool
from covnet.selftrain.settings import SelfTrainingSettings
from covnet.selftrain.teacher import Teacher, choose_teacher, self_training_plan, teacher_from_json, teacher_to_json
from covnet.training.distributed import DistributedContext, context_from_environment, device_for, initialise, shutdown
from covnet.training.settings import TrainingSettings
from covnet.workspace import PREPROCESSED_SCOPE, SELFTRAIN_SCOPE, Workspace

log = logger(__name__)


def _settings_file(workspace: Workspace) -> Path:
    return workspace.selftrain / "settings.json"


def _changed_flags(settings: SelfTrainingSettings, stored: SelfTrainingSettings) -> str:
    texts = []
    for name in settings.changed_from(stored):
        if hasattr(stored, name):
            texts.append(flag_text(SelfTrainingSettings, name, getattr(stored, name)))
        else:
            texts.append(flag_text(TrainingSettings, name, stored.training_overrides.get(name)))
    return ", ".join(texts)


def recorded(workspace: Workspace) -> tuple[SelfTrainingSettings, Teacher, dict | None] | None:
    """The recorded settings, teacher and plan key of the workspace's self-training, or None."""
    path = _settings_file(workspace)
    if not path.is_file():
        return None
    stored = read_json(path, "")
    try:
        return (SelfTrainingSettings.from_json(stored["settings"]),
                teacher_from_json(stored["teacher"], workspace.root), stored.get("plan_key"))
    except (KeyError, TypeError, AttributeError) as error:
        raise CovnetError(path, f"is not a covnet self-training record ({type(error).__name__}: {error}); delete "
                                "results/selftrain to start again") from None


def _rounds_done(workspace: Workspace) -> int:
    done = 0
    while workspace.selftrain_round(done + 1).is_trained:
        done += 1
    return done


def start_or_resume(workspace: Workspace, settings: SelfTrainingSettings, teacher: Teacher | None, *,
                    resume: bool) -> Teacher:
    """The teacher of this self-training: chosen and checked (with the pool) before anything is written, then
    recorded; on --continue read back, with the settings compared."""
    previous = recorded(workspace)
    if previous is not None:
        if not resume:
            raise CovnetError(workspace.selftrain, "already holds a self-training; pass --continue to resume it, or "
                                                   "delete the folder to start another")
        stored, stored_teacher, plan_key = previous
        if settings.changed_from(stored):
            raise CovnetError(_settings_file(workspace), f"this self-training was started with "
                                                         f"{_changed_flags(settings, stored)}; continue it with the "
                                                         "same settings, or delete results/selftrain to start another")
        if plan_key is not None and plan_key != _plan_key(workspace):
            raise CovnetError(_settings_file(workspace), "this self-training was started under another plan (the "
                                                         "preprocessing in plans.json changed since); its pseudo-labels "
                                                         "do not fit the cases any more: delete results/selftrain")
        if settings.max_rounds < _rounds_done(workspace):
            raise CovnetError(None, f"--max-rounds {settings.max_rounds}: {_rounds_done(workspace)} rounds are already "
                                    "trained; a continuation can only add rounds")
        _check_keep_best(settings, stored_teacher)
        return stored_teacher
    if workspace.selftrain.exists() and any(workspace.selftrain.iterdir()) and not resume:
        raise CovnetError(workspace.selftrain, "already holds files; pass --continue, or delete the folder")
    teacher = teacher or choose_teacher(workspace, settings.teacher, settings.holdout)
    checked_pool(workspace, teacher)
    _check_keep_best(settings, teacher)
    workspace.selftrain.mkdir(parents=True, exist_ok=True)
    write_json(_settings_file(workspace), {"settings": settings.to_json(),
                                           "teacher": teacher_to_json(teacher, workspace.root),
                                           "plan_key": _plan_key(workspace)})
    return teacher


def _check_keep_best(settings: SelfTrainingSettings, teacher: Teacher) -> None:
    if settings.keep_best and not teacher.holdout_cases:
        raise CovnetError(None, "--keep-best needs validation cases; leave out --holdout none")


def _plan_key(workspace: Workspace) -> dict:
    """The plan's preprocessing, as it reads back from JSON."""
    return json.loads(json.dumps(Plan.load(workspace.plans_json).preprocessing_key()))


def _device_name(settings: SelfTrainingSettings) -> str:
    return settings.training_overrides.get("device", TrainingSettings().device)


def run_selftraining(workspace: Workspace, settings: SelfTrainingSettings, *, resume: bool = False,
                     teacher: Teacher | None = None, oracle_folder: Path | None = None) -> dict | None:
    """Self-train into ``results/selftrain/`` and return its summary (None on the ranks other than 0 under
    torchrun). ``teacher`` overrides ``settings.teacher`` (e.g. a model trained on a split of one's own);
    ``oracle_folder`` replaces the teacher's pseudo-labels by true labels (experiments only)."""
    context = context_from_environment()
    device = device_for(context, resolve_device(_device_name(settings)))
    initialise(context, device)
    try:
        with holding(workspace.root, SELFTRAIN_SCOPE, COMMAND, reading=(PREPROCESSED_SCOPE,), main_process=context.is_main):
            if context.is_main:
                teacher = start_or_resume(workspace, settings, teacher, resume=resume)
                sweep_dead_temporaries(workspace.selftrain)
            setup_logging(workspace.selftrain / "selftrain_log.txt" if context.is_main else None, rank=context.rank)
            context.barrier()                 # rank 0 has recorded the teacher: the others read it back
            if not context.is_main:
                teacher = recorded(workspace)[1]
            return _run(workspace, settings, teacher, device, context, oracle_folder).run()
    finally:
        shutdown(context)


def _run(workspace, settings, teacher, device, context: DistributedContext, oracle_folder=None) -> SelfTrainingRun:
    return SelfTrainingRun(workspace=workspace, settings=settings, teacher=teacher,
                           plan=self_training_plan(Plan.load(workspace.plans_json)), device=device, context=context,
                           oracle_folder=oracle_folder)


def run_pseudo_label_part(workspace: Workspace, settings: SelfTrainingSettings, num_parts: int, part_id: int,
                          teacher: Teacher | None = None) -> list[str]:
    """Label part ``part_id`` of ``num_parts`` of the current round's pool (the first round without
    ``selection.json``) and stop; return the cases of this part. Parts run at the same time on machines sharing
    the workspace; ``run_selftraining(..., resume=True)`` afterwards is the merge."""
    context = context_from_environment()
    if context.enabled:
        raise CovnetError(None, "--num-parts/--part-id split the pool across separate runs; under torchrun the "
                                "ranks share it without them")
    shard([], num_parts, part_id)                       # a bad part is refused before any work
    device = resolve_device(_device_name(settings))
    scope = f"{SELFTRAIN_SCOPE}_part_{part_id}_of_{num_parts}"
    # Parts read the self-training (its settings, earlier rounds) side by side; the merge writes it alone.
    with holding(workspace.root, scope, COMMAND, reading=(PREPROCESSED_SCOPE, SELFTRAIN_SCOPE)):
        teacher = start_or_resume(workspace, settings, teacher, resume=True)
        setup_logging(workspace.selftrain / f"pseudo_label_part_{part_id}_of_{num_parts}_log.txt")
        run = _run(workspace, settings, teacher, device, context)
        round_index = 1
        while run.selection(round_index) is not None:
            round_index += 1
        if round_index > settings.max_rounds:
            raise CovnetError(workspace.selftrain, f"--max-rounds {settings.max_rounds} rounds are already selected; "
                                                   "nothing to do")
        pool = checked_pool(workspace, teacher)
        mine = shard(run.to_label(round_index, pool), num_parts, part_id, key=lambda case: case)
        log.info(f"round {round_index}, part {part_id} of {num_parts}: labelling {len(mine)} pool case(s)")
        previous = run.candidates(round_index - 1) if round_index > 1 else None
        predict_candidates(workspace, run.labeller(round_index), mine, run.candidates(round_index), previous)
        log.info(f"round {round_index}, part {part_id} of {num_parts} done; when every part is done, "
                 "covnet_selftrain --continue selects and trains")
        return mine
