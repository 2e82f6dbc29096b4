"""A bounded parallel map over chunk slots, shared by backup, restore and verify.

Work items are submitted to a thread pool with at most ``2 × workers`` in flight, so memory
stays bounded whatever the disk size. The first failure stops the submission of new items,
waits for the running ones and is re-raised; Ctrl-C does the same.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Protocol, TypeVar

from vmkeep.errors import Cancelled

T = TypeVar("T")


class Flag(Protocol):
    def is_set(self) -> bool: ...


class AnyOf:
    """Set when any of several flags is: a run stops on Ctrl-C or when a sibling run failed."""

    def __init__(self, *flags: Flag | None) -> None:
        self.flags = [f for f in flags if f is not None]

    def is_set(self) -> bool:
        return any(f.is_set() for f in self.flags)


def _check(cancel: Flag | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("interrupted: nothing partial was committed; the next run starts clean")

R = TypeVar("R")


def interleaved(items: list[T], stretches: int) -> list[T]:
    """``items`` cut into ``stretches`` consecutive runs and taken from each run in turn
    (a0, b0, c0, a1, b1, c1, …).

    What a chunk costs depends on where it lies on the disk — incompressible data is light on the
    cores and heavy on the device, text the reverse, zeros and dedup hits need no write at all.
    Working through one region after the other leaves the cores idle in the first kind and the
    device idle in the second; drawing from several places at once keeps both busy.
    """
    if stretches <= 1 or len(items) <= stretches:
        return list(items)
    run = -(-len(items) // stretches)
    runs = [items[i * run : (i + 1) * run] for i in range(stretches)]
    return [r[j] for j in range(run) for r in runs if j < len(r)]


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int, on_result: Callable[[T, R], None],
                cancel: Flag | None = None) -> None:
    """Run ``fn`` over ``items`` on ``workers`` threads; ``on_result`` runs in the caller's thread.

    Setting ``cancel`` stops the run at the next item with :class:`Cancelled`.
    """
    limit = threading.BoundedSemaphore(workers * 2)
    pending: dict[Future[R], T] = {}
    failed = threading.Event()

    def release(_f: Future[R]) -> None:
        limit.release()
        if not _f.cancelled() and _f.exception() is not None:
            failed.set()

    def drain(block: bool) -> None:
        done = [f for f in pending if f.done()]
        if block and not done:
            finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
            done = list(finished)
        for f in done:
            item = pending.pop(f)
            on_result(item, f.result())

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmkeep") as pool:
        try:
            for item in items:
                while not limit.acquire(timeout=0.1):
                    drain(block=False)
                    _check(cancel)
                _check(cancel)
                if failed.is_set():
                    limit.release()
                    break
                f = pool.submit(fn, item)
                pending[f] = item
                f.add_done_callback(release)
            while pending:
                drain(block=True)
                _check(cancel)
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, on_result: Callable[[T, R], None],
                cancel: Flag | None = None) -> None:
    """Like :func:`bounded_map`, but ``on_result`` sees the results in the order of ``items``:
    for a consumer that must write in sequence (an upload stream) while the work itself runs in
    parallel. At most ``2 × workers`` results wait, so memory stays bounded."""
    queue: deque[tuple[T, Future[R]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmkeep") as pool:
        try:
            for item in items:
                _check(cancel)
                queue.append((item, pool.submit(fn, item)))
                if len(queue) >= workers * 2:
                    first, future = queue.popleft()
                    on_result(first, future.result())
            while queue:
                _check(cancel)
                first, future = queue.popleft()
                on_result(first, future.result())
        except BaseException:
            for _item, f in queue:
                f.cancel()
            raise
