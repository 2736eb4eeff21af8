"""``covnet_install_model``: check a model zip against its manifest and unpack it, once, into the model cache."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from covnet.cli.common import run_command
from covnet.model_archive.install import install_model_archive, model_cache_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covnet_install_model",
        description="Verify every file of a model zip (covnet_export_model) against the SHA-256 in its manifest and "
                    f"unpack it into {model_cache_dir()}/<model id> ($XDG_CACHE_HOME/covnet/models); a model "
                    "already installed is left as it is. A tampered, truncated or path-escaping zip is refused.")
    parser.add_argument("archive", type=Path, help="the model zip")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    installed = install_model_archive(args.archive)
    state = "installed" if installed.newly_installed else "already installed, nothing to do"
    models = ", ".join(model.name for model in installed.manifest.models)
    print(f"{state}: {installed.folder} (model id {installed.model_id[:12]}; {models})")
    return 0


def entry() -> None:
    sys.exit(run_command("covnet_install_model", main))


if __name__ == "__main__":
    entry()
