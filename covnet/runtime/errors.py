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
