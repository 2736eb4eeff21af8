"""``covnet_selftrain``: iterative student–teacher self-training on the workspace's unlabelled pool.

The recipe flags are ``SelfTrainingSettings``' fields, the student's training flags ``TrainingSettings``' (the
same as ``covnet_train``'s; those not given keep the teacher fold's own values). With ``--continue``, flags not
given keep the values the self-training was started with.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from covnet.cli.common import add_workspace_argument, run_command, workspace_from
from covnet.cli.settings_flags import add_settings_flags, given_settings, settings_from_args
from covnet.runtime.sharding import part_id_for
from covnet.selftrain.run import recorded, run_pseudo_label_part, run_selftraining
from covnet.selftrain.settings import SelfTrainingSettings
from covnet.training.settings import TrainingSettings

PROGRAM = "covnet_selftrain"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Self-train on the unlabelled pool: each round the teacher (then the newest student) labels the "
                    "pool, the cases it labels most confidently become pseudo-labelled training cases (their "
                    "uncertain voxels ignored), and a student is trained on the expert cases plus those (by "
                    "default fine-tuned from the newest model; the recipe flags below choose each step). Output: "
                    "results/selftrain/ (summary.json, progress.png, round_NN/, final/). Under torchrun the ranks "
                    "share the labelling and train with DistributedDataParallel; --num-parts/--part-id split one "
                    "round's labelling across separate machines.")
    add_workspace_argument(parser)
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="resume an interrupted self-training (or run more rounds with a larger --max-rounds); "
                             "after --num-parts runs, this is the merge: it selects and trains; flags not given keep "
                             "the values the self-training was started with")
    parser.add_argument("--num-parts", type=int, default=None,
                        help="only label part --part-id of NUM_PARTS of the current round's pool, then stop (run "
                             "the parts on several machines sharing the workspace, then covnet_selftrain --continue)")
    parser.add_argument("--part-id", type=int, default=None,
                        help="which part this run does (0 .. num-parts - 1); required with --num-parts above 1")
    add_settings_flags(parser.add_argument_group("recipe"), SelfTrainingSettings)
    add_settings_flags(parser.add_argument_group("student training (default: the teacher fold's own settings)"),
                       TrainingSettings, exclude=("pretrained",))
    return parser


def settings_from(args: argparse.Namespace, base: SelfTrainingSettings | None) -> SelfTrainingSettings:
    """The flags given, the rest from ``base`` (a continued run's recorded settings) or the defaults."""
    overrides = {**(base.training_overrides if base else {}), **given_settings(TrainingSettings, args)}
    settings = settings_from_args(SelfTrainingSettings, args, base=base)
    TrainingSettings(**overrides)                  # each given training flag is checked (and named) here
    return SelfTrainingSettings(**{**settings.to_json(), "training_overrides": overrides})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    part_id = part_id_for(args.num_parts, args.part_id)
    workspace = workspace_from(args)
    previous = recorded(workspace) if args.resume or args.num_parts is not None else None
    settings = settings_from(args, previous[0] if previous else None)
    if args.num_parts is not None:
        cases = run_pseudo_label_part(workspace, settings, args.num_parts, part_id)
        print(f"pseudo-labelled part {part_id} of {args.num_parts}: {len(cases)} case(s)")
        return 0
    if run_selftraining(workspace, settings, resume=args.resume) is None:
        return 0                                    # a rank other than 0 under torchrun
    print(f"summary: {workspace.selftrain / 'summary.json'}; "
          f"model: {workspace.selftrain_final.checkpoint('final')}")
    return 0


def entry() -> None:
    sys.exit(run_command(PROGRAM, main))


if __name__ == "__main__":
    entry()
