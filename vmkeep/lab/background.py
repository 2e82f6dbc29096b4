"""The lab's simulators run in the background (vcsim, the XAPI simulator): each records what a
client needs in ``STATE/info.json`` (root only, it holds the password), and stopping one means
SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def record(state: Path, running: Any) -> None:
    """Write ``running`` (a dataclass) as ``state/info.json``, readable by root only."""
    info = state / "info.json"
    info.touch(mode=0o600)
    info.write_text(json.dumps(asdict(running)) + "\n")


def recorded(state: Path, kind: type[T]) -> T | None:
    """The simulator ``state/info.json`` records, if its process still runs (a stale record goes)."""
    info = state / "info.json"
    if not info.exists():
        return None
    found = kind(**json.loads(info.read_text()))
    if gone(found.pid):  # type: ignore[attr-defined]
        info.unlink(missing_ok=True)
        return None
    return found


def end(state: Path, pid: int, grace: float) -> None:
    """SIGTERM ``pid``, SIGKILL it after ``grace`` s, and forget its record."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if gone(pid):
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        gone(pid)
    (state / "info.json").unlink(missing_ok=True)


def gone(pid: int) -> bool:
    """Whether the process ended; reaps it when this process started it (else it stays a zombie
    that kill(pid, 0) still finds)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
