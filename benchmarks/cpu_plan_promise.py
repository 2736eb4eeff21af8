"""Does a CPU plan keep its promise? Plan phantom CTs for this CPU by the model alone and with the timing on
this machine, train each plan briefly with covnet_train's defaults, and compare the seconds per iteration in
``training_log.txt`` with the plan's figure (the measurement when there is one, else the estimate).

    .venv/bin/python benchmarks/cpu_plan_promise.py --work /tmp/promise [--num-labelled 20] [--epochs 2] \\
        [--iters-per-epoch 20] [--modes model measured]

Each mode gets its own workspace with a copy of the same raw phantoms (``covnet_make_phantoms --num-labelled N
--num-unlabelled 0 --num-test 0 --seed 0``), planned with ``covnet_plan_and_preprocess --device cpu`` (mode
``model`` adds ``--no-measure-cpu-time``; mode ``before`` adds nothing, for an older covnet put first on
``PYTHONPATH``, e.g. a ``git worktree`` of an earlier commit), then ``covnet_train 0 --epochs E
--iters-per-epoch I --val-iters 5 --no-val-mirroring`` with the default ``--num-workers``. The first epoch's figure includes the workers' start;
the later epochs are the steady state. Prints a Markdown table for BENCHMARKS.md, with the load averages
before and after each step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

SCRIPTS = Path(sys.executable).parent
MODE_FLAGS = {"model": ["--no-measure-cpu-time"], "measured": [], "before": []}
EPOCH_LINE = re.compile(r"epoch (\d+): .*?, ([0-9.]+) s \(([0-9.]+) s/it\), ([0-9]+)% waiting for data")


def run(*command) -> str:
    result = subprocess.run([str(c) for c in command], check=True, capture_output=True, text=True, encoding="utf-8")
    return result.stdout


def load() -> str:
    return ", ".join(f"{value:.1f}" for value in os.getloadavg())


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def trial(work: Path, mode: str, args: argparse.Namespace) -> dict:
    workspace = work / mode
    shutil.rmtree(workspace, ignore_errors=True)
    shutil.copytree(work / "phantoms" / "raw", workspace / "raw")   # copy2: the raw files keep their stamps
    flags = MODE_FLAGS[mode]
    row = {"mode": mode, "load_before_plan": load()}
    started = time.perf_counter()
    run(SCRIPTS / "covnet_plan_and_preprocess", "--workspace", workspace, "--device", "cpu", "-np", "2", *flags)
    row["plan_seconds"] = time.perf_counter() - started
    plan = json.loads((workspace / "preprocessed" / "plans.json").read_text())
    row.update(patch=plan["patch_size"], features=plan["network"]["features_per_stage"],
               blocks=plan["network"]["n_blocks_per_stage"], estimate=plan["estimated_seconds_per_iteration"],
               measured=plan.get("measured_seconds_per_iteration"),
               reason=plan["reasons"].get("time_per_iteration", ""))
    row["load_before_train"] = load()
    run(SCRIPTS / "covnet_train", "0", "--workspace", workspace, "--epochs", args.epochs, "--iters-per-epoch",
        args.iters_per_epoch, "--val-iters", "5", "--no-val-mirroring")
    row["load_after_train"] = load()
    log = (workspace / "results" / "fold_0" / "training_log.txt").read_text()
    row["epochs"] = [{"seconds_per_iteration": float(per_iteration), "data_wait_percent": int(wait)}
                     for _, _, per_iteration, wait in EPOCH_LINE.findall(log)]
    steady = row["epochs"][1:] or row["epochs"]
    row["steady"] = sum(epoch["seconds_per_iteration"] for epoch in steady) / len(steady)
    row["promised"] = row["measured"] if row["measured"] is not None else row["estimate"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--num-labelled", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iters-per-epoch", type=int, default=20)
    parser.add_argument("--modes", nargs="+", default=["model", "measured"], choices=sorted(MODE_FLAGS))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    phantoms = args.work / "phantoms"
    if not (phantoms / "raw" / "dataset.json").is_file():
        run(SCRIPTS / "covnet_make_phantoms", "--workspace", phantoms, "--num-labelled", args.num_labelled,
            "--num-unlabelled", 0, "--num-test", 0, "--seed", 0)
    import torch

    import covnet
    from covnet.runtime.cpus import usable_cpu_count

    started = datetime.now(timezone.utc)
    rows = [trial(args.work, mode, args) for mode in args.modes]
    print(f"Machine: {cpu_name()}, {usable_cpu_count()} usable CPUs; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; covnet from {Path(covnet.__file__).parent}. "
          f"{started:%Y-%m-%d %H:%M}–{datetime.now(timezone.utc):%H:%M} UTC.")
    print(f"Command: `.venv/bin/python benchmarks/cpu_plan_promise.py {' '.join(sys.argv[1:])}`\n")
    print("| plan | patch (z,y,x) | features / blocks | plan: estimate | plan: measured | training s/it per epoch "
          "(data wait) | steady s/it | steady / promised | load: plan → train → after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        epochs = ", ".join(f"{e['seconds_per_iteration']:.2f} ({e['data_wait_percent']}%)" for e in row["epochs"])
        measured = f"{row['measured']:.2f} s" if row["measured"] is not None else "—"
        print(f"| {row['mode']} | {'×'.join(map(str, row['patch']))} | {'-'.join(map(str, row['features']))} / "
              f"{'-'.join(map(str, row['blocks']))} | {row['estimate']:.2f} s | {measured} | {epochs} "
              f"| {row['steady']:.2f} | {row['steady'] / row['promised']:.2f} | {row['load_before_plan']} → "
              f"{row['load_before_train']} → {row['load_after_train']} |")
    for row in rows:
        print(f"\n{row['mode']}: planning took {row['plan_seconds']:.0f} s; time per iteration: {row['reason']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
