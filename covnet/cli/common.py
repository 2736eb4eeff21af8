"""What every command shares: ``--workspace`` and turning ``CovnetError`` into one line and exit 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from covnet.errors import CovnetError
from covnet.workspace import Workspace


def add_workspace_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", default=None,
                        help="dataset folder holding raw/, preprocessed/, results/ "
                             "(default: $COVNET_WORKSPACE, then ./covnet_workspace)")


def workspace_from(args: argparse.Namespace) -> Workspace:
    return Workspace.resolve(args.workspace)


def run_command(name: str, main: Callable[[Sequence[str] | None], int | None],
                argv: Sequence[str] | None = None) -> int:
    """Run ``main``; a ``CovnetError`` becomes ``<name>: error: <file>: <problem>`` on stderr and exit 2."""
    try:
        return int(main(argv) or 0)
    except CovnetError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
