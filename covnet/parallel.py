"""Run one function over many cases, in worker processes when asked, with a progress bar."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")
Result = TypeVar("Result")


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
        pool = ProcessPoolExecutor(max_workers=min(num_processes, len(items)), initializer=initializer)
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
