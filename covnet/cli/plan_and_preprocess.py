"""covnet_plan_and_preprocess: fingerprint → plans.json → preprocessed cases."""
from __future__ import annotations

import argparse
import json
import sys
import time

from covnet.cli.common import add_workspace_argument, positive_float, positive_int, run_command, workspace_from, writing
from covnet.planning.planner import (
    DEFAULT_DEVICE,
    DEFAULT_GPU_MEMORY_GB,
    DEFAULT_SECONDS_PER_ITERATION,
    PlanOutcome,
    PlanRequest,
    plan_workspace,
)
from covnet.planning.plans import DEVICES
from covnet.preprocessing.run import preprocess_dataset
from covnet.runtime.log import logger
from covnet.workspace import PREPROCESSED_SCOPE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covnet_plan_and_preprocess",
                                     description="Fingerprint the labelled CTs, choose spacing, patch size, batch "
                                                 "size and network topology (plans.json), then preprocess the "
                                                 "labelled cases and the unlabelled pool. A rerun keeps plans.json, "
                                                 "hand edits included, while raw/ and the flags are unchanged, and "
                                                 "redoes the cases an edit made stale.")
    add_workspace_argument(parser)
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help="the device that will train: cuda sizes the patch and batch to the memory budget with "
                             "mixed precision; cpu picks the network width, blocks and patch so that one "
                             "iteration fits --seconds-per-iteration (default: as the workspace's plan, else "
                             f"{DEFAULT_DEVICE})")
    parser.add_argument("--gpu-memory-gb", type=positive_float, default=None,
                        help="training memory budget the patch and batch size must fit; for --device cpu, the "
                             f"RAM training may use (default: as the workspace's plan, else {DEFAULT_GPU_MEMORY_GB:g})")
    parser.add_argument("--seconds-per-iteration", type=positive_float, default=None,
                        help="--device cpu: time budget of one training iteration (batch 2: forward, backward, SGD "
                             "step, and the augmentation workers' share of the cores) (default: as the "
                             f"workspace's plan, else {DEFAULT_SECONDS_PER_ITERATION:g})")
    parser.add_argument("--measure-cpu-time", action=argparse.BooleanOptionalAction, default=None,
                        help="--device cpu: time the planned iteration on this machine (a few seconds), fit the "
                             "time model to it and plan again; --no-measure-cpu-time plans by the model alone "
                             "(deterministic, but calibrated on another CPU) (default: measure)")
    parser.add_argument("-np", "--num-processes", type=positive_int, default=2, help="worker processes (default 2)")
    parser.add_argument("--replan", action="store_true",
                        help="plan afresh, discarding hand edits of plans.json; cases whose preprocessing the new "
                             "plan changes are redone")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo the fingerprint, the plan (discarding hand edits) and every case, even those "
                             "already finished")
    parser.add_argument("--plan-only", action="store_true",
                        help="plan (or keep plans.json), print the plan and stop")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    workspace = workspace_from(args)
    with writing(workspace, PREPROCESSED_SCOPE, "covnet_plan_and_preprocess", workspace.preprocessed):
        return _plan_then_preprocess(workspace, args)


def _describe(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _report_plan(workspace, outcome: PlanOutcome, args: argparse.Namespace) -> None:
    plans_json = workspace.plans_json
    changes = [f"  {name}: {_describe(planned)} → {_describe(edited)}" for name, planned, edited in outcome.edits]
    if not outcome.replanned:
        if outcome.edits:
            print(f"{plans_json} was edited by hand: keeping it. It differs from the planner's choice "
                  f"({workspace.planned_plans_json.name}) in (planned → plans.json):\n" + "\n".join(changes)
                  + "\nCases preprocessed under other values are redone; --replan plans afresh and discards the "
                    "edits.\n")
        else:
            print(f"{plans_json} kept: raw/ and the flags are as it was planned for (--replan plans afresh)\n")
    else:
        flag = "--overwrite" if args.overwrite else "--replan"
        if outcome.edits:
            print(f"{flag}: discarding the hand edits of plans.json (planned → edited):\n" + "\n".join(changes))
        if outcome.why:
            print(f"planning afresh: {outcome.why}")
        print(f"plan written to {plans_json}\n")
    print(outcome.plan.table(edited={name.split(".")[0] for name, _, _ in outcome.edits}
                             if not outcome.replanned else ()))


def _plan_then_preprocess(workspace, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    outcome = plan_workspace(workspace, PlanRequest(args.device, args.gpu_memory_gb, args.seconds_per_iteration),
                             num_processes=args.num_processes, overwrite=args.overwrite, replan=args.replan,
                             measure_cpu_time=args.measure_cpu_time is not False)
    if args.measure_cpu_time is not None and outcome.plan.device != "cpu":
        flag = "--measure-cpu-time" if args.measure_cpu_time else "--no-measure-cpu-time"
        logger(__name__).warning(f"{flag} is ignored: only a CPU plan is timed, and this one is for "
                                 f"{outcome.plan.device} (sized by memory)")
    _report_plan(workspace, outcome, args)
    if args.plan_only:
        return 0
    counts = preprocess_dataset(workspace, outcome.plan, args.num_processes, args.overwrite)
    refused = f", {counts['refused']} unlabelled CT(s) refused (see the warnings)" if counts["refused"] else ""
    print(f"\npreprocessed {counts['done']} cases ({counts['skipped']} already done{refused}) in "
          f"{time.perf_counter() - started:.1f} s → {workspace.preprocessed}")
    return 0


def entry() -> None:
    sys.exit(run_command("covnet_plan_and_preprocess", main))


if __name__ == "__main__":
    entry()
