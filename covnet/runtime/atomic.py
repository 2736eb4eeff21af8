"""Files on disk: write-to-temporary-then-rename (an interrupted job never leaves a file that looks
finished), the matching checked JSON read, and stamps that tell whether a derived file is stale.

Every write is verified before the rename: some writers do not report a full disk (ITK's NIfTI writer prints
"wrote only 0 of … bytes" and returns), so ``atomic_path`` checks the temporary file (not empty, or what the
caller's ``verify`` says) and turns a full disk into a one-line ``CovnetError`` naming the final file. A bad
temporary is deleted, never renamed, and what was finished before stays.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from covnet.runtime.errors import CovnetError, last_line

# ``.tmp-<pid>-<8 hex>-<final name>``: the writer's pid tells a later run whether its writer is dead.
TEMPORARY_NAME = re.compile(r"^\.tmp-(\d+)-[0-9a-f]{8}-")


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A hidden name next to ``path`` that keeps its suffixes (SimpleITK picks the format by them)."""
    path = Path(path)
    return path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")


def _linux_process_state(pid: int) -> tuple[str, float] | None:
    """State letter and start time (seconds since the epoch) of a process, from /proc; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot_time = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                         if line.startswith("btime"))
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], boot_time + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def process_alive(pid: int, not_started_after: float | None = None) -> bool:
    """Whether ``pid`` runs (a zombie does not); with ``not_started_after`` (epoch seconds), a process that
    started later is another one that reuses the pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        pass
    state = _linux_process_state(pid)
    if state is None:
        return True
    letter, started = state
    if letter in "ZX":
        return False
    return not_started_after is None or started <= not_started_after + 1.0


def sweep_dead_temporaries(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete the temporary files and folders that a killed writer left in ``folder`` (only covnet's
    ``.tmp-<pid>-…`` names whose process is gone); return what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in list(folder.iterdir()):
        match = TEMPORARY_NAME.match(entry.name)
        if match and not process_alive(int(match.group(1)), not_started_after=entry.lstat().st_mtime):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
        elif recursive and entry.is_dir() and not entry.is_symlink():
            removed += sweep_dead_temporaries(entry, recursive)
    return removed


def temporary_folder(parent: str | os.PathLike, purpose: str) -> Path:
    """A fresh hidden folder in ``parent`` that ``sweep_dead_temporaries`` removes once its creator is dead."""
    folder = Path(parent) / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{purpose}"
    folder.mkdir(parents=True)
    return folder


# What a writer reports when the disk is full; a free space below this is called full (a failed write stops
# within a block or two of the end of the disk).
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_DISK_BYTES = 1 << 20
# Verifies a finished temporary file: None when it is complete, else what is wrong with it.
Verifier = Callable[[Path], "str | None"]


def not_empty(path: Path) -> str | None:
    size = path.stat().st_size if path.is_file() else None
    if size is None:
        return "the writer left no file"
    return "0 bytes written" if size == 0 else None


def size_is(expected: int) -> Verifier:
    """A verifier: the file holds exactly ``expected`` bytes."""
    def verify(path: Path) -> str | None:
        size = path.stat().st_size if path.is_file() else 0
        return None if size == expected else f"{size} of {expected} bytes written"
    return verify


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _disk_is_full(folder: Path) -> bool:
    free = free_bytes(folder)
    return free is not None and free < _FULL_DISK_BYTES


def incomplete_write(final: Path, detail: str, *, disk_full: bool = False) -> CovnetError:
    """The one-line error for a file that could not be written whole (call it while the temporary still
    occupies its space, so that a full disk is seen as full)."""
    free = free_bytes(final.parent)
    if disk_full or _disk_is_full(final.parent):
        where = "" if free is None else f"{free} bytes free; "
        return CovnetError(final, f"could not be written completely: the disk is full ({where}{detail})")
    where = "" if free is None else f"; {free} bytes free on its disk"
    return CovnetError(final, f"could not be written completely ({detail}{where})")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, verify: Verifier = not_empty) -> Iterator[Path]:
    """Yield a temporary path; once the block has written it, check it with ``verify`` and rename it onto
    ``path``; on any failure delete it. A failed verification, and a full disk however the writer reports it,
    are a one-line ``CovnetError`` naming ``path``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(final)
    try:
        try:
            yield temporary
            problem = verify(temporary)
            if problem:
                raise incomplete_write(final, problem)
            # Flush to disk before the rename, so a power cut cannot leave an empty file under the final name.
            descriptor = os.open(temporary, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        except (OSError, RuntimeError) as error:
            # ENOSPC, or a writer that says less (numpy's "125000 requested and 65504 written", torch's "unexpected
            # pos …") on a disk that is now full.
            code = getattr(error, "errno", None)
            if code in _DISK_FULL_ERRNOS or (code is None and _disk_is_full(final.parent)):
                detail = getattr(error, "strerror", None) or last_line(error)
                raise incomplete_write(final, detail, disk_full=True) from None
            raise
        os.replace(temporary, final)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_json(path: str | os.PathLike, data, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent, allow_nan=True) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    data = text.encode()
    with atomic_path(path, verify=size_is(len(data))) as temporary:
        temporary.write_bytes(data)


def read_json(path: str | os.PathLike, missing_hint: str):
    """Parse a JSON file; a missing or malformed file is a ``CovnetError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CovnetError(path, f"not found; {missing_hint}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CovnetError(path, f"is not valid JSON ({error})") from None


def source_stamp(*paths: str | os.PathLike | None) -> list[list]:
    """Name, size and modification time of each input file: a derived file made from other stamps is stale."""
    stamps = []
    for path in paths:
        if path is not None:
            status = os.stat(path)
            stamps.append([Path(path).name, status.st_size, status.st_mtime_ns])
    return stamps
