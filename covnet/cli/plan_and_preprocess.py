"""covnet_plan_and_preprocess: fingerprint → plans.json → preprocessed cases."""
from __future__ import annotations

import argparse
import sys
import time

from covnet.cli.common import add_workspace_argument, run_command, workspace_from, writing
from covnet.planning.planner import plan_dataset
from covnet.preprocessing.run import preprocess_dataset


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covnet_plan_and_preprocess",
                                     description="Fingerprint the labelled CTs, choose spacing, patch size, batch "
                                                 "size and network topology (plans.json), then preprocess the "
                                                 "labelled cases and the unlabelled pool.")
    add_workspace_argument(parser)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="the device that will train: cuda sizes the patch and batch to the memory budget with "
                             "mixed precision; cpu picks the network width, blocks and patch so that one "
                             "iteration fits --seconds-per-iteration (default cuda)")
    parser.add_argument("--gpu-memory-gb", type=positive_float, default=8.0,
                        help="training memory budget the patch and batch size must fit; for --device cpu, the "
                             "RAM training may use (default 8)")
    parser.add_argument("--seconds-per-iteration", type=positive_float, default=1.0,
                        help="--device cpu: time budget of one training iteration (forward, backward, SGD step "
                             "at batch 2), by a time model calibrated on a 2-core CPU (default 1)")
    parser.add_argument("--measure-cpu-time", action="store_true",
                        help="--device cpu: time the chosen iteration on this machine and rescale the time model "
                             "to it before planning again (slower, and no longer deterministic)")
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo the fingerprint and every case, even those already finished")
    parser.add_argument("--plan-only", action="store_true", help="write plans.json and stop")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    workspace = workspace_from(args)
    with writing(workspace, "preprocessed", "covnet_plan_and_preprocess", workspace.preprocessed):
        return _plan_then_preprocess(workspace, args)


def _plan_then_preprocess(workspace, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    plan = plan_dataset(workspace, args.gpu_memory_gb, args.num_processes, args.overwrite, device=args.device,
                        seconds_per_iteration=args.seconds_per_iteration, measure_cpu_time=args.measure_cpu_time)
    print(f"plan written to {workspace.plans_json}\n")
    print(plan.table())
    if args.plan_only:
        return 0
    counts = preprocess_dataset(workspace, plan, args.num_processes, args.overwrite)
    refused = f", {counts['refused']} unlabelled CT(s) refused (see the warnings)" if counts["refused"] else ""
    print(f"\npreprocessed {counts['done']} cases ({counts['skipped']} already done{refused}) in "
          f"{time.perf_counter() - started:.1f} s → {workspace.preprocessed}")
    return 0


def entry() -> None:
    sys.exit(run_command("covnet_plan_and_preprocess", main))


if __name__ == "__main__":
    entry()
