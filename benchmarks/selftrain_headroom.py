"""How much can the pool's labels be worth, and how long must a model train before more iterations stop helping?

    python benchmarks/selftrain_headroom.py --root /tmp/st800 --regime shift --seeds 0 1 --budgets 1000 3000

Before self-training can beat the control, two things must hold on the experiment's data
(``selftrain_experiment.py``'s phantoms and plan): (1) a model trained on the expert cases *and the pool's true
labels* must beat one trained on the expert cases alone, both trained to saturation: that difference is the most
any pseudo-labelling can gain (the headroom); (2) the budget per model must be one at which the control no longer
gains from more iterations, or the experiment measures the schedule instead of the data.

Two supervised arms per seed and budget, on the same data, plan and held-out cases as the experiment:

* ``experts``: the 4 expert cases alone (the experiment's control);
* ``experts+pool truth``: the expert cases and the 16 pool cases with their true labels, drawn uniformly.

Each model trains for the budget's iterations (poly learning rate over the whole budget) with the given network
and patch, one process per model, ``--workers`` at a time, single-threaded, resumable. Per-case held-out scores go
to ``<root>/<regime>/seed_<s>/headroom/<network>/<arm>_<budget>/test/summary.json``; the table (paired differences
with a bootstrap 95% interval and a Wilcoxon p over (seed, case) pairs) to ``--output``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selftrain_analysis import _mean, _value  # noqa: E402
from selftrain_experiment import (Schedule, data_workspace, experiment_plan, oracle_folder,  # noqa: E402
                                  prepare_seed, regime_root, score_on_held_out, slug, training_settings,
                                  with_network)

ARMS = ("experts", "experts+pool truth")


def model_folder(root: Path, regime: str, seed: int, network: str, arm: str, budget: int, *, init: int = 0) -> Path:
    """The model's folder; ``init`` > 0 names another initialisation (and patch draw) of the same arm."""
    name = f"{slug(arm)}_{budget}" + (f"_init{init}" if init else "")
    return regime_root(root, regime) / f"seed_{seed}" / "headroom" / network / name


def network_name(features: tuple[int, ...], patch: tuple[int, ...]) -> str:
    return "f" + "-".join(map(str, features)) + "_p" + "x".join(map(str, patch))


def train_and_score(root: Path, regime: str, seed: int, arm: str, budget: int, features: tuple[int, ...],
                    patch: tuple[int, ...], *, init: int = 0) -> tuple[str, float]:
    """Train one model (resumably) and score it on the held-out cases; return its name and the seconds taken."""
    import torch

    from covnet.workspace import ModelFolder
    torch.set_num_threads(1)
    started = time.monotonic()
    prepare_seed(root, regime, seed, Schedule())
    data = data_workspace(root, regime, seed)
    plan = with_network(experiment_plan(root, regime, Schedule()), features, patch)
    folder = model_folder(root, regime, seed, network_name(features, patch), arm, budget, init=init)
    experts = sorted(path.stem for path in data.preprocessed_cases.glob("*.json"))
    cases = {case: data.preprocessed_cases for case in experts}
    if arm == "experts+pool truth":
        truth = oracle_folder(root, regime, seed)
        cases.update({path.stem: truth for path in sorted(truth.glob("*.json"))})
    settings = training_settings(Schedule(), seed + 1000 * init, epochs=budget // Schedule().iterations_per_epoch)
    train_on(plan, data, ModelFolder(folder), cases, settings)
    score_on_held_out(data, [ModelFolder(folder).checkpoint("final")], folder / "test")
    return folder.name, time.monotonic() - started


def train_on(plan, workspace, folder, case_folders: dict[str, Path], settings) -> None:
    """Train one model (fold ``all``, no validation) on ``case_folders``' cases into ``folder``, resumably."""
    import torch

    from covnet.training.distributed import context_from_environment
    from covnet.training.run import run_training
    from covnet.training.settings import TrainingJob
    job = TrainingJob(name="all", plan=plan, workspace=workspace, folder=folder, train_cases=sorted(case_folders),
                      validation_cases=[], case_folders=case_folders)
    run_training(job, settings, resume=True, validate_only=False, context=context_from_environment(),
                 device=torch.device("cpu"))


def table(root: Path, regime: str, seeds: list[int], network: str, budgets: list[int]) -> tuple[str, dict]:
    from covnet.evaluation.paired import paired_difference
    scores = {}
    for seed in seeds:
        for arm in ARMS:
            for budget in budgets:
                summary = model_folder(root, regime, seed, network, arm, budget) / "test" / "summary.json"
                rows = json.loads(summary.read_text())["per_case"] if summary.is_file() else []
                for row in rows:
                    scores.setdefault((arm, budget), {})[(seed, row["case"])] = row
    lines = [f"| arm | iterations | pairs | lungs Dice | infection Dice | infection NSD | infection Dice vs experts "
             f"at {budgets[-1]} it (95% CI, p) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    reference = scores.get(("experts", budgets[-1]), {})
    results = {}
    for (arm, budget), rows in sorted(scores.items(), key=lambda item: (ARMS.index(item[0][0]), item[0][1])):
        keys = sorted(rows)

        def mean(structure, metric):
            return _mean(_value(rows[k], structure, metric) for k in keys)
        pairs = [k for k in keys if k in reference]
        difference = None if (arm, budget) == ("experts", budgets[-1]) or not pairs else paired_difference(
            [rows[k]["infection"]["dice"] for k in pairs], [reference[k]["infection"]["dice"] for k in pairs])
        lines.append(f"| {arm} | {budget} | {len(keys)} | {mean('lungs', 'dice'):.3f} | "
                     f"{mean('infection', 'dice'):.3f} | {mean('infection', 'nsd'):.3f} | "
                     f"{'—' if difference is None else difference.describe()} |")
        results[f"{arm} {budget}"] = {"pairs": len(keys), "infection dice": mean("infection", "dice"),
                                      "lungs dice": mean("lungs", "dice"),
                                      "difference": None if difference is None else dataclasses.asdict(difference),
                                      "per_case": {f"{s}/{c}": rows[(s, c)] for s, c in keys}}
    return "\n".join(lines), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="a selftrain_experiment.py folder (its data)")
    parser.add_argument("--regime", default="shift")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1000, 3000], help="iterations per model")
    parser.add_argument("--features", type=int, nargs="+", default=list(Schedule().features))
    parser.add_argument("--patch", type=int, nargs=3, default=list(Schedule().patch))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, help="write the table (.md) and every number (.json) here")
    args = parser.parse_args()
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    experiment_plan(args.root, args.regime, Schedule())      # made once, before the seeds' jobs read it
    features, patch = tuple(args.features), tuple(args.patch)
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(train_and_score, args.root, args.regime, seed, arm, budget, features, patch)
                   for budget in sorted(args.budgets, reverse=True) for seed in args.seeds for arm in ARMS]
        for future in futures:
            name, seconds = future.result()
            print(f"{time.strftime('%H:%M:%S')} {name}: {seconds:.0f} s", flush=True)
    text, results = table(args.root, args.regime, args.seeds, network_name(features, patch), sorted(args.budgets))
    print(text)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        stem = args.output / f"headroom_{args.regime}_{network_name(features, patch)}"
        stem.with_suffix(".md").write_text(text + "\n")
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
