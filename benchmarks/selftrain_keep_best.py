"""Does ``--keep-best`` (final = the student with the best validation) beat keeping the last student?

    python benchmarks/selftrain_keep_best.py --root /tmp/st800 --regime shift --patch 24 32 32 \\
        --output benchmarks/results/selftrain/keep_best

On ``selftrain_continuation.py``'s ``2 rounds`` arm (two fine-tuned students of half the iterations each; the
second learns from the first's labels), per seed: the round-1 student is scored on the held-out cases beside the
round-2 student (the arm's final, already scored). That design validates nothing, so the validation a user would
have is simulated: ``--validation-cases`` of the held-out cases play the validation set, the student with the
higher mean lungs/infection Dice on them is kept (covnet's ranking; a tie keeps round 1, as ``max`` does), and
both choices are scored on the other held-out cases. Every draw of a single validation case is taken, and
``--draws`` random draws of larger sets; per (seed, test case) the keep-best Dice is averaged over the draws that
leave the case out, then paired with the last student's Dice (bootstrap 95% interval, Wilcoxon p). Under shift
covnet validates on expert cases, from the other scanner: ``--validation-from scarcity`` draws the validation
cases from the scarcity regime's held-out cases of the same seed (the expert cases' profile), and every held-out
case of the arm is then a test case.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

from covnet.selftrain.teacher import ranking_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selftrain_continuation import add_model_arguments, arm_folder, held_out_summary  # noqa: E402
from selftrain_experiment import Schedule, data_workspace, experiment_plan, score_on_held_out  # noqa: E402
from selftrain_headroom import network_name  # noqa: E402

ARM = "2 rounds"
ROUNDS = (1, 2)


def round_scores(args, seed: int, held_out_regime: str | None = None) -> dict[int, dict[str, dict]]:
    """round -> held-out case -> its scores, on the arm's own held-out cases or on those of ``held_out_regime``'s
    data of the same seed; what has not been scored is scored here."""
    folder = arm_folder(args.root, args.regime, seed, network_name(args.features, args.patch),
                        (args.base, args.extra), ARM)
    checkpoints = {index: folder / "results" / "selftrain" / f"round_{index:02d}" / "checkpoint_final.pth"
                   for index in ROUNDS}
    if not held_out_summary(folder).is_file() or not all(path.is_file() for path in checkpoints.values()):
        return {}
    suffix = f"_{held_out_regime}" if held_out_regime else ""
    tests = {index: folder / (f"test{suffix}" if index == ROUNDS[-1] else f"test_round_{index:02d}{suffix}")
             for index in ROUNDS}
    data = data_workspace(args.root, held_out_regime or args.regime, seed)
    for index, test in tests.items():
        score_on_held_out(data, [checkpoints[index]], test)
    return {index: {row["case"]: row for row in json.loads((test / "summary.json").read_text())["per_case"]}
            for index, test in tests.items()}


def validation_draws(cases: list[str], size: int, draws: int, seed: int) -> list[tuple[str, ...]]:
    """Every set of one case; ``draws`` random sets of more."""
    if size == 1:
        return [(case,) for case in cases]
    rng = np.random.default_rng(seed)
    return [tuple(rng.choice(cases, size=size, replace=False)) for _ in range(draws)]


def keep_best_vs_last(scores: dict[int, dict[int, dict]], size: int, draws: int, plan,
                      validation_scores: dict[int, dict[int, dict]] | None = None) -> dict:
    """Per (seed, test case): the keep-best Dice averaged over the validation draws leaving it out, and the last's.
    Validation sets are drawn from the test cases, or from ``validation_scores``' cases when given."""
    kept, last, round_one_chosen, total = [], [], 0, 0
    for seed, rounds in scores.items():
        cases = sorted(rounds[2])
        validating = (validation_scores or scores)[seed]
        chosen_dice = {case: [] for case in cases}
        for validation in validation_draws(sorted(validating[2]), size, draws, seed):
            means = {index: np.mean([ranking_score(validating[index][case], plan) for case in validation])
                     for index in ROUNDS}
            chosen = max(ROUNDS, key=lambda index: means[index])
            round_one_chosen, total = round_one_chosen + (chosen == 1), total + 1
            for case in set(cases) - (set() if validation_scores else set(validation)):
                chosen_dice[case].append(rounds[chosen][case]["infection"]["dice"])
        kept += [float(np.mean(chosen_dice[case])) for case in cases]
        last += [rounds[2][case]["infection"]["dice"] for case in cases]
    return {"kept": kept, "last": last, "round_1_share": round_one_chosen / total}


def report(scores: dict, sizes: list[int], draws: int, plan,
           validation_scores: dict | None = None) -> tuple[str, dict]:
    from covnet.evaluation.paired import paired_difference
    first = [scores[s][1][c]["infection"]["dice"] for s in scores for c in sorted(scores[s][2])]
    second = [scores[s][2][c]["infection"]["dice"] for s in scores for c in sorted(scores[s][2])]
    always_first = paired_difference(first, second)
    lines = [f"Round 1 − round 2 student (infection Dice, every held-out case): {always_first.describe()}", "",
             "| validation cases | keep-best chose round 1 | keep-best − last (infection Dice, 95% CI, Wilcoxon p) |",
             "| --- | --- | --- |"]
    results = {"round 1 - round 2": dataclasses.asdict(always_first), "validation": {}}
    for size in sizes:
        outcome = keep_best_vs_last(scores, size, draws, plan, validation_scores)
        difference = paired_difference(outcome["kept"], outcome["last"])
        lines.append(f"| {size} | {outcome['round_1_share']:.0%} | {difference.describe()} |")
        results["validation"][size] = {"round_1_share": outcome["round_1_share"], **dataclasses.asdict(difference)}
    return "\n".join(lines), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, regime="shift")
    parser.add_argument("--validation-cases", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--draws", type=int, default=200, help="random validation sets per seed beyond one case")
    parser.add_argument("--validation-from", metavar="REGIME",
                        help="draw the validation cases from this regime's held-out cases of the same seed (e.g. "
                             "scarcity's, from the expert cases' scanner, for shift) instead of the arm's own")
    parser.add_argument("--output", type=Path, help="write the table (.md) and its numbers (.json) here")
    args = parser.parse_args()
    args.features, args.patch = tuple(args.features), tuple(args.patch)
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    import torch
    torch.set_num_threads(1)
    scores = {seed: rounds for seed in args.seeds if (rounds := round_scores(args, seed))}
    if not scores:
        sys.exit(f"no scored '{ARM}' arm under {args.root}/{args.regime}")
    validation_scores = ({seed: round_scores(args, seed, args.validation_from) for seed in scores}
                         if args.validation_from else None)
    plan = experiment_plan(args.root, args.regime, Schedule())
    text, results = report(scores, args.validation_cases, args.draws, plan, validation_scores)
    source = f"{args.validation_from}'s held-out cases" if args.validation_from else "the other held-out cases"
    text = f"{args.regime}, seeds {sorted(scores)}, {ARM!r} arm; validation cases from {source}\n\n{text}"
    print(text)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        validation = f"_validated_on_{args.validation_from}" if args.validation_from else ""
        stem = args.output / f"keep_best_{args.regime}{validation}_{network_name(args.features, args.patch)}"
        stem.with_suffix(".md").write_text(text + "\n")
        stem.with_suffix(".json").write_text(json.dumps({"seeds": sorted(scores), **results}, indent=1))


if __name__ == "__main__":
    main()
