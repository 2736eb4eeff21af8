"""The first teacher of self-training: one trained fold, the best one, or the ensemble of every trained fold.

A model is scored by the mean validation Dice over the ``lungs`` and ``infection`` regions (over every
foreground label when those regions are absent), read from each fold's validation summary
(``results/fold_K/validation/summary.json``).

The held-out set of self-training is always the validation cases of one fold (``Teacher.fold``): the chosen
fold, the best fold, or for an ensemble teacher the best fold. The students fine-tune on that fold's training
cases plus the pseudo-labelled pool, never on its validation cases, so their validation is measured on cases
no student has seen. (An ensemble teacher's other folds did train on those cases, so their knowledge can
reach the students through the pseudo-labels: prefer a single fold when the numbers must be clean.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from covnet.planning.plans import Plan
from covnet.runtime.errors import CovnetError
from covnet.training.run import fold_job
from covnet.workspace import ALL_FOLDS, Workspace, describe_folds

TEACHER_MODES = ("best", "ensemble")
# The structures whose mean Dice ranks models, when the dataset declares them as regions.
RANKING_STRUCTURES = ("lungs", "infection")


@dataclass
class Teacher:
    mode: str                           # "best", "ensemble", "fold" (a chosen fold) or a caller's own name
    fold: str                           # the fold whose training/validation cases self-training uses
    checkpoints: list[Path]             # the model(s) that pseudo-label the first round
    pretrained: Path                    # the first student's initial weights
    train_cases: list[str]              # expert cases the students train on
    validation_cases: list[str]         # expert cases held out for measurement
    folds: list[str] = field(default_factory=list)   # every fold of the teacher (several for an ensemble)

    def describe(self) -> str:
        if self.mode == "ensemble":
            return f"ensemble of folds {', '.join(self.folds)} (held-out cases and initial weights: fold {self.fold})"
        return f"fold {self.fold} ({self.mode})"


def ranking_score(mean: Mapping[str, Mapping[str, float | None]], plan: Plan) -> float:
    """Mean Dice over ``lungs`` and ``infection`` when both are present, else over every foreground label; undefined
    values (empty against empty) are left out; NaN when nothing is defined."""
    names = list(RANKING_STRUCTURES)
    if not all(name in mean for name in names):
        names = [name for name in plan.foreground_labels if name in mean]
    values = [mean[name].get("dice") for name in names]
    values = [float(value) for value in values if value is not None and not math.isnan(float(value))]
    return sum(values) / len(values) if values else float("nan")


def _fold_scores(workspace: Workspace, folds: list[str], plan: Plan) -> dict[str, float]:
    scores = {}
    for fold in folds:
        summary = workspace.fold(fold).validation_summary()
        if summary is None:
            raise CovnetError(workspace.fold(fold).validation_summary_file,
                              f"not found; complete fold {fold}'s validation first (covnet_train {fold} --continue)")
        scores[fold] = ranking_score(summary.get("mean", {}), plan)
    return scores


def choose_teacher(workspace: Workspace, spec: str = "best") -> Teacher:
    """``spec``: "best", "ensemble" or a fold of the split (0 .. K-1). A one-line error when no fold (or not
    that fold) has finished training."""
    spec = str(spec).strip().lower()
    plan = Plan.load(workspace.plans_json)
    folds = workspace.trained_folds()
    if spec in TEACHER_MODES:
        if not folds:
            raise CovnetError(workspace.results, f"holds no trained fold (fold_K with checkpoint_final.pth, K in "
                                                 f"{describe_folds(workspace.fold_names())}); train one with "
                                                 "covnet_train first")
        scores = _fold_scores(workspace, folds, plan)
        ranked = sorted(folds, key=lambda fold: (math.inf if math.isnan(scores[fold]) else -scores[fold], int(fold)))
        fold, members = ranked[0], (folds if spec == "ensemble" else [ranked[0]])
        mode = spec
    else:
        names = workspace.fold_names()
        if spec == ALL_FOLDS or spec not in names:
            raise CovnetError(None, f"--teacher {spec!r}: choose best, ensemble or a fold of the split "
                                    f"({describe_folds(names)})")
        if spec not in folds:
            raise CovnetError(workspace.fold(spec).checkpoint("final"),
                              f"not found; fold {spec} has not finished training (covnet_train {spec})")
        fold, members, mode = spec, [spec], "fold"
    job = fold_job(workspace, fold)
    checkpoints = [workspace.fold(member).checkpoint("final") for member in members]
    return Teacher(mode=mode, fold=fold, checkpoints=checkpoints,
                   pretrained=workspace.fold(fold).checkpoint("final"), train_cases=list(job.train_cases),
                   validation_cases=list(job.validation_cases), folds=list(members))
