#!/usr/bin/env python3
"""Training on a CPU in bfloat16 (autocast) or float32: how much faster, and as accurate?

    python benchmarks/cpu_train_precision.py speed [--repeats 8] [--all-sizes]
    python benchmarks/cpu_train_precision.py accuracy --root /tmp/precision [--iterations 1500] [--seeds 0 1 2] \\
        [--held-out 12] [--network plan|small] [--workers 2]
    python benchmarks/cpu_train_precision.py accuracy --root /tmp/precision_smoke --iterations 20 --seeds 0 \\
        --held-out 2 --network small                                     # a smoke check, a few minutes

``speed``: seconds per training iteration of the CPU plan's network (``--plans``, default: the CPU plan of a few
small phantoms, planned here by the model alone) in float32 and under bfloat16 autocast, side by side in one
process: both networks built once, then ``--repeats`` rounds of one iteration each, alternating which goes first
(``covnet.planning.cpu_measure.NetworkStep``: covnet_train's own step on a fixed random batch, no augmentation, so
the ratio is the network's: ``covnet.planning.cpu_time.BFLOAT16_NETWORK_FACTOR``). Median and minimum of each,
and the median of the per-round ratios. ``--all-sizes`` also times every network size a CPU plan can choose
(``covnet.planning.rules.CPU_NETWORK_SIZES``) at the plan's patch. ``--with-augmentation`` also times whole
iterations with covnet_train's default augmentation workers (``measure_training_iteration``, as the planner does).

``accuracy``: paired training runs that differ only in precision (``--fp32`` or not): the same phantoms
(``--labelled`` training cases, ``--held-out`` test cases, one draw for every seed), the same plan and network
(``--network plan``: the data's CPU plan as planned here; ``small``: ``selftrain_experiment.py``'s cheap network),
the same seed, ``--iterations`` iterations each (fold ``all``, no validation, poly learning rate over the run),
one single-threaded process per run, ``--workers`` at a time. Every model labels the held-out cases without
mirroring (``selftrain_experiment.score_on_held_out``, the prediction's own default precision, the same for both).
The table: per precision the mean lungs and infection Dice, and bfloat16 - float32 with a paired 95% bootstrap
interval and a Wilcoxon p (``covnet.evaluation.paired``) over the held-out cases, each case's Dice averaged over
the seeds first (the cases, not the (seed, case) pairs, are the independent units). Resumable: a run with its
held-out scores is skipped, an unfinished one continues. Writes ``--output``/accuracy_<network>.json and .md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selftrain_experiment import Schedule, score_on_held_out, with_network  # noqa: E402
from selftrain_headroom import train_on  # noqa: E402

PRECISIONS = ("float32", "bfloat16")
OUTPUT = Path(__file__).resolve().parent / "results" / "cpu_train_precision"
SCRIPTS = Path(sys.executable).parent
ITERATIONS_PER_EPOCH = 25


# ------------------------------------------------------------------------------------------------ the machine
def machine_record() -> dict:
    """What the numbers were measured on: CPU model, its bfloat16 flags, threads, torch, date, load."""
    import torch

    from covnet.runtime.cpus import usable_cpu_count
    from covnet.runtime.precision import cpu_has_native_bfloat16
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        model = platform.processor() or platform.machine()
    try:
        flags = set(re.findall(r"\b(amx_bf16|amx_tile|avx512_bf16|avx512f)\b", Path("/proc/cpuinfo").read_text()))
    except OSError:
        flags = set()
    return {"cpu": model, "flags": sorted(flags), "native_bfloat16": cpu_has_native_bfloat16(),
            "cores": usable_cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load_average": os.getloadavg()}


def describe_machine(record: dict) -> str:
    return (f"{record['cpu']} ({record['cores']} cores, {record['threads']} threads; flags "
            f"{', '.join(record['flags']) or 'none'}), torch {record['torch']}, {record['date']}, load average "
            f"{' '.join(f'{v:.1f}' for v in record['load_average'])}")


# ------------------------------------------------------------------------------------------------ the plan
def phantom_workspace(root: Path, *, labelled: int, held_out: int, seed: int = 0):
    """A workspace of small phantoms (made once): ``labelled`` training cases and ``held_out`` test cases."""
    from covnet.phantoms.generate import make_phantom_dataset
    from covnet.workspace import Workspace
    workspace = Workspace(root)
    if not workspace.dataset_json.is_file():
        make_phantom_dataset(workspace, num_labelled=labelled, num_unlabelled=0, num_test=held_out, seed=seed,
                             overwrite=True, distinct_patients=True, burden_range=Schedule().burden_range)
    return workspace


def cpu_plan(workspace):
    """The workspace's CPU plan, planned here by the time model alone (made once)."""
    from covnet.planning.planner import plan_dataset
    from covnet.planning.plans import Plan
    if workspace.plans_json.is_file():
        return Plan.load(workspace.plans_json)
    return plan_dataset(workspace, device="cpu", measure_cpu_time=False)


