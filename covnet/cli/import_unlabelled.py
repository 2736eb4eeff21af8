"""``covnet_import_unlabelled``: a folder of unlabelled CTs → ``<workspace>/raw/imagesUnlabelled``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from covnet.cli.common import add_workspace_argument, run_command, workspace_from, writing
from covnet.importers.unlabelled import import_unlabelled
from covnet.workspace import RAW_SCOPE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covnet_import_unlabelled",
        description="Add unlabelled chest CTs (NIfTI/MHA/NRRD files and DICOM series folders at any depth, e.g. "
                    "MosMedData's studies/) to raw/imagesUnlabelled as int16 HU; a rerun skips what is already "
                    "imported. dataset.json is not needed and not changed.")
    parser.add_argument("--source", required=True, type=Path, help="folder to search for CTs")
    add_workspace_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workspace = workspace_from(args)
    with writing(workspace, RAW_SCOPE, "covnet_import_unlabelled", workspace.raw):
        import_unlabelled(args.source, workspace)
    return 0


def entry() -> None:
    sys.exit(run_command("covnet_import_unlabelled", main))


if __name__ == "__main__":
    entry()
