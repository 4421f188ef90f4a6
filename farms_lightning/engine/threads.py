"""CPU threading for the analysis: one intra-op thread per torch call, parallel work in a pool.

torch's own intra-op parallelism (OpenMP) degrades badly when the cores are busy: on a loaded
2-core machine a 768x768 ``eigvalsh`` took 6.4 s with 2 threads and 0.13 s with one. The analysis
therefore runs every torch call on one thread and spreads independent work (batches of windows,
layer fits) over a pool of as many Python threads as torch would use (torch releases the GIL).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def single_threaded_ops() -> Iterator[int]:
    """Run torch ops on one intra-op thread inside; yields the previous thread count (the pool size)."""
    previous = torch.get_num_threads()
    if previous != 1:
        torch.set_num_threads(1)
    try:
        yield previous
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def parallel_map(function: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """``[function(x) for x in items]`` on up to ``workers`` threads, in order."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [function(x) for x in items]
    # Each worker sets its own intra-op thread count: OpenMP's is per thread, so a pool thread would
    # otherwise run torch ops on every core, beside the other workers: slower, and its results then
    # depended on how the cores were shared (the same window gave different last bits run to run).
    with ThreadPoolExecutor(max_workers=min(workers, len(items)), initializer=torch.set_num_threads,
                            initargs=(1,)) as pool:
        return list(pool.map(function, items))
