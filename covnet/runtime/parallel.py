"""Run one function over many cases, in worker processes when asked, with a progress bar.

Worker processes die with their parent: a parent killed with kill -9 runs no clean-up code, so each worker
watches its parent's pid and exits as soon as it changes (the orphan is re-parented).
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Callable, Iterable, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")
Result = TypeVar("Result")
PARENT_POLL_SECONDS = 0.2


def _exit_when_orphaned(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)  # no clean-up: the parent's run is over, and what it would write is unwanted
        time.sleep(PARENT_POLL_SECONDS)


def die_with_parent(parent_pid: int | None = None) -> None:
    """Call first thing in a worker process (any kind: pool, data loader): it exits when its parent dies."""
    parent_pid = os.getppid() if parent_pid is None else parent_pid
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True,
                     name="covnet-parent-watchdog").start()


def _start_worker(parent_pid: int, initializer: Callable[[], None] | None) -> None:
    die_with_parent(parent_pid)
    if initializer is not None:
        initializer()


def map_cases(function: Callable[[Item], Result], items: Iterable[Item], num_processes: int = 1,
              description: str = "", initializer: Callable[[], None] | None = None) -> list[Result]:
    """``[function(item) for item in items]`` in order. With ``num_processes`` > 1 the calls run in that many
    processes; the first error is raised as soon as it arrives and the cases not yet started are cancelled."""
    items = list(items)
    # disable=None: a progress bar on a terminal, none in a log file or a pipe.
    progress = tqdm(total=len(items), desc=description, unit="case", leave=False, disable=None)
    try:
        if num_processes <= 1 or len(items) <= 1:
            results = []
            for item in items:
                results.append(function(item))
                progress.update()
            return results
        pool = ProcessPoolExecutor(max_workers=min(num_processes, len(items)),
                                   initializer=partial(_start_worker, os.getpid(), initializer))
        try:
            results = []
            for result in pool.map(function, items):
                results.append(result)
                progress.update()
            return results
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        progress.close()
