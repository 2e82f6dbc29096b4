"""The engine reports progress through this small interface; the CLI and API render it."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, label: str, total: int) -> None:
        """A new task of ``total`` bytes begins."""

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more bytes of the current task are done (called from worker threads)."""

    def finish(self) -> None:
        """The current task is over."""


class NoProgress:
    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        pass
