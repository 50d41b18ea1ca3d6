"""Ordered, bounded parallel map over a process pool, or in-process when one worker (or one task) suffices."""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def resolve_workers(num_workers: int | None) -> int:
    """None means every core; anything below 1 is treated as 1 (in-process)."""
    return max(1, num_workers if num_workers is not None else (os.cpu_count() or 1))


def _context() -> multiprocessing.context.BaseContext:
    # fork is unsafe once torch/ray threads exist in the parent; forkserver pays the import cost once.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def ordered_map(fn: Callable[[T], R], tasks: Iterable[T], num_workers: int) -> Iterator[tuple[T, R]]:
    """Yield (task, fn(task)) in task order.

    At most 2 * num_workers tasks are in flight, so a lazy task iterator (e.g. tar members read on the
    fly) keeps memory bounded. Closing the generator early (max_samples reached) cancels pending work.
    A single task, or num_workers == 1, runs in this process: a pool would only add start-up time.
    """
    it = iter(tasks)
    head = list(itertools.islice(it, 2))
    if num_workers <= 1 or len(head) < 2:
        for task in itertools.chain(head, it):
            yield task, fn(task)
        return
    it = itertools.chain(head, it)
    pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=_context())
    pending: deque[tuple[T, Future[R]]] = deque()
    try:
        for task in itertools.islice(it, 2 * num_workers):
            pending.append((task, pool.submit(fn, task)))
        while pending:
            task, future = pending.popleft()
            result = future.result()
            for nxt in itertools.islice(it, 1):  # refill before yielding so workers never idle
                pending.append((nxt, pool.submit(fn, nxt)))
            yield task, result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
