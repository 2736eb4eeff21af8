"""What every command shares: ``--workspace``, the workspace locks, and turning errors into one line.

``CovnetError`` and operating-system errors (permissions, a read-only disk, a path that is a file) end as
``<command>: error: <path>: <problem>`` on stderr with exit code 2, never as a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from typing import Callable, Sequence

from covnet.runtime.cpus import limit_torch_threads
from covnet.runtime.errors import CovnetError
from covnet.runtime.locking import holding
from covnet.runtime.log import setup_logging
from covnet.workspace import Workspace

_OS_ERROR_HINTS = {errno.EACCES: "check its permissions", errno.EPERM: "check its permissions",
                   errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full; free some space",
                   errno.EDQUOT: "the disk quota is exceeded; free some space",
                   errno.ENOTDIR: "a part of this path is a file, not a folder"}


def add_workspace_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", default=None,
                        help="dataset folder holding raw/, preprocessed/, results/ "
                             "(default: $COVNET_WORKSPACE, then ./covnet_workspace)")


def positive_int(text: str) -> int:
    """An argparse type for counts such as ``-np``: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, not {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type for budgets: a number above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def workspace_from(args: argparse.Namespace) -> Workspace:
    workspace = Workspace.resolve(args.workspace)
    if workspace.root.exists() and not workspace.root.is_dir():
        raise CovnetError(workspace.root, "is a file; --workspace must name a folder")
    return workspace


def writing(workspace: Workspace, scope: str, command: str, *owned_folders: os.PathLike
            ) -> contextlib.AbstractContextManager[None]:
    """Hold the workspace lock for ``scope`` and first clear what a killed run left in ``owned_folders``."""
    return holding(workspace.root, scope, command, sweep=owned_folders)


def os_error_line(error: OSError) -> CovnetError:
    """An OSError as ``<path>: <what> (<hint>)``."""
    what = error.strerror or str(error)
    hint = _OS_ERROR_HINTS.get(error.errno)
    problem = f"{what} ({hint})" if hint else what
    return CovnetError(error.filename, problem)


def run_command(name: str, main: Callable[[Sequence[str] | None], int | None],
                argv: Sequence[str] | None = None) -> int:
    """Run ``main``; a ``CovnetError`` or ``OSError`` becomes ``<name>: error: <file>: <problem>`` on stderr
    and exit 2."""
    setup_logging()
    limit_torch_threads()
    try:
        return int(main(argv) or 0)
    except CovnetError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{name}: error: {os_error_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
