"""Writer sessions: how a running backup tells garbage collection what it must not sweep.

A backup registers a session object before it reads anything from the repository. The object
names the indexes the backup dedups against (its parent point) and is kept fresh by a
heartbeat. Garbage collection treats those indexes as live and never sweeps a chunk whose
mtime is newer than the oldest live session's start. A writer killed with -9 leaves a session
that goes stale (no heartbeat, or its process is gone on this host) and is then ignored.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass
from types import TracebackType

from vmkeep.errors import ObjectMissing
from vmkeep.repository.backends.base import Backend

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0


def _process_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass
class SessionInfo:
    key: str
    started: float  # storage clock
    heartbeat: float  # storage clock
    host: str
    pid: int
    pid_start: str | None
    protects: list[str]

    def is_live(self, now: float) -> bool:
        if now - self.heartbeat > STALE_AFTER_SECONDS:
            return False
        if self.host == socket.gethostname():
            return _process_start(self.pid) == self.pid_start
        return True


class WriterSession:
    """Context manager registering one backup writer in the repository."""

    def __init__(self, backend: Backend, protects: list[str]) -> None:
        self.backend = backend
        self.protects = protects
        self.key = f"sessions/{secrets.token_hex(8)}.json"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> WriterSession:
        pid = os.getpid()
        body = {
            "host": socket.gethostname(),
            "pid": pid,
            "pid_start": _process_start(pid),
            "protects": self.protects,
        }
        self.backend.put(self.key, json.dumps(body).encode(), durable=True)
        info = self.backend.stat(self.key)
        if info is not None:  # record the start on the storage's clock, before any heartbeat moves mtime
            body["started_storage"] = info.mtime
            self.backend.put(self.key, json.dumps(body).encode(), durable=True)
        self._thread = threading.Thread(target=self._beat, name="vmkeep-session", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.backend.touch(self.key)
            except Exception:  # a failing backend will fail the backup itself
                pass

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.backend.delete(self.key)


def list_sessions(backend: Backend) -> list[SessionInfo]:
    sessions = []
    for info in backend.list("sessions/"):
        try:
            body = json.loads(backend.get(info.key))
        except ObjectMissing:
            continue  # the session ended between the listing and the read
        except ValueError as exc:
            log.warning("writer session %s does not decode (%s): ignored, so what it writes is not protected",
                        info.key, exc)
            continue
        sessions.append(
            SessionInfo(
                key=info.key,
                started=float(body.get("started_storage", info.mtime)),
                heartbeat=info.mtime,
                host=body.get("host", ""),
                pid=int(body.get("pid", 0)),
                pid_start=body.get("pid_start"),
                protects=list(body.get("protects", [])),
            )
        )
    return sessions
