"""Tables, statistics and a figure from ``selftrain_experiment.py``'s per-case scores.

    python benchmarks/selftrain_analysis.py --root /tmp/st --output benchmarks/results/selftrain

Per regime and arm: mean Dice and NSD of lungs and infection over every (seed, held-out case); the paired
difference to the control over (seed, case) pairs with a bootstrap 95% interval and a Wilcoxon signed-rank p
(``covnet.evaluation.paired``); and the share of the base-to-oracle gap closed. Self-training arms are scored by
their last round's student. Diagnostics per round (the phantoms' truth): pseudo-label Dice against the pool's
true labels (the round's whole labelled pool, argmax; and the selected cases as trained, ignored voxels left
out), the ignored share per class, the label change from the previous round and the members' agreement.
Writes ``<output>/selftrain_<regime>.md``, ``.json`` (every number, per case) and ``.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selftrain_experiment import ARMS, SUPERVISED, regime_root, slug  # noqa: E402

from covnet.evaluation.paired import gap_closed, paired_difference  # noqa: E402

STRUCTURES = ("lungs", "infection")
METRICS = ("dice", "nsd")
LABELS = {"lungs": (1, 2, 3), "infection": (3,)}
IGNORE = 4


def _seeds(root: Path, regime: str) -> list[int]:
    return sorted(int(path.name[5:]) for path in regime_root(root, regime).glob("seed_*") if path.is_dir())


def _final_summary(folder: Path) -> dict | None:
    """An arm's held-out summary: the supervised model's, or a self-training arm's last round's."""
    tests = sorted((folder / "test").glob("*/summary.json"))
    named = {path.parent.name: path for path in tests}
    path = named.get(folder.name) or (max((p for n, p in named.items() if n.startswith("round_")), default=None))
    return None if path is None else json.loads(path.read_text())


def per_case_scores(root: Path, regime: str, arms: list[str]) -> dict[str, dict[tuple[int, str], dict]]:
    """arm -> (seed, case) -> {structure: {metric: value}}."""
    scores: dict[str, dict] = {arm: {} for arm in arms}
    for seed in _seeds(root, regime):
        for arm in arms:
            summary = _final_summary(regime_root(root, regime) / f"seed_{seed}" / slug(arm))
            for row in (summary or {}).get("per_case", []):
                scores[arm][(seed, row["case"])] = row
    return scores


def _value(row: dict | None, structure: str, metric: str):
    value = None if row is None else (row.get(structure) or {}).get(metric)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def arm_table(scores: dict, arms: list[str]) -> tuple[str, dict]:
    keys = sorted(set().union(*(set(rows) for rows in scores.values())))
    means = {arm: {f"{s} {m}": _mean(_value(scores[arm].get(k), s, m) for k in keys) for s in STRUCTURES
                   for m in METRICS} for arm in arms}
    lines = ["| arm | pairs | lungs Dice | infection Dice | lungs NSD | infection NSD | infection Dice vs control "
             "(95% CI, Wilcoxon p) | gap closed |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    results = {}
    for arm in arms:
        control = [_value(scores["control"].get(k), "infection", "dice") for k in keys]
        mine = [_value(scores[arm].get(k), "infection", "dice") for k in keys]
        difference = paired_difference(mine, control) if arm != "control" else None
        gap = gap_closed(means[arm]["infection dice"], means["base"]["infection dice"],
                         means["oracle"]["infection dice"]) if "oracle" in means and arm not in SUPERVISED else None
        results[arm] = {"means": means[arm], "difference_to_control": None if difference is None else
                        difference.__dict__, "gap_closed": gap}
        cells = [f"{means[arm][f'{s} {m}']:.3f}" for m in METRICS for s in STRUCTURES]
        lines.append(f"| {arm} | {sum(v is not None for v in mine)} | {cells[0]} | {cells[1]} | {cells[2]} | "
                     f"{cells[3]} | {'—' if difference is None else difference.describe()} | "
                     f"{'—' if gap is None or math.isnan(gap) else f'{gap:.0%}'} |")
    return "\n".join(lines), results


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2 * int((a & b).sum()) / total


def round_diagnostics(root: Path, regime: str, arms: list[str],
                      selftrain_of: Callable[[int, str], Path] | None = None) -> tuple[str, list[dict]]:
    """Per arm and round, averaged over seeds: pseudo-label quality against the pool's truth. ``selftrain_of``
    (seed, arm) -> the arm's ``results/selftrain`` folder (default: ``selftrain_experiment.py``'s layout)."""
    rows = []
    for arm in arms:
        if arm in SUPERVISED:
            continue
        per_round: dict[int, list[dict]] = {}
        for seed in _seeds(root, regime):
            truth_dir = regime_root(root, regime) / f"seed_{seed}" / "pool_truth"
            selftrain = (selftrain_of(seed, arm) if selftrain_of else
                         regime_root(root, regime) / f"seed_{seed}" / slug(arm) / "results" / "selftrain")
            for round_dir in sorted(selftrain.glob("round_*")):
                selection_file = round_dir / "selection.json"
                if not selection_file.is_file():
                    continue
                selection = json.loads(selection_file.read_text())
                entry = {"agreement": _mean(s.get("agreement") for s in selection["scores"].values()),
                         "change": selection.get("label_change")}
                for structure, values in LABELS.items():
                    pool, taken = [], []
                    for case in selection["scores"]:
                        truth = np.isin(np.load(truth_dir / f"{case}_seg.npy"), values)
                        candidate = round_dir / "candidates" / f"{case}_seg.npy"
                        if candidate.is_file():
                            pool.append(_dice(np.isin(np.load(candidate), values), truth))
                    for case in selection["cases_added"]:
                        truth = np.isin(np.load(truth_dir / f"{case}_seg.npy"), values)
                        label = np.load(round_dir / "pseudo_labels" / f"{case}_seg.npy")
                        known = label != IGNORE
                        taken.append(_dice(np.isin(label, values) & known, truth & known))
                    entry[f"pool {structure} Dice"] = _mean(pool)
                    entry[f"taken {structure} Dice"] = _mean(taken)
                for value, name in ((0, "background"), (1, "left lung"), (2, "right lung"), (3, "infection")):
                    entry[f"ignored {name}"] = _mean(shares.get(str(value)) for shares in
                                                     selection["ignored_share"].values())
                per_round.setdefault(int(round_dir.name[-2:]), []).append(entry)
        for round_index, entries in sorted(per_round.items()):
            rows.append({"arm": arm, "round": round_index, "seeds": len(entries),
                         **{key: _mean(e[key] for e in entries) for key in entries[0]}})
    return diagnostics_table(rows), rows


# The diagnostics a table shows, of those ``round_diagnostics`` measures.
DIAGNOSTIC_KEYS = ("pool infection Dice", "taken infection Dice", "pool lungs Dice", "ignored infection",
                   "ignored background", "change", "agreement")


def diagnostics_table(rows: list[dict]) -> str:
    """``round_diagnostics``' rows as a table, one line per arm and round."""
    lines = ["| arm | round | seeds | " + " | ".join(DIAGNOSTIC_KEYS) + " |",
             "| --- " * (len(DIAGNOSTIC_KEYS) + 3) + "|"]
    for row in rows:
        lines.append(f"| {row['arm']} | {row['round']} | {row['seeds']} | " +
                     " | ".join("—" if row.get(k) is None or math.isnan(row[k]) else f"{row[k]:.3f}"
                                for k in DIAGNOSTIC_KEYS) + " |")
    return "\n".join(lines)


