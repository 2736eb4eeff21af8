"""``covnet_selftrain``: iterative student–teacher self-training on the workspace's unlabelled pool."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from covnet.cli.common import add_workspace_argument, run_command, workspace_from
from covnet.runtime.errors import CovnetError
from covnet.selftrain.rounds import SelfTrainingSettings, run_pseudo_label_part, run_selftraining

PROGRAM = "covnet_selftrain"


def build_parser() -> argparse.ArgumentParser:
    defaults = SelfTrainingSettings()
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Self-train on the unlabelled pool: each round the teacher pseudo-labels the unused pool, the "
                    "most confident cases join the training set, and a student initialised from the teacher is "
                    "fine-tuned on the teacher fold's expert training cases plus every pseudo-labelled case, then "
                    "validated on the fold's held-out expert cases. The student teaches the next round. Output: "
                    "results/selftrain/ (summary.json, progress.png, round_NN/, final/). Under torchrun the "
                    "ranks share the pseudo-labelling and fine-tune with DistributedDataParallel; "
                    "--num-parts/--part-id split one round's pseudo-labelling across separate machines.")
    add_workspace_argument(parser)
    parser.add_argument("--teacher", default=defaults.teacher,
                        help="best (default: the fold with the highest mean validation Dice over lungs and "
                             "infection), ensemble (every trained fold; held-out cases and initial weights of the "
                             "best fold) or a fold number 0-4")
    parser.add_argument("--cases-per-round", type=int, default=defaults.cases_per_round,
                        help=f"pool cases pseudo-labelled per round, the most confident (default "
                             f"{defaults.cases_per_round})")
    parser.add_argument("--epochs-per-round", type=int, default=defaults.epochs_per_round,
                        help=f"student fine-tuning epochs per round (default {defaults.epochs_per_round})")
    parser.add_argument("--iters-per-epoch", type=int, default=defaults.iterations_per_epoch,
                        help=f"training iterations per epoch (default {defaults.iterations_per_epoch})")
    parser.add_argument("--val-iters", type=int, default=defaults.validation_iterations,
                        help=f"validation patch batches per epoch (default {defaults.validation_iterations})")
    parser.add_argument("--min-confidence", type=float, default=defaults.min_confidence,
                        help="pseudo-label voxels whose largest class probability is below this are ignored in "
                             f"the loss (default {defaults.min_confidence:g}; above 1 ignores every voxel)")
    parser.add_argument("--pseudo-weight", type=float, default=defaults.pseudo_weight,
                        help="how often a pseudo-labelled case is drawn relative to an expert case (default "
                             f"{defaults.pseudo_weight:g})")
    parser.add_argument("--max-rounds", type=int, default=None,
                        help="stop after this many rounds (default: when the pool is used up)")
    parser.add_argument("--keep-best", action="store_true",
                        help="final/ keeps the student with the best mean validation Dice (default: the last)")
    parser.add_argument("--lr", type=float, default=defaults.initial_lr,
                        help=f"initial learning rate of each round's fine-tuning (default {defaults.initial_lr:g})")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                        help=f"write the student's checkpoint_latest.pth every E epochs (default "
                             f"{defaults.checkpoint_every})")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="data-augmentation processes (default: CPU cores - 1, at most 12; 0 = in-process)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="patch sampling and augmentation seed")
    parser.add_argument("--disable-tta", action="store_true",
                        help="no test-time mirroring for the pseudo-labels and the validations (8x faster)")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="resume an interrupted self-training (or run more rounds with a larger --max-rounds); "
                             "after --num-parts runs, this is the merge: it selects and fine-tunes")
    parser.add_argument("--num-parts", type=int, default=None,
                        help="only pseudo-label part --part-id of NUM_PARTS of the current round's unused pool, "
                             "then stop (run the parts on several machines sharing the workspace, then "
                             "covnet_selftrain --continue)")
    parser.add_argument("--part-id", type=int, default=0, help="which part this run does (0 .. num-parts - 1)")
    return parser


def settings_from(args: argparse.Namespace) -> SelfTrainingSettings:
    return SelfTrainingSettings(teacher=str(args.teacher).strip().lower(), cases_per_round=args.cases_per_round,
                                epochs_per_round=args.epochs_per_round, iterations_per_epoch=args.iters_per_epoch,
                                validation_iterations=args.val_iters, min_confidence=args.min_confidence,
                                pseudo_weight=args.pseudo_weight, max_rounds=args.max_rounds,
                                keep_best=args.keep_best, device=args.device, num_workers=args.num_workers,
                                seed=args.seed, tta=not args.disable_tta, initial_lr=args.lr,
                                checkpoint_every=args.checkpoint_every)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_parts is None and args.part_id != 0:
        raise CovnetError(None, f"--part-id {args.part_id} needs --num-parts")
    settings = settings_from(args)
    workspace = workspace_from(args)
    if args.num_parts is not None:
        cases = run_pseudo_label_part(workspace, settings, args.num_parts, args.part_id)
        print(f"pseudo-labelled part {args.part_id} of {args.num_parts}: {len(cases)} case(s)")
        return 0
    if run_selftraining(workspace, settings, resume=args.resume) is None:
        return 0                                    # a rank other than 0 under torchrun
    print(f"summary: {workspace.selftrain / 'summary.json'}; "
          f"model: {workspace.selftrain_final / 'checkpoint_final.pth'}")
    return 0


def entry() -> None:
    sys.exit(run_command(PROGRAM, main))


if __name__ == "__main__":
    entry()
