"""The per-operation rate limit holds every worker of one backup or restore to the rate together."""

from __future__ import annotations

import threading
import time

from vmkeep.engine.throttle import Throttle, throttled
from vmkeep.progress import NoProgress, Task

MiB = 1 << 20


class Counting:
    def __init__(self) -> None:
        self.done = 0
        self.lock = threading.Lock()

    def task(self, label: str, total: int) -> Task:
        owner = self

        class _T:
            def advance(self, nbytes: int) -> None:
                with owner.lock:
                    owner.done += nbytes

            def finish(self) -> None:
                pass

        return _T()


def test_four_workers_share_one_rate() -> None:
    inner = Counting()
    paced = Throttle(inner, 64 * MiB)  # 16 MiB in 1 MiB chunks from four threads: at least 0.25 s
    task = paced.task("disk", 16 * MiB)

    def worker() -> None:
        for _ in range(4):
            task.advance(MiB)

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - started >= 0.24
    assert inner.done == 16 * MiB  # progress still sees every byte


def test_no_limit_is_no_wrapper() -> None:
    plain = NoProgress()
    assert throttled(plain, None) is plain
    assert isinstance(throttled(plain, 10), Throttle)
