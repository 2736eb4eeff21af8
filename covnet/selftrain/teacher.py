"""The first teacher of self-training, and the expert cases the students train on and are validated on.

``--teacher``: ``ensemble`` (every trained fold, averaged), ``best`` (the fold with the best validation), a fold
number, or ``all`` (``fold_all``, trained on every case). Folds are ranked by the mean validation Dice over the
``lungs`` and ``infection`` regions (every foreground label when those are absent).

``--holdout fold`` keeps the validation cases of one fold out of every student's training and validates each
student on them: the chosen fold, or the best fold for an ensemble. (An ensemble's other folds did train on those
cases, so their knowledge can reach the students through the pseudo-labels; name a fold when the numbers must be
clean.) ``--holdout none`` trains the students on every expert case and validates nothing: for very few labelled
cases, or when the evaluation happens elsewhere (covnet_evaluate on cases of your own).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from covnet.checkpoint import Checkpoint
from covnet.dataset import IGNORE_LABEL_NAME, INFECTION, LUNGS
from covnet.planning.plans import Plan
from covnet.runtime.errors import CovnetError
from covnet.training.run import fold_job
from covnet.training.settings import TrainingSettings
from covnet.workspace import ALL_FOLDS, Workspace, describe_folds

# The structures whose mean Dice ranks models, when the dataset declares them as regions.
RANKING_STRUCTURES = (LUNGS, INFECTION)


@dataclass
class Teacher:
    mode: str                           # "ensemble", "best", "fold", "all" or a caller's own name
    fold: str                           # the fold whose cases the students train on (and are validated on)
    members: list[Path]                 # the checkpoint(s) that label round 1
    pretrained: Path                    # a fine-tuned first student starts from these weights
    train_cases: list[str]              # expert cases the students train on
    holdout_cases: list[str]            # expert cases held out for validation (none with --holdout none)
    training: TrainingSettings          # the teacher fold's recorded settings: a retrained student's schedule
    folds: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.mode == "ensemble":
            return f"ensemble of folds {', '.join(self.folds)} (fold {self.fold}'s cases)"
        return f"fold {self.fold} ({self.mode})"

    def summary(self, relative: Callable[[Path], str]) -> dict:
        return {"mode": self.mode, "fold": self.fold, "folds": self.folds,
                "members": [relative(path) for path in self.members], "pretrained": relative(self.pretrained),
                "train_cases": self.train_cases, "holdout_cases": self.holdout_cases}


def ranking_score(mean: Mapping[str, Mapping[str, float | None]], plan: Plan) -> float:
    """Mean Dice over ``lungs`` and ``infection`` when both are present, else over every foreground label; undefined
    values (empty against empty) are left out; NaN when nothing is defined."""
    names = list(RANKING_STRUCTURES)
    if not all(name in mean for name in names):
        names = [name for name in plan.foreground_labels if name in mean]
    values = [(mean[name] or {}).get("dice") for name in names]
    values = [float(value) for value in values if value is not None and not math.isnan(float(value))]
    return sum(values) / len(values) if values else float("nan")


def self_training_plan(plan: Plan) -> Plan:
    """The plan with an ``ignore`` label (value = number of classes) when it declares none: the network's
    classes, and so its topology, stay the same."""
    if plan.ignore_label is not None:
        return plan
    return dataclasses.replace(plan, labels={**plan.labels, IGNORE_LABEL_NAME: plan.num_classes})


def _ranked_folds(workspace: Workspace, folds: list[str], plan: Plan) -> list[str]:
    scores = {}
    for fold in folds:
        summary = workspace.fold(fold).validation_summary()
        if summary is None:
            raise CovnetError(workspace.fold(fold).validation_summary_file,
                              f"not found; complete fold {fold}'s validation first (covnet_train {fold} --continue)")
        scores[fold] = ranking_score(summary.get("mean", {}), plan)
    return sorted(folds, key=lambda fold: (math.inf if math.isnan(scores[fold]) else -scores[fold], fold))


def _members(workspace: Workspace, spec: str, plan: Plan) -> tuple[str, list[str]]:
    """(the fold whose cases count, the member folds) of a teacher spec."""
    if spec == ALL_FOLDS:
        if not workspace.fold(ALL_FOLDS).is_trained:
            raise CovnetError(workspace.fold(ALL_FOLDS).checkpoint("final"),
                              "not found; train it first (covnet_train all)")
        return ALL_FOLDS, [ALL_FOLDS]
    folds = workspace.trained_folds()
    if spec in ("ensemble", "best"):
        if not folds:
            raise CovnetError(workspace.results, f"holds no trained fold (fold_K with checkpoint_final.pth, K in "
                                                 f"{describe_folds(workspace.fold_names())}); train one with "
                                                 "covnet_train first")
        ranked = _ranked_folds(workspace, folds, plan)
        return ranked[0], (folds if spec == "ensemble" else ranked[:1])
    names = workspace.fold_names()
    if spec not in names:
        raise CovnetError(None, f"--teacher {spec!r}: choose ensemble, best, all or a fold of the split "
                                f"({describe_folds(names)})")
    if spec not in folds:
        raise CovnetError(workspace.fold(spec).checkpoint("final"),
                          f"not found; fold {spec} has not finished training (covnet_train {spec})")
    return spec, [spec]


def choose_teacher(workspace: Workspace, spec: str = "ensemble", holdout: str = "fold") -> Teacher:
    """The teacher of ``spec`` and the expert cases of ``holdout``; a one-line error when what they need is
    missing (no trained fold, a fold without validation cases to hold out)."""
    spec = str(spec).strip().lower()
    plan = Plan.load(workspace.plans_json)
    fold, members = _members(workspace, spec, plan)
    job = fold_job(workspace, fold)
    if holdout == "fold" and not job.validation_cases:
        raise CovnetError(None, f"--teacher {spec}: fold {fold} has no validation cases to hold out; self-train "
                                "with --holdout none (students train on every expert case, nothing is validated)")
    train_cases = sorted(job.train_cases + (job.validation_cases if holdout == "none" else []))
    holdout_cases = list(job.validation_cases) if holdout == "fold" else []
    training = TrainingSettings.from_json(Checkpoint.load(workspace.fold(fold).checkpoint("final")).settings)
    current = plan.preprocessing_key()
    for member in members:
        if Checkpoint.load(workspace.fold(member).checkpoint("final")).typed_plan.preprocessing_key() != current:
            raise CovnetError(workspace.fold(member).checkpoint("final"),
                              "was trained under another plan than plans.json (its preprocessing differs); "
                              f"retrain fold {member} or restore the plan it was trained under")
    mode = spec if spec in ("ensemble", "best", ALL_FOLDS) else "fold"
    return Teacher(mode=mode, fold=fold, members=[workspace.fold(member).checkpoint("final") for member in members],
                   pretrained=workspace.fold(fold).checkpoint("final"), train_cases=train_cases,
                   holdout_cases=holdout_cases, training=training, folds=list(members))


def teacher_to_json(teacher: Teacher, root: Path) -> dict:
    """As recorded in ``results/selftrain/settings.json``: paths relative to the workspace ``root``."""
    def relative(path: Path) -> str:
        return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    return {**dataclasses.asdict(teacher), "members": [relative(path) for path in teacher.members],
            "pretrained": relative(teacher.pretrained), "training": teacher.training.to_json()}


def teacher_from_json(data: dict, root: Path) -> Teacher:
    def absolute(path: str) -> Path:
        return Path(path) if Path(path).is_absolute() else root / path
    return Teacher(**{**data, "members": [absolute(path) for path in data["members"]],
                      "pretrained": absolute(data["pretrained"]),
                      "training": TrainingSettings.from_json(data["training"])})