# ------------------------------------------------------------------------------------------------ speed
def time_interleaved(topology, patch, batch: int, repeats: int) -> dict:
    """Seconds of one training iteration in each precision, ``repeats`` rounds, alternating the order."""
    from covnet.planning.cpu_measure import NetworkStep
    steps = {name: NetworkStep(topology, patch, batch, bfloat16=name == "bfloat16") for name in PRECISIONS}
    for step in steps.values():
        step()                                          # warm-up: oneDNN's first calls, allocations
    seconds = {name: [] for name in PRECISIONS}
    cpu_seconds = {name: [] for name in PRECISIONS}
    for round_index in range(repeats):
        for name in (PRECISIONS if round_index % 2 == 0 else PRECISIONS[::-1]):
            started = time.process_time()
            seconds[name].append(steps[name]())
            cpu_seconds[name].append(time.process_time() - started)
    result = {"patch": list(patch), "batch": batch, "parameters": topology.parameter_count(),
              "features": list(topology.features_per_stage), "blocks": list(topology.n_blocks_per_stage),
              "seconds": seconds, "cpu_seconds": cpu_seconds}
    for kind, values in (("wall", seconds), ("cpu", cpu_seconds)):
        ratios = [b / f for f, b in zip(values["float32"], values["bfloat16"])]
        result[f"{kind}_median_ratio"] = statistics.median(ratios)
        for name in PRECISIONS:
            result[f"{kind}_{name}_median"] = statistics.median(values[name])
            result[f"{kind}_{name}_min"] = min(values[name])
        result[f"{kind}_ratio_of_minima"] = result[f"{kind}_bfloat16_min"] / result[f"{kind}_float32_min"]
    return result


def time_with_augmentation(plan) -> dict:
    from covnet.planning.cpu_measure import measure_training_iteration
    from covnet.planning.planner import this_machine
    workers = this_machine().workers
    return {name: dataclasses.asdict(measure_training_iteration(
        plan.network, plan.patch_size, plan.batch_size, workers=workers, lateral_pairs=plan.lateral_pairs,
        ignore_label=plan.ignore_label, bfloat16=name == "bfloat16")) for name in PRECISIONS}


def speed(args) -> None:
    import torch

    from covnet.planning import rules
    from covnet.planning.plans import Plan
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = Plan.load(args.plans) if args.plans else cpu_plan(
        phantom_workspace(args.workspace, labelled=4, held_out=0))
    before = machine_record()
    print(f"machine: {describe_machine(before)}", flush=True)
    rows = [("the plan's", time_interleaved(plan.network, plan.patch_size, plan.batch_size, args.repeats))]
    if args.all_sizes:
        for size in rules.CPU_NETWORK_SIZES:
            patch, network = rules.fit_patch_to_network(plan.target_spacing, plan.patch_size, plan.in_channels,
                                                        plan.num_classes, size)
            rows.append((size.describe(), time_interleaved(network, patch, plan.batch_size, args.repeats)))
    augmented = time_with_augmentation(plan) if args.with_augmentation else None
    after = machine_record()
    lines = [f"bfloat16 vs float32 training on this CPU: {describe_machine(before)}; load average after "
             f"{' '.join(f'{v:.1f}' for v in after['load_average'])}", "",
             f"One training iteration (forward, Dice+CE loss in float32, backward, clipping, SGD), batch "
             f"{plan.batch_size}, no augmentation, {args.repeats} interleaved rounds; wall seconds, and the "
             "process's CPU seconds (all threads; other jobs on the cores inflate them less):", "",
             "| network | features | patch | seconds | float32 (median / min) | bfloat16 (median / min) "
             "| bf16/fp32 (median of rounds) | ratio of minima |", "|---|---|---|---|---|---|---|---|"]
    for name, row in rows:
        for kind in ("wall", "cpu"):
            lines.append(f"| {name} | {'-'.join(map(str, row['features']))} | {'×'.join(map(str, row['patch']))} "
                         f"| {kind} | {row[f'{kind}_float32_median']:.3f} / {row[f'{kind}_float32_min']:.3f} "
                         f"| {row[f'{kind}_bfloat16_median']:.3f} / {row[f'{kind}_bfloat16_min']:.3f} "
                         f"| {row[f'{kind}_median_ratio']:.3f} | {row[f'{kind}_ratio_of_minima']:.3f} |")
    if augmented:
        lines += ["", "Whole iterations with the augmentation workers (median of 3): " + ", ".join(
            f"{name} {timing['seconds']:.3f} s" for name, timing in augmented.items())]
    text = "\n".join(lines)
    print(text)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"speed_{before['date'][:10]}_{before['threads']}threads"
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps(
        {"machine_before": before, "machine_after": after, "plan": {"patch": plan.patch_size,
         "batch": plan.batch_size, "network": plan.network.to_json()}, "rows": dict(rows),
         "with_augmentation": augmented, "command": sys.argv[1:]}, indent=1))


