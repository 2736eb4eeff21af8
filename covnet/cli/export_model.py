"""``covnet_export_model``: a trained model of a workspace as one zip with a manifest of checksums."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from covnet.cli.common import add_workspace_argument, run_command, workspace_from
from covnet.inference.model_choice import CHECKPOINT_CHOICES
from covnet.model_archive.export import export_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covnet_export_model",
        description="Write a trained model (checkpoints, plans.json, dataset.json and manifest.json with the "
                    "SHA-256 of every file) to one zip that covnet_install_model or covnet_predict --model reads. "
                    "By default, the model covnet_predict would use: the self-trained one, else the trained folds.")
    add_workspace_argument(parser)
    parser.add_argument("-o", "--output", required=True, type=Path, help="the zip file to write")
    parser.add_argument("-f", "--folds", nargs="+", default=None, help="export these folds (e.g. 0 1 2 3 4, or all)")
    parser.add_argument("--selftrain", action="store_true", help="export the self-trained model (selftrain/final)")
    parser.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="final",
                        help="which checkpoint of each fold (default: final)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exported = export_model(workspace_from(args), args.output, args.folds, selftrain=args.selftrain,
                            checkpoint=args.checkpoint)
    models = ", ".join(model.name for model in exported.manifest.models)
    print(f"written: {exported.path} ({models}; {exported.size / 1e6:.1f} MB; model id {exported.model_id[:12]})")
    return 0


def entry() -> None:
    sys.exit(run_command("covnet_export_model", main))


if __name__ == "__main__":
    entry()
