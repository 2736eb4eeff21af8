"""What self-training reports: ``results/selftrain/summary.json``, ``progress.png`` and the validation table.

``summary.json``::

    {"teacher": {"mode", "fold", "folds", "members", "train_cases", "holdout_cases",
                 "validation": {<structure>: {"dice", "nsd"}} | null},
     "rounds": [{"round", "pool_size", "labelled", "cases_added", "training_cases", "label_change",
                 "mean_agreement", "validation", "worse_than_teacher"}, ...],
     "stopped": <why the rounds ended early> | null,
     "final": {"round", "reason", "source", "validation"}}

Every validation is on the same held-out expert cases, predicted whole with the same inference settings; with
``--holdout none`` there are none and every ``validation`` is null. A student whose validation (mean Dice over
lungs and infection) is below its teacher's is flagged ``worse_than_teacher`` and announced in the log.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from covnet.planning.plans import Plan
from covnet.runtime.atomic import atomic_path
from covnet.runtime.log import logger
from covnet.selftrain.teacher import ranking_score
from covnet.workspace import ModelFolder

log = logger(__name__)
METRICS = ("dice", "nsd")


@dataclass
class RoundReport:
    teacher: dict
    plan: Plan
    rounds: list[dict] = field(default_factory=list)
    stopped: str | None = None
    final: dict | None = None

    def stop(self, reason: str) -> None:
        self.stopped = reason
        log.info(f"self-training stops: {reason}")

    def add_round(self, selection: dict, validation: dict | None, student: ModelFolder) -> None:
        mean = None if validation is None else validation.get("mean")
        agreements = [score["agreement"] for score in selection["scores"].values() if score.get("agreement") is not None]
        entry = {"round": selection["round"], "pool_size": selection["pool_size"], "labelled": selection["labelled"],
                 "cases_added": list(selection["cases_added"]), "training_cases": len(selection["training_cases"]),
                 "label_change": selection.get("label_change"),
                 "mean_agreement": sum(agreements) / len(agreements) if agreements else None,
                 "validation": mean, "worse_than_teacher": self._worse(mean)}
        if entry["worse_than_teacher"]:
            log.warning(f"round {entry['round']}'s student validates worse than the teacher "
                        f"({ranking_score(mean, self.plan):.4f} < {ranking_score(self.teacher['validation'], self.plan):.4f}"
                        f" mean Dice over lungs and infection): {student.path}")
        self.rounds = [kept for kept in self.rounds if kept["round"] != entry["round"]] + [entry]

    def _worse(self, mean: dict | None) -> bool | None:
        teacher = self.teacher.get("validation")
        if mean is None or teacher is None:
            return None
        mine, theirs = ranking_score(mean, self.plan), ranking_score(teacher, self.plan)
        return None if math.isnan(mine) or math.isnan(theirs) else mine < theirs

    def to_json(self) -> dict:
        return {"teacher": self.teacher, "rounds": self.rounds, "stopped": self.stopped, "final": self.final}


def _number(value) -> str:
    return "   n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:6.4f}"


def validation_table(summary: dict) -> str:
    """Teacher and each round: Dice and NSD per structure, one row per model."""
    rows = [("teacher", summary["teacher"].get("validation") or {})]
    rows += [(f"round {entry['round']}", entry.get("validation") or {}) for entry in summary["rounds"]]
    structures: list[str] = []
    for _, validation in rows:
        structures += [name for name in validation if name not in structures]
    header = ["model    "] + [f"{name} {metric}" for name in structures for metric in METRICS]
    widths = [max(9, len(cell)) for cell in header]
    lines = ["  ".join(cell.rjust(width) if index else cell.ljust(width)
                       for index, (cell, width) in enumerate(zip(header, widths)))]
    for name, validation in rows:
        cells = [name] + [_number((validation.get(structure) or {}).get(metric))
                          for structure in structures for metric in METRICS]
        lines.append("  ".join(cell.rjust(width) if index else cell.ljust(width)
                               for index, (cell, width) in enumerate(zip(cells, widths))))
    return "\n".join(lines)


def plot_rounds(summary: dict, path: str | os.PathLike) -> None:
    """Validation Dice per structure (round 0 = the teacher), and the pool's label change and agreement, per
    round."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    models = [(0, summary["teacher"].get("validation") or {})]
    models += [(entry["round"], entry.get("validation") or {}) for entry in summary["rounds"]]
    structures = []
    for _, validation in models:
        structures += [name for name in validation if name not in structures]
    figure, (dice, pool) = pyplot.subplots(2, 1, figsize=(8, 8), sharex=True)
    for name in structures:
        values = [(validation.get(name) or {}).get("dice") for _, validation in models]
        dice.plot([index for index, _ in models], [math.nan if v is None else v for v in values], marker="o",
                  label=name)
    dice.set_ylabel("validation Dice (held-out expert cases)")
    dice.set_ylim(0, 1)
    if structures:
        dice.legend(loc="best", fontsize="small")
    dice.set_title("round 0 = teacher" if structures else "no validation (--holdout none)")
    rounds = [entry["round"] for entry in summary["rounds"]]
    for key, name in (("mean_agreement", "members' agreement (infection Dice)"),
                      ("label_change", "label change from the previous round")):
        values = [entry.get(key) for entry in summary["rounds"]]
        pool.plot(rounds, [math.nan if v is None else v for v in values], marker="o", label=name)
    pool.set_ylim(0, 1)
    pool.legend(loc="best", fontsize="small")
    pool.set_xlabel("round")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=80)
    pyplot.close(figure)
