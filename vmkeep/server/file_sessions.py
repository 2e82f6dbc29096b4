"""Open "file sessions": a restore point's filesystems kept open in libguestfs while someone
browses them from the console or the API.

Launching libguestfs' appliance takes 10-20 s (emulated, as on most masters that are VMs), so the
first look at a point opens it in a worker thread and later listings reuse it. A session belongs to
one user and one point; it closes after a few idle minutes, when the cap on open sessions needs
room for another, and when the server stops. One request at a time uses its appliance (its lock);
a download takes it for one piece at a time, so browsing goes on while a large file streams.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from vmkeep.engine.files import GuestFiles, PointFilesystems, open_point_filesystems
from vmkeep.engine.mount import PointSpec
from vmkeep.errors import PointNotFound, VmkeepError
from vmkeep.jobs.keys import open_secret
from vmkeep.jobs.registered import open_registered, passphrase_context

log = logging.getLogger(__name__)

IDLE_SECONDS = 300.0  # a session nobody used for this long closes
MAX_SESSIONS = 3  # appliances open at once (each a QEMU of a few hundred MiB); one user may hold all but one
SWEEP_SECONDS = 10.0


class SessionsFull(VmkeepError):
    """Every allowed session is open and in use: nothing could be closed to make room."""


class NotReady(VmkeepError):
    """The session is still opening, or failed to open (``failed`` says which)."""

    def __init__(self, message: str, failed: bool) -> None:
        super().__init__(message)
        self.failed = failed


@dataclass(frozen=True)
class RegisteredRepo:
    """What opening a registered repository takes, copied out of its catalog row (the worker
    thread has no catalog session)."""

    name: str
    location: str
    repo_id: str
    encrypted: bool
    s3_endpoint: str | None
    passphrase_sealed: bytes | None


@dataclass(frozen=True)
class PointRef:
    """One restore point of the catalog, as a file session opens it."""

    id: int  # the catalog row's id
    vm: str
    point_id: str
    created: datetime
    disks: tuple[str, ...]
    repo: RegisteredRepo
    copies: tuple[RegisteredRepo, ...] = ()  # other repositories holding the same point (backup copies)

    @property
    def label(self) -> str:
        return f"{self.vm}@{self.point_id}"


def open_point(stack: ExitStack, point: PointRef) -> PointFilesystems:
    """The point's disks in one appliance, entered into ``stack``. The repository is opened first
    as the catalog registered it (pinned id and encryption, sealed passphrase), so a repository that
    is gone or replaced is reported as such; the passphrase reaches the exports in a private file
    removed once they are serving. When it cannot be opened, a copy of the point in another
    repository is."""
    repo = readable(point)
    with tempfile.TemporaryDirectory(prefix="vmkeep-files-") as tmp:
        secret = None
        if repo.passphrase_sealed:
            secret = Path(tmp) / "passphrase"
            secret.touch(mode=0o600)
            secret.write_text(open_secret(repo.passphrase_sealed, passphrase_context(repo.name)))
        specs = [PointSpec(repo.location, point.vm, point.point_id, disk, repo.s3_endpoint, None,
                           str(secret) if secret else None, plain=not repo.encrypted) for disk in point.disks]
        return stack.enter_context(open_point_filesystems(specs))


def readable(point: PointRef) -> RegisteredRepo:
    """The point's repository if it opens and holds the point readable (its manifest and the
    indexes of its disks, MAC checked), else the first of its copies that does (the first failure
    raised when none does)."""
    first: Exception | None = None
    for repo in (point.repo, *point.copies):
        try:
            opened = open_registered(repo)
            try:
                manifest = opened.load_point(point.vm, point.point_id)
                if manifest is None:
                    raise PointNotFound(f"repository {repo.name} holds no point {point.label}")
                for disk in point.disks:
                    opened.load_index(manifest, disk)
            finally:
                opened.close()
            if repo is not point.repo:
                log.warning("%s: repository %s cannot be used (%s): reading its copy in %s", point.label,
                            point.repo.name, first, repo.name)
            return repo
        except VmkeepError as exc:
            log.info("%s: repository %s cannot be used: %s", point.label, repo.name, exc)
            first = first or exc
    assert first is not None
    raise first


Key = tuple[str, int]  # (user name, point row id)


@dataclass
class FileSession:
    key: Key
    point: PointRef
    future: Future[PointFilesystems] = field(default_factory=Future)
    stack: ExitStack = field(default_factory=ExitStack)
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = field(default_factory=time.monotonic)
    opened_seconds: float | None = None
    closed: bool = False
    streams: int = 0  # downloads under way: the session is in use between their pieces too

    @property
    def state(self) -> str:
        if not self.future.done():
            return "opening"
        return "failed" if self.future.exception() is not None else "ready"

    @property
    def error(self) -> str | None:
        if not self.future.done():
            return None
        exc = self.future.exception()
        return None if exc is None else str(exc) or type(exc).__name__

    @property
    def filesystems(self) -> PointFilesystems:
        if self.state != "ready" or self.closed:
            raise NotReady(self.error or f"the filesystems of {self.point.label} are still being opened",
                           failed=self.state == "failed")
        return self.future.result()

    @contextmanager
    def using(self, filesystem: str) -> Iterator[GuestFiles]:
        """The appliance for one call, ``filesystem`` mounted at /."""
        point = self.filesystems
        with self.lock:
            if self.closed:
                raise NotReady(f"the file session of {self.point.label} was closed: open it again", failed=True)
            self.last_used = time.monotonic()
            try:
                yield point.mount(filesystem)
            finally:
                self.last_used = time.monotonic()

    @property
    def busy(self) -> bool:
        return self.state == "opening" or self.lock.locked() or self.streams > 0

    @contextmanager
    def streaming(self) -> Iterator[None]:
        """Keep the session from being closed for idleness or room while a download streams."""
        with self.lock:
            self.streams += 1
        try:
            yield
        finally:
            with self.lock:
                self.streams -= 1
                self.last_used = time.monotonic()

    def close(self) -> None:
        """Wait for the call under way, then release the appliance and the exports."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            try:
                self.stack.close()
            except Exception:  # closing must go on for the others
                log.exception("closing the file session of %s failed", self.point.label)
        log.info("file session of %s for %s closed", self.point.label, self.key[0])


