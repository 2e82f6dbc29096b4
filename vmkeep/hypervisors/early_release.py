"""Letting go of a point in time's sources (snapshot, backup job) once every read is done.

The engine still hashes, encrypts and stores the last chunks and commits the point after its
last read; the hypervisor's clean-up (committing a snapshot back, ending a backup job) needs none
of that and runs beside it. Whoever asks first starts it: the engine when its reads are done, a
watch that must free the VM, or the end of the point in time, which always waits for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

R = TypeVar("R")


class EarlyRelease(Generic[R]):
    """Runs ``release`` at most once, on a thread of its own; ``start`` returns at once."""

    def __init__(self, release: Callable[[], R], name: str) -> None:
        self._release = release
        self._name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._result: R | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        """Begin releasing unless it has begun; never blocks, never raises."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def __call__(self) -> R | None:
        """Release now (or wait for the release under way) and raise what it raised."""
        self.start()
        return self.outcome()

    def join(self) -> None:
        """Wait for a release under way, if any, without raising its error."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()

    @property
    def succeeded(self) -> bool:
        """Whether the release ran and finished without error."""
        self.join()
        return self._thread is not None and self._error is None

    def outcome(self) -> R | None:
        """What the release returned (None if it never started); raises its error."""
        self.join()
        if self._error is not None:
            raise self._error
        return self._result

    def _run(self) -> None:
        try:
            self._result = self._release()
        except BaseException as exc:  # handed to whoever waits for the outcome
            self._error = exc
