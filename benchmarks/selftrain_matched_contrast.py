"""Compare two arms that ran at different budgets, each against the control of its own budget.

    python benchmarks/selftrain_matched_contrast.py \\
        benchmarks/results/selftrain/continuation/continuation_shift_f8-16-32-64_p24x32x32_3000+1500.json \\
        "default recipe" \\
        benchmarks/results/selftrain/continuation/continuation_shift_f8-16-32-64_p24x32x32_3000+3000.json \\
        "default -fine-tuned student"

A fine-tuned student is compute-matched with a control of ``--extra`` iterations, a retrained one only with a
control of the base's whole schedule, so the two students cannot share a control. What they can share is the
question each control answers: how much does the arm gain over the same compute spent on the expert cases
alone? Per (seed, held-out case), present in both ``selftrain_continuation.py`` reports, this prints the paired
difference of those two gains, (first − its control) − (second − its control), in infection Dice, with a
bootstrap 95% interval and a Wilcoxon p, beside each arm's own difference to its control.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from covnet.evaluation.paired import paired_difference  # noqa: E402


def gain_over_control(report: dict, arm: str) -> dict[str, float]:
    """(seed/case) -> the arm's infection Dice minus its report's control's, where both are scored."""
    if arm not in report["per_case"]:
        raise SystemExit(f"the report has no arm {arm!r}: it has {', '.join(report['per_case'])}")
    control, mine = report["per_case"]["control"], report["per_case"][arm]
    return {key: mine[key]["infection"]["dice"] - control[key]["infection"]["dice"] for key in mine if key in control}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first_report", type=Path)
    parser.add_argument("first_arm")
    parser.add_argument("second_report", type=Path)
    parser.add_argument("second_arm")
    args = parser.parse_args()
    first = gain_over_control(json.loads(args.first_report.read_text()), args.first_arm)
    second = gain_over_control(json.loads(args.second_report.read_text()), args.second_arm)
    pairs = sorted(set(first) & set(second))
    if not pairs:
        raise SystemExit("the two reports share no scored (seed, case)")
    zero = [0.0] * len(pairs)
    for name, gains in ((args.first_arm, first), (args.second_arm, second)):
        print(f"{name} − its control: {paired_difference([gains[k] for k in pairs], zero).describe()}")
    difference = paired_difference([first[k] for k in pairs], [second[k] for k in pairs])
    print(f"({args.first_arm} − control) − ({args.second_arm} − control): {difference.describe()}")


if __name__ == "__main__":
    main()
