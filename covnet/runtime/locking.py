"""One writer per part of a workspace: a second run says who holds it instead of redoing the same work.

The lock is a POSIX record lock (``fcntl.lockf``) on ``<workspace>/.locks/<scope>.lock``. The kernel drops
it when the holder exits in any way, kill -9 included, so a lock left by a dead process is never in the
way; and it is not inherited by forked worker processes, so an orphaned worker cannot hold it either.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from covnet.runtime.errors import CovnetError

LOCK_FOLDER = ".locks"


def lock_file(workspace_root: Path, scope: str) -> Path:
    return Path(workspace_root) / LOCK_FOLDER / f"{scope}.lock"


def _holder_description(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        holder = {}
    if not holder:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"{holder.get('command', 'another covnet command')} (pid {holder.get('pid', '?')}, since {started})"


@contextlib.contextmanager
def exclusive(workspace_root: str | os.PathLike, scope: str, command: str | None = None) -> Iterator[Path]:
    """Hold ``scope`` (e.g. "raw", "preprocessed", "fold_0") of a workspace for the duration of the block;
    ``CovnetError`` naming the holder when another live process has it."""
    path = lock_file(Path(workspace_root), scope)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CovnetError(Path(workspace_root), f"is busy: {_holder_description(path)} is writing its "
                                                    f"{scope}; wait for it to finish or stop it") from None
        holder = {"pid": os.getpid(), "command": command or Path(sys.argv[0]).name, "started": time.time()}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(descriptor, 0)
    finally:
        os.close(descriptor)  # releases the lock
