"""Rendering for the CLI: progress bars with throughput, tables, sizes, and --json output."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

err_console = Console(stderr=True)
out_console = Console()


def _bars() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
        TransferSpeedColumn(), TimeRemainingColumn(), console=err_console, transient=False,
    )


class RichProgress:
    """Implements the engine's Progress protocol: each task gets a bar with bytes, throughput and
    ETA on stderr. Several of them may share one live display (a board), one per VM."""

    def __init__(self, enabled: bool = True, board: Progress | None = None, prefix: str = "") -> None:
        self.enabled = enabled
        self.board = board
        self.prefix = prefix
        self._own: Progress | None = None
        self._task: TaskID | None = None

    def start(self, label: str, total: int) -> None:
        if not self.enabled:
            return
        bars = self.board
        if bars is None:
            bars = self._own = _bars()
            bars.start()
        self._task = bars.add_task(f"{self.prefix}{label}", total=total)
        self._bars = bars

    def advance(self, nbytes: int) -> None:
        if self._task is not None:
            self._bars.advance(self._task, nbytes)

    def finish(self) -> None:
        if self._own is not None:
            self._own.stop()
            self._own = None
        self._task = None


class ProgressBoard:
    """One live display shared by several RichProgress (parallel VMs)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bars = _bars() if enabled else None

    def __enter__(self) -> ProgressBoard:
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.stop()

    def progress(self, prefix: str) -> RichProgress:
        return RichProgress(self.enabled, self.bars, prefix)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def rate(nbytes: float, seconds: float) -> str:
    return f"{human(nbytes / seconds)}/s" if seconds > 0 else "-"


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, default=str) + "\n")
