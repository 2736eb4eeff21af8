"""What self-training reports: ``results/selftrain/summary.json``, ``progress.png`` and the validation table.

``summary.json``::

    {"teacher": {"mode": ..., "fold": ..., "folds": [...], "validation": {<structure>: {"dice": .., "nsd": ..}}},
     "rounds": [{"round": r, "pool_size": <unused pool cases after the round>, "cases_added": [...],
                 "confidence": {case: c}, "validation": {<structure>: {"dice": .., "nsd": ..}}}, ...],
     "final": {"round": r, "reason": "last" | "best"}}

Every validation is on the same held-out expert cases (the teacher fold's validation cases), predicted whole
with the same inference settings.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from covnet.runtime.atomic import atomic_path, write_json

METRICS = ("dice", "nsd")


def round_entry(selection: dict, validation: dict | None) -> dict:
    return {"round": selection["round"], "pool_size": selection["pool_size"],
            "cases_added": list(selection["cases_added"]), "confidence": dict(selection["confidence"]),
            "ignored_share": dict(selection.get("ignored_share", {})),
            "validation": None if validation is None else validation.get("mean")}


def write_summary(path: Path, teacher: dict, rounds: list[dict], final: dict | None = None) -> dict:
    summary = {"teacher": teacher, "rounds": rounds}
    if final is not None:
        summary["final"] = final
    write_json(path, summary)
    return summary


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
    """Validation Dice per structure (round 0 = the teacher) and the unused pool size, per round."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    models = [(0, summary["teacher"].get("validation") or {}, None)]
    models += [(entry["round"], entry.get("validation") or {}, entry["pool_size"]) for entry in summary["rounds"]]
    structures = []
    for _, validation, _ in models:
        structures += [name for name in validation if name not in structures]
    figure, (dice, pool) = pyplot.subplots(2, 1, figsize=(8, 8), sharex=True)
    for name in structures:
        values = [(validation.get(name) or {}).get("dice") for _, validation, _ in models]
        dice.plot([index for index, _, _ in models], [math.nan if v is None else v for v in values], marker="o",
                  label=name)
    dice.set_ylabel("validation Dice")
    dice.set_ylim(0, 1)
    dice.legend(loc="best", fontsize="small")
    dice.set_title("round 0 = teacher")
    rounds = [(index, size) for index, _, size in models if size is not None]
    pool.plot([index for index, _ in rounds], [size for _, size in rounds], marker="o", color="black")
    pool.set_ylabel("unused pool cases")
    pool.set_xlabel("round")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=80)
    pyplot.close(figure)