class FileSessions:
    """The master's open file sessions (one per user and point), their opening and closing."""

    def __init__(self, opener: Callable[[ExitStack, PointRef], PointFilesystems] = open_point,
                 max_sessions: int = MAX_SESSIONS, idle_seconds: float = IDLE_SECONDS) -> None:
        self.opener = opener
        self.max_sessions, self.idle_seconds = max_sessions, idle_seconds
        self.per_user = max(1, max_sessions - 1)
        self._sessions: dict[Key, FileSession] = {}
        self._lock = threading.Lock()
        self._workers = ThreadPoolExecutor(max_workers=max_sessions, thread_name_prefix="vmkeep-files")
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def get(self, user: str, point: PointRef, retry: bool = False) -> FileSession:
        """The user's session of ``point``, opening it (in a worker) when there is none; a failed
        one stays (its error shown) until ``retry``. :class:`SessionsFull` when no room."""
        key = (user, point.id)
        victims: list[FileSession] = []
        try:
            with self._lock:
                found = self._sessions.get(key)
                if found is not None and not found.closed and not (retry and found.state == "failed"):
                    found.last_used = time.monotonic()
                    return found
                if found is not None:
                    victims.append(self._sessions.pop(key))
                victims += self._make_room(user)
                opening = FileSession(key, point)
                self._sessions[key] = opening
                self._start_sweeper()
        finally:
            for victim in victims:
                self._workers.submit(victim.close)
        log.info("opening the filesystems of %s for %s", point.label, user)
        self._workers.submit(self._open, opening)
        return opening

    def _make_room(self, user: str) -> list[FileSession]:
        """Sessions to close so that one more of ``user``'s fits (the least recently used of those
        not opening and not in use): the user's own first once they hold their share, so that one
        user (a search across many points, say) does not close everyone else's; lock held."""
        own = [s for s in self._sessions.values() if s.key[0] == user]
        if len(own) >= self.per_user:
            candidates, full = own, f"you have {len(own)} points' files open and in use (the most one user may)"
        elif len(self._sessions) >= self.max_sessions:
            candidates, full = list(self._sessions.values()), f"{len(self._sessions)} points' files are open and in " \
                                                                "use (the limit)"
        else:
            return []
        idle = sorted((s for s in candidates if not s.busy), key=lambda s: s.last_used)
        if not idle:
            raise SessionsFull(f"{full}: try again in a few minutes, or close a point's files you no longer need")
        victim = idle[0]
        del self._sessions[victim.key]
        log.info("closing the file session of %s for %s to make room", victim.point.label, victim.key[0])
        return [victim]

    def _open(self, s: FileSession) -> None:
        started = time.monotonic()
        try:
            point = self.opener(s.stack, s.point)
        except BaseException as exc:
            log.warning("could not open the filesystems of %s: %s", s.point.label, exc)
            s.stack.close()
            s.future.set_exception(exc)
            return
        s.opened_seconds = time.monotonic() - started
        s.last_used = time.monotonic()
        log.info("filesystems of %s open in %.1f s: %s", s.point.label, s.opened_seconds,
                 ", ".join(f"{f.device} ({f.kind})" for f in point.filesystems))
        s.future.set_result(point)
        if self._stop.is_set() or self._sessions.get(s.key) is not s:
            s.close()  # the server stopped, or the session was closed, while it opened

    def find(self, user: str, point_id: int) -> FileSession | None:
        with self._lock:
            return self._sessions.get((user, point_id))

    def close(self, user: str, point_id: int) -> bool:
        """Close the user's session of the point (False: there was none)."""
        with self._lock:
            found = self._sessions.pop((user, point_id), None)
        if found is None:
            return False
        if found.state != "opening":
            found.close()
        return True  # one still opening closes itself once open (_open)

    def sweep(self, now: float | None = None) -> None:
        """Close the sessions idle for longer than allowed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [s for s in self._sessions.values() if not s.busy and now - s.last_used > self.idle_seconds]
            for s in stale:
                del self._sessions[s.key]
        for s in stale:
            log.info("file session of %s for %s idle for %.0f s: closing", s.point.label, s.key[0],
                     now - s.last_used)
            s.close()

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = threading.Thread(target=self._sweep_loop, name="vmkeep-files-sweep", daemon=True)
            self._sweeper.start()

    def _sweep_loop(self) -> None:
        while not self._stop.wait(SWEEP_SECONDS):
            try:
                self.sweep()
            except Exception:  # the sweeper must keep going
                log.exception("sweeping idle file sessions failed")

    def close_all(self) -> None:
        """Every session closed (those opening once they are open): the server is stopping."""
        self._stop.set()
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        self._workers.shutdown(wait=True)  # openings under way finish, then close themselves
        for s in sessions:
            s.close()
        if sessions:
            log.info("closed %d file sessions", len(sessions))
