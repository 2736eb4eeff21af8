"""``covnet_train FOLD``: train one cross-validation fold (0-4, or ``all``) under the workspace's plan."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from covnet.cli.common import add_workspace_argument, run_command, workspace_from
from covnet.runtime.log import logger
from covnet.training.run import TrainingSettings, train_fold


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covnet_train",
        description="Train the residual 3D UNet of plans.json on one fold of a grouped 5-fold split "
                    "(preprocessed/splits.json, written once), then predict the fold's validation cases whole "
                    "and score them. Everything goes to results/fold_FOLD/. Under torchrun it trains with "
                    "DistributedDataParallel.")
    parser.add_argument("fold", help="0, 1, 2, 3, 4, or 'all' (every case, no validation)")
    add_workspace_argument(parser)
    defaults = TrainingSettings(fold="0")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs (default 1000)")
    parser.add_argument("--iters-per-epoch", type=int, default=defaults.iterations_per_epoch,
                        help="training iterations per epoch (default 250)")
    parser.add_argument("--val-iters", type=int, default=defaults.validation_iterations,
                        help="validation patches batches per epoch for the pseudo-Dice (default 50)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="resume from checkpoint_latest.pth (or finish the validation of a trained fold)")
    parser.add_argument("--pretrained", default=None, help="initialise the weights from this checkpoint")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="data-augmentation processes (default: CPU cores - 1, at most 12; 0 = in-process)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="patch sampling and augmentation seed")
    parser.add_argument("--validate-only", action="store_true",
                        help="only (re)do the whole-case validation of checkpoint_final.pth")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                        help="write checkpoint_latest.pth every E epochs (default 50; also on Ctrl-C/SIGTERM)")
    parser.add_argument("--lr", type=float, default=defaults.initial_lr, help="initial learning rate (default 1e-2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA only)")
    parser.add_argument("--no-val-mirroring", action="store_true",
                        help="validate without test-time mirroring (faster)")
    return parser


def settings_from(args: argparse.Namespace) -> TrainingSettings:
    return TrainingSettings(fold=str(args.fold).strip().lower(), epochs=args.epochs,
                            iterations_per_epoch=args.iters_per_epoch, validation_iterations=args.val_iters,
                            device=args.device, num_workers=args.num_workers, seed=args.seed,
                            checkpoint_every=args.checkpoint_every, pretrained=args.pretrained,
                            compile=args.compile, initial_lr=args.lr,
                            validation_mirroring=not args.no_val_mirroring)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workspace = workspace_from(args)
    summary = train_fold(workspace, settings_from(args), resume=args.resume, validate_only=args.validate_only)
    if summary is not None:
        logger(__name__).info(f"validation summary: {workspace.fold(args.fold) / 'validation' / 'summary.json'}")
    return 0


def entry() -> None:
    sys.exit(run_command("covnet_train", main))


if __name__ == "__main__":
    entry()
