"""The engine reports progress through this small interface; the CLI and API render it.

A Progress hands out one task per unit of work (a disk, a verify pass); tasks of one Progress
may run at the same time, and ``advance`` is called from worker threads.
"""

from __future__ import annotations

from typing import Protocol


class Task(Protocol):
    def advance(self, nbytes: int) -> None:
        """``nbytes`` more bytes are done."""

    def finish(self) -> None:
        """The task is over (successfully or not)."""


class Progress(Protocol):
    def task(self, label: str, total: int) -> Task:
        """A new task of ``total`` bytes begins."""


class _NoTask:
    def advance(self, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        pass


class NoProgress:
    def task(self, label: str, total: int) -> Task:
        return _NoTask()
