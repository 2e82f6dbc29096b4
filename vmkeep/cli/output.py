"""Rendering for the CLI: progress bars with throughput, tables, sizes, and --json output."""

from __future__ import annotations

import json
import sys
import threading
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
from rich.table import Table

from vmkeep.logs import json_lines
from vmkeep.progress import NoProgress, Task

err_console = Console(stderr=True)
out_console = Console()


def byte_bars() -> Progress:
    """A Rich progress display with bytes, throughput and ETA, on stderr."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
        TransferSpeedColumn(), TimeRemainingColumn(), console=err_console, transient=False,
    )


class _Bar:
    def __init__(self, bars: Progress, task: TaskID, owner: RichProgress) -> None:
        self.bars, self.id, self.owner = bars, task, owner

    def advance(self, nbytes: int) -> None:
        self.bars.advance(self.id, nbytes)

    def finish(self) -> None:
        self.owner.released(self)


class RichProgress:
    """Implements the engine's Progress protocol: a bar with bytes, throughput and ETA per task on
    stderr. A board (one live display) can be shared by several of them, one per VM."""

    def __init__(self, enabled: bool = True, board: Progress | None = None, prefix: str = "") -> None:
        self.enabled = enabled
        self.board = board
        self.prefix = prefix
        self._own: Progress | None = None
        self._open = 0
        self._lock = threading.Lock()

    def task(self, label: str, total: int) -> Task:
        if not self.enabled or json_lines():  # stderr is for JSON log lines then
            return NoProgress().task(label, total)
        with self._lock:
            bars = self.board or self._own
            if bars is None:
                bars = self._own = byte_bars()
                bars.start()
            self._open += 1
            return _Bar(bars, bars.add_task(f"{self.prefix}{label}", total=total), self)

    def released(self, _bar: _Bar) -> None:
        with self._lock:
            self._open -= 1
            if self._open == 0 and self._own is not None:
                self._own.stop()
                self._own = None


class ProgressBoard:
    """One live display shared by several RichProgress (parallel VMs)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bars = byte_bars() if enabled else None

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


ID_HEADERS = ("point", "run", "id")  # what a user copies into the next command: never cut or wrapped


def uncut(table: Table) -> Table:
    """Nothing cut in a narrow terminal: id columns stay whole on one line, other cells wrap or
    fold instead of ending in an ellipsis."""
    for column in table.columns:
        if str(column.header) in ID_HEADERS:
            cells = [len(str(c)) for c in column.cells]
            column.no_wrap = True
            column.min_width = max([len(str(column.header)), *cells])
        else:
            column.overflow = "fold"
    return table