# ------------------------------------------------------------------------------------------------ accuracy
def accuracy_plan(root: Path, network: str):
    """The experiment's plan (made once, saved in ``root``): the data's CPU plan, or with the cheap network; with
    mixed precision, which the float32 runs turn off with ``--fp32``."""
    from covnet.planning.plans import Plan
    path = root / f"plans_{network}.json"
    if path.is_file():
        return Plan.load(path)
    plan = dataclasses.replace(cpu_plan(data_workspace(root)), mixed_precision=True)
    if network == "small":
        schedule = Schedule()
        plan = with_network(plan, schedule.features, schedule.patch)
    plan.save(path)
    return plan


def data_workspace(root: Path):
    from covnet.workspace import Workspace
    return Workspace(root / "data")


def prepare_data(root: Path, labelled: int, held_out: int, network: str) -> None:
    """Phantoms, the plan and the preprocessed training cases, once, before the runs start."""
    from covnet.preprocessing.run import preprocess_dataset
    workspace = phantom_workspace(data_workspace(root).root, labelled=labelled, held_out=held_out, seed=1000)
    plan = accuracy_plan(root, network)
    preprocess_dataset(workspace, plan, num_processes=1)


def run_folder(root: Path, network: str, iterations: int, seed: int, precision: str) -> Path:
    return root / f"{network}_{iterations}it" / f"seed_{seed}" / precision


