"""Train one fold on phantom CTs on this machine's CPU and report speed, memory and accuracy.

    python benchmarks/train_cpu.py --workspace /tmp/bench_train --epochs 20 --iters-per-epoch 50

Makes the phantoms (if the workspace has none), plans for the CPU (``--device cpu``), preprocesses, then runs
``covnet_train FOLD`` as a child process and reports: seconds per iteration against the plan's time budget,
the share of step time spent waiting for data, the child's peak RSS against the plan's memory estimate, and
the fold's validation Dice/NSD per structure. Prints one Markdown block for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

SCRIPTS = Path(sys.executable).parent


def run(*command) -> None:
    subprocess.run([str(c) for c in command], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--num-labelled", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fold", default="0")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iters-per-epoch", type=int, default=50)
    parser.add_argument("--val-iters", type=int, default=10)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--plan-args", default="--device cpu", help="extra covnet_plan_and_preprocess flags")
    parser.add_argument("--no-val-mirroring", action="store_true")
    args = parser.parse_args()

    workspace = args.workspace
    if not (workspace / "raw" / "dataset.json").is_file():
        run(SCRIPTS / "covnet_make_phantoms", "--workspace", workspace, "--num-labelled", args.num_labelled,
            "--num-unlabelled", 0, "--num-test", 0, "--seed", args.seed)
    if not (workspace / "preprocessed" / "plans.json").is_file():
        run(SCRIPTS / "covnet_plan_and_preprocess", "--workspace", workspace, "-np", 2, *args.plan_args.split())
    plan = json.loads((workspace / "preprocessed" / "plans.json").read_text())

    command = [SCRIPTS / "covnet_train", args.fold, "--workspace", workspace, "--epochs", args.epochs,
               "--iters-per-epoch", args.iters_per_epoch, "--val-iters", args.val_iters]
    if args.num_workers is not None:
        command += ["--num-workers", args.num_workers]
    if args.no_val_mirroring:
        command.append("--no-val-mirroring")
    fold_dir = workspace / "results" / f"fold_{args.fold}"
    if not (fold_dir / "checkpoint_final.pth").is_file():
        command.append("--continue")
    started = time.perf_counter()
    subprocess.run([str(c) for c in command], check=True)
    wall = time.perf_counter() - started
    peak_rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20

    log = (fold_dir / "training_log.txt").read_text()
    epochs = [(float(s), float(i), float(w)) for s, i, w in
              re.findall(r"lr [0-9.e+-]+, ([0-9.]+) s \(([0-9.]+) s/it\), ([0-9]+)% waiting", log)]
    steady = epochs[1:] or epochs          # the first epoch includes worker start-up
    seconds_per_epoch = sum(s for s, _, _ in steady) / len(steady)
    seconds_per_iteration = sum(i for _, i, _ in steady) / len(steady)
    wait = sum(w for _, _, w in steady) / len(steady)
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    network = plan["network"]
    print(f"\n### CPU training, {date.today()} ({platform.processor() or platform.machine()}, "
          f"{__import__('os').cpu_count()} cores)\n")
    print(f"Command: `python benchmarks/train_cpu.py {' '.join(sys.argv[1:])}`\n")
    print(f"- plan: patch {plan['patch_size']}, batch {plan['batch_size']}, features "
          f"{network['features_per_stage']}, blocks {network['n_blocks_per_stage']}; device "
          f"{plan.get('device', 'cuda')}; time budget {plan.get('seconds_per_iteration', 'n/a')} s/iteration")
    print(f"- {args.epochs} epochs × {args.iters_per_epoch} iterations: {seconds_per_epoch:.1f} s per epoch "
          f"(train + {args.val_iters} validation batches) after the first, "
          f"{seconds_per_iteration:.2f} s per training iteration; "
          f"{wait:.0f}% of step time waiting for data; whole command {wall / 60:.1f} min")
    print(f"- peak RSS of the training process {peak_rss_gb:.2f} GB; plan's memory estimate "
          f"{plan['estimated_memory_gb']:.2f} GB")
    print("- fold validation (whole cases): " + ", ".join(
        f"{name} Dice {values['dice']:.3f} / NSD {values['nsd']:.3f}"
        for name, values in summary["mean"].items() if values["dice"] is not None))


if __name__ == "__main__":
    main()
