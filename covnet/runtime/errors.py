"""The one error type users see: it names the file and what is wrong with it."""
from __future__ import annotations

import os


class CovnetError(Exception):
    """Bad input or state. ``str(error)`` is one line: ``<path>: <problem>``."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")

    def __reduce__(self):
        # Keep the (path, problem) pair when the error crosses a process boundary.
        return (CovnetError, (self.path, self.problem))


def last_line(error: BaseException, limit: int = 200) -> str:
    """The last non-empty line of a library's (often multi-line) error message, to quote in a one-line error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:limit]