def train_and_score(root: Path, network: str, iterations: int, seed: int, precision: str) -> tuple[str, float]:
    """One training run (resumably) and its held-out scores; its name and the seconds it took here."""
    import torch

    from covnet.training.settings import TrainingSettings
    from covnet.workspace import ModelFolder
    torch.set_num_threads(1)
    started = time.monotonic()
    folder = run_folder(root, network, iterations, seed, precision)
    if not (folder / "test" / "summary.json").is_file():
        data = data_workspace(root)
        plan = accuracy_plan(root, network)
        per_epoch = min(ITERATIONS_PER_EPOCH, iterations)
        epochs = max(1, iterations // per_epoch)
        settings = TrainingSettings(epochs=epochs, iterations_per_epoch=per_epoch, validation_iterations=0, seed=seed,
                                    device="cpu", num_workers=0, checkpoint_every=max(1, epochs // 4),
                                    validation_mirroring=False, fp32=precision == "float32")
        cases = sorted(path.stem for path in data.preprocessed_cases.glob("*.json"))
        train_on(plan, data, ModelFolder(folder), {case: data.preprocessed_cases for case in cases}, settings)
        score_on_held_out(data, [ModelFolder(folder).checkpoint("final")], folder / "test")
    return f"{folder.parent.name}/{precision}", time.monotonic() - started


def training_seconds(folder: Path) -> float | None:
    from covnet.checkpoint import Checkpoint
    checkpoint = folder / "checkpoint_final.pth"
    return float(sum(Checkpoint.load(checkpoint).history["epoch_seconds"])) if checkpoint.is_file() else None


def accuracy_table(root: Path, network: str, iterations: int, seeds: list[int]) -> tuple[str, dict]:
    from covnet.evaluation.paired import paired_difference
    scores = {name: {} for name in PRECISIONS}          # precision -> case -> structure -> [Dice per seed]
    seconds = {name: [] for name in PRECISIONS}
    for seed in seeds:
        for name in PRECISIONS:
            folder = run_folder(root, network, iterations, seed, name)
            summary = folder / "test" / "summary.json"
            if not summary.is_file():
                continue
            seconds[name].append(training_seconds(folder))
            for row in json.loads(summary.read_text())["per_case"]:
                for structure in ("lungs", "infection"):
                    scores[name].setdefault(row["case"], {}).setdefault(structure, []).append(
                        row[structure]["dice"])
    cases = sorted(set(scores["float32"]) & set(scores["bfloat16"]))

    def case_mean(name, case, structure):
        values = [v for v in scores[name][case][structure] if v is not None]
        return sum(values) / len(values) if values and len(scores[name][case][structure]) == len(seeds) else None

    results = {"network": network, "iterations": iterations, "seeds": seeds, "cases": cases,
               "training_seconds": seconds, "structures": {}}
    lines = ["| structure | float32 Dice | bfloat16 Dice | bfloat16 - float32 (95% CI, p, cases) |",
             "|---|---|---|---|"]
    for structure in ("lungs", "infection"):
        a = [case_mean("bfloat16", case, structure) for case in cases]
        b = [case_mean("float32", case, structure) for case in cases]
        difference = paired_difference(a, b)
        means = [statistics.mean(v for v in values if v is not None) if any(v is not None for v in values)
                 else float("nan") for values in (b, a)]
        lines.append(f"| {structure} | {means[0]:.3f} | {means[1]:.3f} | {difference.describe()} |")
        results["structures"][structure] = {"float32": b, "bfloat16": a,
                                            "difference": dataclasses.asdict(difference)}
    speeds = ", ".join(f"{name} {statistics.mean(s) / iterations:.3f} s/iteration" for name, s in seconds.items()
                       if s and None not in s)
    header = (f"{network} network, {iterations} iterations, seeds {seeds}, {len(cases)} held-out cases "
              f"(each case's Dice averaged over the seeds); training time {speeds or 'n/a'}")
    return header + "\n\n" + "\n".join(lines), results


def accuracy(args) -> None:
    from covnet.runtime.precision import cpu_has_native_bfloat16
    if not cpu_has_native_bfloat16():
        sys.exit("this CPU has neither AMX nor AVX512-BF16: covnet trains in float32 here, nothing to compare")
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    record = machine_record()
    print(f"machine: {describe_machine(record)}", flush=True)
    prepare_data(args.root, args.labelled, args.held_out, args.network)
    jobs = [(seed, name) for seed in args.seeds for name in PRECISIONS]
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(train_and_score, args.root, args.network, args.iterations, seed, name)
                   for seed, name in jobs]
        for future in futures:
            name, seconds = future.result()
            print(f"{time.strftime('%H:%M:%S')} {name}: {seconds:.0f} s", flush=True)
    text, results = accuracy_table(args.root, args.network, args.iterations, args.seeds)
    text = f"bfloat16 vs float32 training, {describe_machine(record)}\n\n{text}"
    print(text)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"accuracy_{args.network}_{args.iterations}it"
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps({**results, "machine": record, "command": sys.argv[1:]},
                                                    indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    timing = commands.add_parser("speed", help="seconds per training iteration, float32 vs bfloat16")
    timing.add_argument("--plans", type=Path, help="a plans.json (default: the CPU plan of small phantoms)")
    timing.add_argument("--workspace", type=Path, default=Path("/tmp/cpu_train_precision_speed"),
                        help="where the phantoms for the default plan go")
    timing.add_argument("--repeats", type=int, default=8)
    timing.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    timing.add_argument("--all-sizes", action="store_true", help="also every network size of a CPU plan")
    timing.add_argument("--with-augmentation", action="store_true",
                        help="also whole iterations with the augmentation workers")
    timing.add_argument("--output", type=Path, default=OUTPUT)
    paired = commands.add_parser("accuracy", help="paired training runs, float32 vs bfloat16, held-out Dice")
    paired.add_argument("--root", type=Path, required=True, help="the experiment's folder (data, runs)")
    paired.add_argument("--iterations", type=int, default=1500)
    paired.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    paired.add_argument("--labelled", type=int, default=8, help="training cases")
    paired.add_argument("--held-out", type=int, default=12, help="held-out test cases")
    paired.add_argument("--network", choices=("plan", "small"), default="plan")
    paired.add_argument("--workers", type=int, default=2)
    paired.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    speed(args) if args.command == "speed" else accuracy(args)


if __name__ == "__main__":
    main()
