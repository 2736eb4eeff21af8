"""The one way covnet reports: ``logger(__name__).info/warning`` in library code, never ``print``.

A command calls ``setup_logging`` once: information goes to stdout, ``warning: …`` lines to stderr, and,
when given, everything also to a log file. Under distributed training only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path

ROOT = "covnet"
# The console is the process's: a thread that redirects stdout/stderr for a moment (covnet.image.io keeps ITK's
# console messages off the terminal) holds this lock, and so does every line covnet writes to the console (the
# console handler's own lock), or a line written meanwhile would be lost or end up in a read error.
CONSOLE_LOCK = threading.RLock()
# A forked child (a data-loading worker) starts with the lock free, even if another thread held it at the fork.
os.register_at_fork(after_in_child=CONSOLE_LOCK._at_fork_reinit)


def logger(name: str = ROOT) -> logging.Logger:
    """The logger for a module (pass ``__name__``); all of them hang below ``covnet``. Until a command
    calls ``setup_logging``, covnet logs to the console (so plain Python calls and notebooks see it too)."""
    root = logging.getLogger(ROOT)
    if not root.handlers:
        setup_logging()
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


class _ConsoleHandler(logging.Handler):
    """INFO to stdout as is, WARNING and above to stderr as ``warning: …`` / ``error: …``. The streams are
    looked up at each record, so redirection (pytest's capture, tqdm) is honoured."""

    def createLock(self) -> None:
        self.lock = CONSOLE_LOCK

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                _write(sys.stderr, f"{record.levelname.lower()}: {message}\n")
            else:
                _write(sys.stdout, message + "\n")
        except Exception:  # logging must never take the job down
            self.handleError(record)


def _write(stream, text: str) -> None:
    """Write and flush; a console whose encoding lacks a character (an ASCII locale) gets '?' for it rather
    than a lost message."""
    try:
        stream.write(text)
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(encoding, errors="replace").decode(encoding))
    stream.flush()


class _LogFileHandler(logging.FileHandler):
    """The log file; when it cannot be written (a full disk), one warning and the console only, instead of
    logging's traceback at every record."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        logging.getLogger(ROOT).removeHandler(self)
        sys.stderr.write(f"warning: {self.baseFilename}: cannot be written ({error.strerror or error}); "
                         f"logging to the console only\n")
        with contextlib.suppress(OSError):
            self.close()


def distributed_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup_logging(log_file: str | os.PathLike | None = None, rank: int | None = None,
                  level: int = logging.INFO) -> logging.Logger:
    """Route ``covnet`` logs to the console (and ``log_file``, appended); ranks other than 0 stay silent."""
    root = logging.getLogger(ROOT)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    root.propagate = False
    if (distributed_rank() if rank is None else rank) != 0:
        root.addHandler(logging.NullHandler())
        return root
    root.addHandler(_ConsoleHandler())
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = _LogFileHandler(log_file, mode="a", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.addHandler(file_handler)
    return root