def plot(scores: dict, arms: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    keys = sorted(set(scores["control"]))
    figure, axis = pyplot.subplots(figsize=(9, 0.45 * len(arms) + 1.5))
    for row, arm in enumerate(arms):
        if arm == "control":
            continue
        control = [_value(scores["control"].get(k), "infection", "dice") for k in keys]
        mine = [_value(scores[arm].get(k), "infection", "dice") for k in keys]
        result = paired_difference(mine, control)
        axis.errorbar(result.mean_difference, row, xerr=[[result.mean_difference - result.ci_low],
                                                         [result.ci_high - result.mean_difference]],
                      fmt="o", color="tab:green" if result.ci_low > 0 else "tab:red" if result.ci_high < 0 else "grey")
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(arms)), arms)
    axis.invert_yaxis()
    axis.set_xlabel("infection Dice minus control (paired over seeds x held-out cases, 95% bootstrap CI)")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    pyplot.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--regimes", nargs="+", default=["scarcity", "shift"])
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    arms = list(SUPERVISED) + list(ARMS)
    for regime in args.regimes:
        if not regime_root(args.root, regime).is_dir():
            continue
        scores = per_case_scores(args.root, regime, arms)
        present = [arm for arm in arms if scores[arm]]
        table, results = arm_table(scores, present)
        diagnostics, rounds = round_diagnostics(args.root, regime, present)
        seeds = [seed for seed in _seeds(args.root, regime)       # those whose control is scored so far
                 if _final_summary(regime_root(args.root, regime) / f"seed_{seed}" / slug("control")) is not None]
        text = (f"### Regime: {regime} ({len(seeds)} seeds scored: {seeds})\n\n{table}\n\n"
                f"Pseudo-labels per round (mean over seeds; the pool's truth):\n\n{diagnostics}\n")
        (args.output / f"selftrain_{regime}.md").write_text(text)
        per_case = {arm: {f"{seed}/{case}": row for (seed, case), row in rows.items()} for arm, rows in scores.items()}
        (args.output / f"selftrain_{regime}.json").write_text(json.dumps(
            {"arms": results, "rounds": rounds, "per_case": per_case}, indent=1, default=float))
        plot(scores, present, args.output / f"selftrain_{regime}.png", f"self-training, regime: {regime}")
        print(text)


if __name__ == "__main__":
    main()
