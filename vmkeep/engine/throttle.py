"""A rate limit for one backup or restore, so production storage and links keep their headroom.

Every worker reports each chunk it moved through the operation's Progress; wrapping that Progress
paces the workers there: each chunk books the next slice of time at the allowed rate, and the
worker sleeps until its slice ends. The average over the operation is the rate; no per-byte work.
"""

from __future__ import annotations

import threading
import time

from vmkeep.progress import Progress, Task


class _PacedTask:
    def __init__(self, owner: Throttle, inner: Task) -> None:
        self.owner, self.inner = owner, inner

    def advance(self, nbytes: int) -> None:
        self.inner.advance(nbytes)
        self.owner.pace(nbytes)

    def finish(self) -> None:
        self.inner.finish()


class Throttle:
    """A Progress that forwards to ``inner`` and holds all its tasks together to ``bytes_per_second``."""

    def __init__(self, inner: Progress, bytes_per_second: float) -> None:
        if bytes_per_second <= 0:
            raise ValueError("a rate limit must be positive")
        self.inner, self.rate = inner, bytes_per_second
        self._lock = threading.Lock()
        self._booked_until = time.monotonic()

    def task(self, label: str, total: int) -> Task:
        return _PacedTask(self, self.inner.task(label, total))

    def pace(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._booked_until = max(self._booked_until, now) + nbytes / self.rate
            wait = self._booked_until - now
        if wait > 0:
            time.sleep(wait)


def throttled(progress: Progress, mib_per_second: float | None) -> Progress:
    """``progress`` paced to ``mib_per_second`` MiB/s, or unchanged when no limit is set."""
    return Throttle(progress, mib_per_second * (1 << 20)) if mib_per_second else progress
