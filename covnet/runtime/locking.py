"""One writer per part of a workspace, and no writer while others read it: a second run says who holds it
instead of redoing, or pulling away, the same work.

The lock is a POSIX record lock (``fcntl.lockf``) on ``<workspace>/.locks/<scope>.lock``: exclusive for a
writer (``exclusive``), shared for a reader (``shared``, e.g. a training reading the preprocessed cases while
``covnet_plan_and_preprocess --overwrite`` would rewrite them). The kernel drops it when the holder exits in any
way, kill -9 included, so a lock left by a dead process is never in the way; and it is not inherited by forked
worker processes, so an orphaned worker cannot hold it either.

Who holds it, for the message: the writer records itself in the lock file, each reader in its own
``<scope>.readers/<pid>.json`` (many readers cannot share one file); a dead holder's record is ignored (its pid
gone, or reused by a later process) and a dead reader's removed.

A record lock belongs to the process, and closing *any* descriptor of the file drops all of the process's locks
on it; so a process opens each lock file once (a nested shared hold rides on the outer one) and refuses to
mix modes itself.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from covnet.runtime.atomic import process_alive, sweep_dead_temporaries, write_json
from covnet.runtime.errors import CovnetError

LOCK_FOLDER = ".locks"


@dataclass
class _Hold:
    pid: int
    mode: str             # "writing" or "reading"
    record: dict          # pid, command, started


_HOLDS: dict[Path, _Hold] = {}   # this process's locks, by lock file


def lock_file(workspace_root: Path, scope: str) -> Path:
    return Path(workspace_root) / LOCK_FOLDER / f"{scope}.lock"


def readers_folder(workspace_root: Path, scope: str) -> Path:
    return Path(workspace_root) / LOCK_FOLDER / f"{scope}.readers"


def _new_record(command: str | None) -> dict:
    return {"pid": os.getpid(), "command": command or Path(sys.argv[0]).name, "started": time.time()}


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text() or "null")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _alive(record: dict) -> bool:
    return process_alive(record["pid"], not_started_after=record.get("started"))


def _describe(record: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    return f"{record.get('command', 'another covnet command')} (pid {record['pid']}, since {started})"


def _live_readers(workspace_root: Path, scope: str) -> list[dict]:
    """The records of the live readers of ``scope`` other than this process; dead readers' records removed."""
    folder = readers_folder(workspace_root, scope)
    readers = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.name.startswith("."):   # a reader's record being written
            continue
        record = _read_record(path)
        if record is None or not _alive(record):
            path.unlink(missing_ok=True)
        elif record["pid"] != os.getpid():
            readers.append(record)
    return readers


def _busy(workspace_root: Path, scope: str, holder: _Hold | None = None) -> CovnetError:
    """``<workspace>: is busy: <who> is writing/reading its <scope>; …`` naming the holder(s)."""
    if holder is not None:
        who, doing = _describe(holder.record), f"is {holder.mode}"
    else:
        writer = _read_record(lock_file(workspace_root, scope))
        readers = _live_readers(workspace_root, scope)
        if writer is not None and _alive(writer) and writer["pid"] != os.getpid():
            who, doing = _describe(writer), "is writing"
        elif readers:
            who, doing = " and ".join(_describe(record) for record in readers), \
                "is reading" if len(readers) == 1 else "are reading"
        else:
            who, doing = "another process", "is using"
    return CovnetError(Path(workspace_root), f"is busy: {who} {doing} its {scope}; wait for it to finish or stop it")


def _hold_here(path: Path) -> _Hold | None:
    hold = _HOLDS.get(path)
    if hold is not None and hold.pid != os.getpid():   # inherited by a forked child, which holds no lock
        del _HOLDS[path]
        return None
    return hold


@contextlib.contextmanager
def _locked(workspace_root: Path, scope: str, mode: str, record: dict) -> Iterator[int]:
    """Open the lock file once and take the record lock (``LOCK_EX`` for writing, ``LOCK_SH`` for reading) or
    raise the busy error; the lock is dropped when the descriptor closes."""
    path = lock_file(workspace_root, scope)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(descriptor, (fcntl.LOCK_EX if mode == "writing" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError:
            raise _busy(workspace_root, scope) from None
        _HOLDS[path] = _Hold(os.getpid(), mode, record)
        try:
            yield descriptor
        finally:
            del _HOLDS[path]
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def exclusive(workspace_root: str | os.PathLike, scope: str, command: str | None = None) -> Iterator[Path]:
    """Hold ``scope`` (e.g. "raw", "preprocessed", "fold_0") of a workspace for writing for the duration of the
    block; ``CovnetError`` naming the holder(s) when another process (or this one) writes or reads it."""
    root, path = Path(workspace_root), lock_file(Path(workspace_root), scope)
    held = _hold_here(path)
    if held is not None:
        raise _busy(root, scope, held)
    record = _new_record(command)
    with _locked(root, scope, "writing", record) as descriptor:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(record).encode(), 0)
        _live_readers(root, scope)   # no reader lives now: this clears the records that killed readers left
        try:
            yield path
        finally:
            os.ftruncate(descriptor, 0)


@contextlib.contextmanager
def shared(workspace_root: str | os.PathLike, scope: str, command: str | None = None) -> Iterator[Path]:
    """Hold ``scope`` for reading for the duration of the block: any number of readers at once, but no writer
    (``exclusive`` refuses while a reader lives, naming it, and ``shared`` refuses while a writer does)."""
    root, path = Path(workspace_root), lock_file(Path(workspace_root), scope)
    held = _hold_here(path)
    if held is not None:
        if held.mode != "reading":
            raise _busy(root, scope, held)
        yield path
        return
    record = _new_record(command)
    reader = readers_folder(root, scope) / f"{os.getpid()}.json"
    write_json(reader, record, indent=None)   # before the lock: a reader that holds it is always named
    try:
        with _locked(root, scope, "reading", record):
            yield path
    finally:
        reader.unlink(missing_ok=True)


@contextlib.contextmanager
def holding(workspace_root: str | os.PathLike, scope: str, command: str, *, sweep: Sequence[os.PathLike] = (),
            reading: Sequence[str] = (), main_process: bool = True) -> Iterator[None]:
    """What a command does around its work: hold ``scope`` for writing and each scope in ``reading`` for
    reading, then clear what a killed run left in the ``sweep`` folders. Under a distributed run only the main
    process (``main_process=True``) takes the locks and sweeps, for every rank."""
    if not main_process:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(exclusive(workspace_root, scope, command))
        for read_scope in reading:
            stack.enter_context(shared(workspace_root, read_scope, command))
        for folder in sweep:
            sweep_dead_temporaries(folder)
        yield


@contextlib.contextmanager
def waiting(path: str | os.PathLike) -> Iterator[None]:
    """Hold the lock file ``path`` (created if missing) exclusively for the duration of the block, waiting while
    another process holds it: for a cache that two commands may fill at once, where the second should wait and
    then reuse the first one's work rather than be refused. A record lock, as above: it keeps other processes
    out, not other threads of this one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)
