"""Calibrate covnet.planning.cpu_time's constants by timing real training iterations on this CPU.

Each configuration is a network size of ``covnet.planning.rules.CPU_NETWORK_SIZES`` laid out by the planning
rules for a target spacing and patch (so the timed topologies are the ones CPU plans produce), trained at
batch 2 in float32: one untimed warm-up iteration, then ``--steps`` timed ones. The configurations are
measured ``--rounds`` times, round-robin, and the fastest of all steps counts: other jobs on the cores only
ever add time, and spreading the rounds out gives each configuration quiet moments. Then fits

    seconds ≈ SECONDS_PER_MAC × MACs + SECONDS_PER_ELEMENT × activation elements
              + SECONDS_PER_PARAMETER × parameters + SECONDS_PER_ITERATION

by non-negative least squares on the relative error, and prints the constants and a markdown table.

``--loader`` calibrates the data pipeline's constants instead: for each patch of ``LOADER_PATCHES`` (3D and
"dummy 2D" shapes, the ones CPU plans produce), the training augmentation runs on one thread over
``--batches`` random batches at the pre-augmentation size (``covnet.planning.cpu_measure.loader_seconds``: CPU
time, so other jobs on the cores do not inflate it; the mean over the random draws, a rotated or scaled sample
costing several plain ones), and

    loader seconds ≈ SECONDS_PER_AUGMENTED_VOXEL × batch × patch voxels + SECONDS_PER_LOADED_BATCH

is fitted over the 3D patches. Nearly all of the cost is copying the pre-augmentation block (about 13.5× the
patch's voxels for a 3D patch, about 4× for a dummy-2D one), so dummy-2D patches are listed, not fitted.

    .venv/bin/python benchmarks/calibrate_cpu_time.py [--threads 2] [--steps 2] [--rounds 2] [--json out.json]
    .venv/bin/python benchmarks/calibrate_cpu_time.py --loader [--batches 40] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
from scipy.optimize import nnls

from covnet.planning import cpu_time, rules
from covnet.runtime.cpus import usable_cpu_count

IN_CHANNELS, NUM_CLASSES, BATCH = 1, 4, 2
ISO, ANISO = (1.0, 1.0, 1.0), (3.0, 0.8, 0.8)
# Around the budgets CPU plans work with (0.1–5 s per iteration): far larger patches become bound by memory
# traffic rather than arithmetic and would skew the fit away from the configurations the planner compares.
CONFIGS = [  # (index into CPU_NETWORK_SIZES, target spacing, requested patch (z, y, x))
    (0, ISO, (32, 48, 64)),
    (0, ISO, (40, 48, 72)),
    (0, ANISO, (16, 64, 96)),
    (1, ISO, (48, 48, 64)),
    (2, ISO, (48, 64, 64)),
    (2, ANISO, (16, 96, 96)),
    (3, ISO, (64, 64, 96)),
    (4, ISO, (40, 48, 72)),
    (4, ISO, (64, 64, 64)),
    (4, ANISO, (16, 96, 128)),
    (5, ISO, (64, 64, 80)),
    (5, ANISO, (16, 128, 128)),
    (6, ISO, (64, 64, 64)),
    (6, ISO, (80, 96, 96)),
    (6, ISO, (32, 32, 32)),
]
LOADER_PATCHES = [  # (target spacing, patch (z, y, x)): from the smallest CPU plans to ResEnc M sized ones
    (ISO, (32, 32, 32)), (ISO, (32, 48, 64)), (ISO, (48, 48, 64)), (ISO, (64, 64, 64)), (ISO, (64, 80, 96)),
    (ISO, (96, 96, 96)), (ANISO, (16, 96, 96)), (ANISO, (16, 128, 128)), (ANISO, (24, 160, 160)),
]


def fit(rows: list[dict]) -> np.ndarray:
    """Non-negative least squares of (terms · constants - seconds) / seconds."""
    terms = np.array([row["terms"] for row in rows])
    seconds = np.array([row["seconds"] for row in rows])
    scale = terms.max(axis=0)  # condition the columns; the constants are rescaled back
    solution, _ = nnls(terms / scale / seconds[:, None], np.ones(len(rows)))
    return solution / scale


def finish(names: tuple[str, ...], constants: np.ndarray, rows: list[dict], errors: list[float], path: str | None):
    print(f"\nmax relative error {max(abs(e) for e in errors):.1%}; "
          f"rms {float(np.sqrt(np.mean(np.square(errors)))):.1%}")
    if path:
        with open(path, "w") as out:
            json.dump({"constants": dict(zip(names, constants.tolist())), "rows": rows}, out, indent=2)


def calibrate_loader(batches: int, limit_seconds: float, json_path: str | None) -> int:
    from covnet.planning.cpu_measure import RandomBatches, loader_seconds
    from covnet.training.augmentation import is_dummy_2d, training_read_size, training_transforms

    rows = []
    for spacing, requested in LOADER_PATCHES:
        patch, network = rules.fit_patch_to_network(spacing, requested, IN_CHANNELS, NUM_CLASSES,
                                                    rules.CPU_NETWORK_SIZES[4])
        transforms = training_transforms(patch, network.deep_supervision_scales, lateral_pairs=[(1, 2)])
        read_size = training_read_size(patch)
        started = time.perf_counter()
        seconds = loader_seconds(RandomBatches(read_size, BATCH, IN_CHANNELS, NUM_CLASSES), transforms,
                                 count=batches, limit_seconds=limit_seconds)
        rows.append({"patch": list(patch), "read_size": list(read_size), "seconds": seconds,
                     "dummy_2d": is_dummy_2d(patch), "terms": [BATCH * math.prod(patch), 1.0]})
        print(f"{patch} (read {read_size}): {seconds * 1000:.1f} ms per batch "
              f"({time.perf_counter() - started:.0f} s; load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    constants = fit([row for row in rows if not row["dummy_2d"]])
    names = ("SECONDS_PER_AUGMENTED_VOXEL", "SECONDS_PER_LOADED_BATCH")
    print(f"## batch {BATCH}, one thread, CPU seconds, mean over up to {batches} batches; fitted on the 3D patches")
    for name, value in zip(names, constants):
        print(f"{name} = {value:.4g}")
    print("\n| patch (z,y,x) | read (z,y,x) | measured ms | estimate ms | rel. error |\n|---|---|---|---|---|")
    errors = []
    for row in sorted(rows, key=lambda row: row["dummy_2d"]):
        estimate = float(np.dot(constants, row["terms"]))
        error = (estimate - row["seconds"]) / row["seconds"]
        errors += [] if row["dummy_2d"] else [error]
        print(f"| {'×'.join(map(str, row['patch']))}{' (dummy 2D, not fitted)' if row['dummy_2d'] else ''} "
              f"| {'×'.join(map(str, row['read_size']))} | {row['seconds'] * 1000:.1f} | {estimate * 1000:.1f} "
              f"| {error:+.1%} |")
    finish(names, constants, rows, errors, json_path)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=usable_cpu_count())
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loader", action="store_true", help="calibrate the data pipeline's constants instead")
    parser.add_argument("--batches", type=int, default=40, help="--loader: batches per patch")
    parser.add_argument("--limit", type=float, default=20.0, help="--loader: seconds per patch at most")
    parser.add_argument("--json", help="also write the raw rows and the constants here")
    args = parser.parse_args(argv)
    if args.loader:
        return calibrate_loader(args.batches, args.limit, args.json)

    rows = []
    for index, spacing, requested in CONFIGS:
        size = rules.CPU_NETWORK_SIZES[index]
        patch, network = rules.fit_patch_to_network(spacing, requested, IN_CHANNELS, NUM_CLASSES, size)
        rows.append({"size": index, "description": size.describe(), "spacing": list(spacing), "patch": patch,
                     "parameters": network.parameter_count(), "all_seconds": [], "network": network,
                     "terms": list(cpu_time.cost_terms(patch, BATCH, network))})
    for round_index in range(args.rounds):
        for row in rows:
            started = time.perf_counter()
            seconds = cpu_time.time_training_step(row["network"], row["patch"], BATCH, steps=args.steps,
                                                  threads=args.threads)
            row["all_seconds"] += seconds
            print(f"round {round_index} size {row['size']} {row['patch']}: {', '.join(f'{s:.3f}' for s in seconds)} s "
                  f"({time.perf_counter() - started:.0f} s with warm-up; load {os.getloadavg()[0]:.1f})",
                  file=sys.stderr, flush=True)
    for row in rows:
        row["seconds"] = min(row["all_seconds"])
        del row["network"]

    constants = fit(rows)
    names = ("SECONDS_PER_MAC", "SECONDS_PER_ELEMENT", "SECONDS_PER_PARAMETER", "SECONDS_PER_ITERATION")
    print(f"## threads={args.threads}, batch {BATCH}, float32, fastest of {args.rounds} rounds × {args.steps} steps")
    for name, value in zip(names, constants):
        print(f"{name} = {value:.4g}")
    errors = []
    print("\n| size | network | spacing | patch (z,y,x) | parameters | GMACs (fwd+bwd) | activation elements "
          "| measured s | estimate s | rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        estimate = float(np.dot(constants, row["terms"]))
        errors.append((estimate - row["seconds"]) / row["seconds"])
        print(f"| {row['size']} | {row['description']} | {'×'.join(f'{s:g}' for s in row['spacing'])} "
              f"| {'×'.join(map(str, row['patch']))} | {row['parameters'] / 1e6:.1f} M "
              f"| {row['terms'][0] / 1e9:,.1f} | {row['terms'][1] / 1e6:,.0f} M | {row['seconds']:.3f} "
              f"| {estimate:.3f} | {errors[-1]:+.1%} |")
    finish(names, constants, rows, errors, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
