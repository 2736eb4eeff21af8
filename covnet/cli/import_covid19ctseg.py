"""``covnet_import_covid19ctseg``: the public COVID-19-CT-Seg release (Zenodo 3757476) → ``<workspace>/raw``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from covnet.cli.common import add_workspace_argument, run_command, workspace_from, writing
from covnet.importers.covid19ctseg import import_covid19ctseg
from covnet.importers.download import download_covid19ctseg
from covnet.workspace import RAW_SCOPE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covnet_import_covid19ctseg",
        description="Convert COVID-19-CT-Seg (20 chest CTs with left lung, right lung and infection masks) into "
                    "the workspace's raw/ folder: int16 HU images (the Radiopaedia cases are restored from their "
                    "0-255 storage), label maps from Lung_and_Infection_Mask, and dataset.json.")
    parser.add_argument("--source", required=True, type=Path,
                        help="folder holding COVID-19-CT-Seg_20cases/ and Lung_and_Infection_Mask/, "
                             "extracted or as the Zenodo zips")
    add_workspace_argument(parser)
    parser.add_argument("--download", action="store_true",
                        help="first fetch the four zips from Zenodo into --source (resumable, checksum-verified)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing raw/imagesTr, raw/labelsTr and raw/dataset.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.download:
        download_covid19ctseg(args.source)
    workspace = workspace_from(args)
    with writing(workspace, RAW_SCOPE, "covnet_import_covid19ctseg", workspace.raw):
        import_covid19ctseg(args.source, workspace, overwrite=args.overwrite)
    return 0


def entry() -> None:
    sys.exit(run_command("covnet_import_covid19ctseg", main))


if __name__ == "__main__":
    entry()
