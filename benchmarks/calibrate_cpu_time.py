"""Calibrate covnet.planning.cpu_time's constants by timing real training iterations on this CPU.

Each configuration is a network size of ``covnet.planning.rules.CPU_NETWORK_SIZES`` laid out by the planning
rules for a target spacing and patch (so the timed topologies are the ones CPU plans produce), trained at
batch 2 in float32: one untimed warm-up iteration, then ``--steps`` timed ones. The configurations are
measured ``--rounds`` times, round-robin, and the fastest of all steps counts: other jobs on the cores only
ever add time, and spreading the rounds out gives each configuration quiet moments. Then fits

    seconds ≈ SECONDS_PER_MAC × MACs + SECONDS_PER_ELEMENT × activation elements
              + SECONDS_PER_PARAMETER × parameters + SECONDS_PER_ITERATION

by non-negative least squares on the relative error, and prints the constants and a markdown table.

    .venv/bin/python benchmarks/calibrate_cpu_time.py [--threads 2] [--steps 2] [--rounds 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from scipy.optimize import nnls

from covnet.planning import cpu_time, rules

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


def fit(rows: list[dict]) -> np.ndarray:
    """Non-negative least squares of (terms · constants - seconds) / seconds."""
    terms = np.array([row["terms"] for row in rows])
    seconds = np.array([row["seconds"] for row in rows])
    scale = terms.max(axis=0)  # condition the columns; the constants are rescaled back
    solution, _ = nnls(terms / scale / seconds[:, None], np.ones(len(rows)))
    return solution / scale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the raw rows and the constants here")
    args = parser.parse_args(argv)

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
    print(f"\nmax relative error {max(abs(e) for e in errors):.1%}; "
          f"rms {float(np.sqrt(np.mean(np.square(errors)))):.1%}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"constants": dict(zip(names, constants.tolist())), "rows": rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
