"""``covnet_train FOLD``: train one cross-validation fold (0 .. K-1, or ``all``) under the workspace's plan.

The training flags are ``TrainingSettings``' fields (``covnet.cli.settings_flags``). With ``--continue`` or
``--validate-only``, a flag that is not given keeps the value the fold's training was started with.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from covnet.cli.common import add_workspace_argument, run_command, workspace_from
from covnet.cli.settings_flags import add_settings_flags, given_settings, settings_from_args
from covnet.runtime.log import logger
from covnet.runtime.settings import flag_name
from covnet.training.run import recorded_settings, train_fold
from covnet.training.settings import TrainingSettings
from covnet.training.splits import DEFAULT_NUM_FOLDS
from covnet.workspace import ALL_FOLDS

PROGRAM = "covnet_train"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Train the residual 3D UNet of plans.json on one fold of a grouped K-fold split "
                    "(preprocessed/splits.json, written once), then predict the fold's validation cases whole "
                    "and score them. Everything goes to results/fold_FOLD/. Under torchrun it trains with "
                    "DistributedDataParallel.")
    parser.add_argument("fold", help="a fold of the split, 0 .. K-1, or 'all' (every case, no validation)")
    add_workspace_argument(parser)
    parser.add_argument("--num-folds", type=int, default=None, metavar="K",
                        help=f"folds of the split when splits.json is first made (default {DEFAULT_NUM_FOLDS}; "
                             "2 to the number of patients, which is leave-one-out); another number on an existing "
                             "split is an error")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="resume from checkpoint_latest.pth, finish the validation of a trained fold, or, with "
                             "more --epochs than it ran, extend a finished training; flags not given keep the "
                             "values the training was started with")
    parser.add_argument("--validate-only", action="store_true",
                        help="only (re)do the whole-case validation of checkpoint_final.pth")
    add_settings_flags(parser.add_argument_group("training settings"), TrainingSettings)
    return parser


# What ``--validate-only`` reads: the whole-case validation's settings and the device it runs on.
VALIDATION_SETTINGS = ("device", "validation_step_size", "validation_mirroring")


def ignored_flags(args: argparse.Namespace, fold: str) -> list[str]:
    """A warning for each group of flags given that this run cannot use, saying why."""
    warnings = []
    if args.num_folds is not None and fold == ALL_FOLDS:
        warnings.append(f"--num-folds is ignored: fold '{ALL_FOLDS}' trains on every case, without a split")
    if args.validate_only:
        unused = (["--continue"] if args.resume else []) + [
            flag_name(TrainingSettings, name) for name in given_settings(TrainingSettings, args)
            if name not in VALIDATION_SETTINGS]
        if unused:
            warnings.append(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} ignored: --validate-only "
                            "only redoes the validation of checkpoint_final.pth")
    return warnings


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workspace = workspace_from(args)
    fold = str(args.fold).strip().lower()
    for warning in ignored_flags(args, fold):
        logger(__name__).warning(warning)
    recorded = recorded_settings(workspace.fold(fold)) if args.resume or args.validate_only else None
    settings = settings_from_args(TrainingSettings, args, base=recorded)
    summary = train_fold(workspace, fold, settings, resume=args.resume, validate_only=args.validate_only,
                         num_folds=args.num_folds)
    if summary is not None:
        logger(__name__).info(f"validation summary: {workspace.fold(fold).validation_summary_file}")
    return 0


def entry() -> None:
    sys.exit(run_command(PROGRAM, main))


if __name__ == "__main__":
    entry()
