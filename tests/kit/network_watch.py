"""A watch on network access through Python's audit hooks (``sys.addaudithook``): a connect or send on an
internet (AF_INET/AF_INET6) socket, and any host-name lookup, is recorded and refused (the operation raises
``OSError``, so a test never sends anything). Local sockets (AF_UNIX: multiprocessing, torch) are not network.

Two uses:
* as ``sitecustomize.py`` in a folder first on PYTHONPATH (:func:`watched_environment`), in every Python process
  started with that environment, worker processes included, each attempt is appended to the file named by
  ``$COVNET_NETWORK_LOG``;
* imported, :func:`watching` records the attempts of this process (every thread) in a list while it lasts.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterator

LOG_VARIABLE = "COVNET_NETWORK_LOG"
INTERNET = (socket.AF_INET, socket.AF_INET6)
LOOKUPS = ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo")
SENDS = ("socket.connect", "socket.sendto", "socket.sendmsg")
# Variables that make OpenVINO's telemetry stay quiet in CI (openvino_telemetry's opt-in checker): removed from a
# watched process's environment, so that the watch sees what a user's machine would send.
CI_VARIABLES = ("CI", "TF_BUILD", "JENKINS_URL")


def network_attempt(event: str, args: tuple) -> bool:
    if event in LOOKUPS:
        return True
    return event in SENDS and getattr(args[0], "family", None) in INTERNET


def describe(event: str, args: tuple) -> str:
    return f"pid {os.getpid()} ({' '.join(sys.argv)[:200]}): {event} {args[1:] if event in SENDS else args!r}"


def _record_to_file(event: str, args: tuple) -> None:
    if network_attempt(event, args):
        with open(os.environ[LOG_VARIABLE], "a", encoding="utf-8") as log:
            log.write(describe(event, args) + "\n")
        raise OSError(f"network access refused by the test's watch: {event}")


if __name__ == "sitecustomize" and os.environ.get(LOG_VARIABLE):
    sys.addaudithook(_record_to_file)


def watched_environment(folder: Path, **variables: str) -> tuple[dict[str, str], Path]:
    """An environment whose Python processes record their network attempts, and the log file they write; with
    HOME and XDG_CACHE_HOME inside ``folder`` (so what a process writes into the user's home is seen there) and
    ``variables`` added."""
    folder.mkdir(parents=True, exist_ok=True)
    hook_folder = folder / "hook"
    hook_folder.mkdir(exist_ok=True)
    shutil.copyfile(__file__, hook_folder / "sitecustomize.py")
    log = folder / "network.log"
    log.touch()
    environment = {name: value for name, value in os.environ.items() if name not in CI_VARIABLES}
    path = [str(hook_folder), *filter(None, [os.environ.get("PYTHONPATH")])]
    environment.update(PYTHONPATH=os.pathsep.join(path), HOME=str(folder / "home"),
                       XDG_CACHE_HOME=str(folder / "cache"), **{LOG_VARIABLE: str(log)}, **variables)
    (folder / "home").mkdir(exist_ok=True)
    return environment, log


_attempts: list[str] | None = None     # this process's attempts, while watching


def _record_in_memory(event: str, args: tuple) -> None:
    if _attempts is not None and network_attempt(event, args):
        _attempts.append(describe(event, args))
        raise OSError(f"network access refused by the test's watch: {event}")


_installed: list[bool] = []


@contextlib.contextmanager
def watching() -> Iterator[list[str]]:
    """The network attempts this process makes while the block runs (an audit hook cannot be removed: it is
    installed once and idles outside the block)."""
    global _attempts
    if not _installed:
        sys.addaudithook(_record_in_memory)
        _installed.append(True)
    _attempts = []
    try:
        yield _attempts
    finally:
        _attempts = None
