"""Pauses for polling an asynchronous hypervisor operation that usually ends within milliseconds."""

from __future__ import annotations

import time


class Backoff:
    """Sleep a few milliseconds first, doubling up to ``most``: a job that ends at once costs no
    fixed tenth of a second, one that takes long is not polled in a busy loop."""

    def __init__(self, first: float = 0.005, most: float = 0.1) -> None:
        self.pause, self.most = first, most

    def sleep(self) -> None:
        time.sleep(self.pause)
        self.pause = min(self.pause * 2, self.most)
