"""File-level restore through the master, shared by the API (routes_files) and the console
(console/files): which point, listing, searching, and downloads streamed as a file or a tar.

Guest paths are never trusted: they only name things inside the point's mounted filesystem (the
appliance resolves them there), a folder's tar stores links as links and never follows them, its
member names are relative, and modes lose the setuid, setgid, sticky and world-write bits and
owners are not kept (as ``vmkeep files get`` without --preserve-owner does).
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import re
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qs, quote

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import RepositoryRecord, RestorePointRecord, User
from vmkeep.catalog.queries import held_earlier
from vmkeep.engine.files import DANGEROUS_BITS, Entry, FileRestoreError, shown
from vmkeep.errors import UsageError, VmkeepError
from vmkeep.server import audit
from vmkeep.server.endpoints import refuse_with_400
from vmkeep.server.file_sessions import FileSession, FileSessions, NotReady, PointRef, RegisteredRepo, SessionsFull

log = logging.getLogger(__name__)

MAX_MATCHES = 500  # per point searched: a pattern like '*' must not list a whole filesystem
MAX_POINTS_SEARCHED = 10
OPEN_TIMEOUT = 180.0  # how long an API call waits for a point's filesystems to open


def sessions_of(request: Request) -> FileSessions:
    manager: FileSessions = request.app.state.file_sessions
    return manager


def registered(r: RepositoryRecord) -> RegisteredRepo:
    return RegisteredRepo(r.name, r.location, r.repo_id, r.encrypted, r.s3_endpoint, r.passphrase_sealed)


def point_ref(session: Session, record: RestorePointRecord) -> PointRef:
    """The point as a file session opens it: from its row's repository, else from a copy."""
    copies = session.scalars(select(RepositoryRecord).join(RestorePointRecord).where(
        RestorePointRecord.name == record.name, RestorePointRecord.point_id == record.point_id,
        RestorePointRecord.id != record.id).order_by(RestorePointRecord.id))
    return PointRef(record.id, record.name, record.point_id, record.created, tuple(sorted(record.disks)),
                    registered(record.repository), tuple(registered(r) for r in copies))


def find_point(session: Session, ref: str) -> PointRef:
    """A point by its id (``20261205T010203Z-a1b2c3``, unique across the catalog in practice: its
    copies in other repositories are the same point) or the catalog row's number; 404 / 409 otherwise."""
    query = select(RestorePointRecord).join(RepositoryRecord)
    query = query.where(RestorePointRecord.id == int(ref)) if ref.isdigit() and len(ref) < 18 else \
        query.where(RestorePointRecord.point_id == ref, ~held_earlier())
    found = list(session.scalars(query.limit(2)))
    if not found:
        raise HTTPException(404, f"no restore point {ref} in the catalog")
    if len(found) > 1:
        raise HTTPException(409, f"point {ref} is in more than one repository ({found[0].repository.name}, "
                                 f"{found[1].repository.name}): name it by its catalog number "
                                 f"({found[0].id}, {found[1].id})")
    return point_ref(session, found[0])


def newest_points(session: Session, vm: str, count: int) -> list[PointRef]:
    """The VM's newest ``count`` points, newest first (served by the name/created index), each once."""
    rows = session.scalars(select(RestorePointRecord).where(RestorePointRecord.name == vm, ~held_earlier())
                           .order_by(RestorePointRecord.created.desc()).limit(count))
    return [point_ref(session, r) for r in rows]


async def check_reachable(request: Request, point: PointRef) -> None:
    """The repository's S3 endpoint checked again against the server's endpoint policy (its name
    may resolve elsewhere now), as a rebuild does."""
    await run_in_threadpool(refuse_with_400, request.app.state.endpoints, point.repo.s3_endpoint, "s3_endpoint")


def guest_path(request: Request, path: str) -> str:
    """The request's guest path, absolute and normalised (no '..' left to climb above /). It is
    read again from the raw query string with its bytes kept (as surrogate escapes, as the engine
    names them): the parsed parameter has replaced bytes that are not UTF-8, so a guest name that is
    not UTF-8 could not be opened from the link the listing made for it."""
    raw = parse_qs(request.scope.get("query_string", b"").decode("latin-1"), errors="surrogateescape").get("path")
    path = raw[0] if raw else path
    if not path.startswith("/") or "\0" in path:
        raise HTTPException(400, f"give an absolute guest path (starting with /), not {shown(path)!r}")
    normal = posixpath.normpath(path)
    return "/" if normal in ("/", "//") else normal


def choose_filesystem(s: FileSession, filesystem: str | None) -> str:
    """``filesystem`` if the point has it, else its largest (400 naming the ones there are)."""
    known = [f.device for f in s.filesystems.filesystems]
    if filesystem is None or filesystem == "":
        return s.filesystems.largest.device
    if filesystem not in known:
        raise HTTPException(400, f"no filesystem {filesystem} in {s.point.label}: there are {', '.join(known)}")
    return filesystem


def failure(exc: VmkeepError) -> HTTPException:
    """An engine's refusal as the API's answer: a path that is not there is the caller's (404),
    anything else the point's or the repository's (502)."""
    text = str(exc)
    if isinstance(exc, UsageError):
        return HTTPException(400, text)
    if "No such file or directory" in text or "Not a directory" in text:
        return HTTPException(404, text)
    return HTTPException(502, text)


def listing(s: FileSession, filesystem: str, path: str) -> tuple[Entry, list[Entry]]:
    """The entry at ``path`` and, for a folder, what it holds: folders first, then by name."""
    with s.using(filesystem) as files:
        top = files.entry(path)
        entries = files.listdir(path) if top.kind == "dir" else []
    entries.sort(key=lambda e: (e.kind != "dir", posixpath.basename(e.path)))
    return top, entries


@dataclass
class Match:
    point: PointRef
    filesystem: str
    path: str


def search_point(s: FileSession, pattern: str, filesystem: str | None = None) -> tuple[list[Match], bool]:
    """Paths matching the glob ``pattern`` (on the name or the whole path) in the point's
    filesystems (or one); whether the list was cut at :data:`MAX_MATCHES`."""
    matches: list[Match] = []
    devices = [filesystem] if filesystem else [f.device for f in s.filesystems.filesystems]
    for device in devices:
        with s.using(device) as files:
            found = files.find(pattern)
        matches += [Match(s.point, device, p) for p in sorted(found)]
        if len(matches) > MAX_MATCHES:
            return matches[:MAX_MATCHES], True
    return matches, False


def wait_open(s: FileSession, timeout: float = OPEN_TIMEOUT) -> None:
    """Block until the session is open (a cross-point search's thread); NotReady if it failed."""
    with suppress(Exception):
        s.future.result(timeout)
    if s.state == "opening":
        raise NotReady(f"the filesystems of {s.point.label} are still being opened: try again", failed=False)
    s.filesystems  # noqa: B018 - raises NotReady with the error when it failed


async def await_open(s: FileSession, timeout: float = OPEN_TIMEOUT) -> None:
    """:func:`wait_open` for a request, holding no thread while it waits."""
    with suppress(Exception):
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(s.future)), timeout)
    if s.state == "opening":
        raise NotReady(f"the filesystems of {s.point.label} are still being opened: try again", failed=False)
    s.filesystems  # noqa: B018


async def open_session(request: Request, user: User, ref: str, session: Session, retry: bool = True) -> FileSession:
    """The caller's file session of the point ``ref``, open (waited for); 503 while it cannot be."""
    point = find_point(session, ref)
    await check_reachable(request, point)
    try:
        s = sessions_of(request).get(user.name, point, retry=retry)
        await await_open(s)
    except SessionsFull as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "60"}) from exc
    except NotReady as exc:
        raise HTTPException(502 if exc.failed else 503, f"cannot open the files of {point.label}: {exc}",
                            headers=None if exc.failed else {"Retry-After": "10"}) from exc
    return s


# --- downloads ---------------------------------------------------------------------------------

_UNSAFE = re.compile(r'[\x00-\x1f\x7f"\\/;]|[\ud800-\udfff]')


def disposition(name: str) -> str:
    """``attachment`` with a file name the browser may use as it is: no control characters,
    quotes, slashes or bytes that were not UTF-8; an ASCII fallback and the UTF-8 name (RFC 6266)."""
    clean = _UNSAFE.sub("_", name).strip(". ")[:200] or "download"
    fallback = clean.encode("ascii", "replace").decode().replace("?", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(clean, safe='')}"


def file_chunks(s: FileSession, filesystem: str, e: Entry) -> Iterator[bytes]:
    """A guest file's bytes, a piece at a time (the appliance is free between pieces); exactly
    its size, or an error (the response then breaks off rather than end short)."""
    offset = 0
    with s.streaming():
        while offset < e.size:
            with s.using(filesystem) as files:
                piece = files.read(e.path, offset)
            if not piece:
                raise FileRestoreError(f"{shown(e.path)} ended at {offset} bytes of {e.size}")
            piece = piece[:e.size - offset]
            offset += len(piece)
            yield piece


def _member(e: Entry, name: str) -> bytes:
    """A tar header for ``e`` as ``name``: modes without DANGEROUS_BITS, no owners, links as links."""
    info = tarfile.TarInfo(name)
    info.mode = e.mode & ~DANGEROUS_BITS & 0o7777
    info.mtime = int(e.mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if e.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif e.kind == "link":
        info.type, info.linkname = tarfile.SYMTYPE, e.target or ""
    else:
        info.type, info.size = tarfile.REGTYPE, e.size
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def tar_chunks(s: FileSession, filesystem: str, top: Entry, top_name: str) -> Iterator[bytes]:
    """A tar (POSIX pax) of ``top`` and everything under it, built as it is sent: member names
    start with ``top_name``; devices, sockets and fifos are left out, as a copy leaves them."""
    with s.streaming():
        yield from _tar_members(s, filesystem, top, top_name)


def _tar_members(s: FileSession, filesystem: str, top: Entry, top_name: str) -> Iterator[bytes]:
    written = 0
    pending: list[tuple[Entry, str]] = [(top, top_name)]
    while pending:
        e, name = pending.pop()
        if e.kind == "other":
            continue
        header = _member(e, name)
        written += len(header)
        yield header
        if e.kind == "file":
            for piece in file_chunks(s, filesystem, e):
                written += len(piece)
                yield piece
            padding = -e.size % tarfile.BLOCKSIZE
            written += padding
            yield b"\0" * padding
        elif e.kind == "dir":
            with s.using(filesystem) as files:
                children = files.listdir(e.path)
            pending += [(c, f"{name}/{posixpath.basename(c.path)}") for c in reversed(children)]
    end = 2 * tarfile.BLOCKSIZE
    yield b"\0" * (end + (-(written + end) % tarfile.RECORDSIZE))


def download(session: Session, request: Request, user: User, s: FileSession, filesystem: str, path: str
             ) -> StreamingResponse:
    """The file at ``path`` as it is, or a folder (or a link) as a tar; audited before it starts."""
    with s.using(filesystem) as files:
        top = files.entry(path)
    if top.kind == "other":
        raise HTTPException(400, f"{shown(path)} is a device, socket or fifo: there is nothing to download")
    base = posixpath.basename(path) or s.point.vm
    kind = "file" if top.kind == "file" else "tar"
    audit.record(session, request, user.name, "file-download", s.point.label, path=shown(path),
                 filesystem=filesystem, kind=kind, repository=s.point.repo.name)
    session.commit()
    log.info("%s downloads %s:%s %s from %s", user.name, s.point.label, filesystem, shown(path), kind)
    if kind == "file":
        return StreamingResponse(file_chunks(s, filesystem, top), media_type="application/octet-stream",
                                 headers={"Content-Disposition": disposition(base),
                                          "Content-Length": str(top.size), "Cache-Control": "no-store",
                                          "X-Content-Type-Options": "nosniff"})
    return StreamingResponse(tar_chunks(s, filesystem, top, base), media_type="application/x-tar",
                             headers={"Content-Disposition": disposition(f"{base}.tar"),
                                      "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


# --- searching across a VM's points --------------------------------------------------------------

@dataclass
class Search:
    """A search by name across a VM's newest points, one point after the other in a thread; the
    console shows its results as they come."""

    id: str
    user: str
    vm: str
    pattern: str
    points: list[PointRef]
    started: float = field(default_factory=time.monotonic)
    searched: int = 0
    current: str | None = None
    matches: list[Match] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)  # points whose matches were cut at MAX_MATCHES
    done: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)


def run_search(manager: FileSessions, search: Search) -> None:
    """Search each point in turn (its session opened, or reused, for the searching user)."""
    try:
        for point in search.points:
            if search.cancelled.is_set():
                break
            search.current = point.label
            try:
                s = manager.get(search.user, point)
                wait_open(s)
                found, cut = search_point(s, search.pattern)
                search.matches += found
                if cut:
                    search.cut.append(point.point_id)
            except VmkeepError as exc:
                search.problems.append(f"{point.point_id}: {exc}")
            search.searched += 1
    except Exception as exc:  # the search's page says it ended, whatever happened
        log.exception("searching %s for %s failed", search.vm, search.pattern)
        search.problems.append(str(exc))
    finally:
        search.current, search.done = None, True


class Searches:
    """The searches under way or recently finished (an hour), one running per user."""

    KEEP_SECONDS = 3600.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._all: dict[str, Search] = {}

    def start(self, manager: FileSessions, user: str, vm: str, pattern: str, points: list[PointRef]) -> Search:
        search = Search(uuid.uuid4().hex, user, vm, pattern, points)
        with self._lock:
            now = time.monotonic()
            for old in list(self._all.values()):
                if old.user == user:
                    old.cancelled.set()  # a user's new search replaces the one running
                if now - old.started > self.KEEP_SECONDS:
                    del self._all[old.id]
            self._all[search.id] = search
        threading.Thread(target=run_search, args=(manager, search), name=f"vmkeep-files-search-{user}",
                         daemon=True).start()
        log.info("%s searches the newest %d points of %s for %s", user, len(points), vm, shown(pattern))
        return search

    def get(self, search_id: str, user: str) -> Search | None:
        with self._lock:
            found = self._all.get(search_id)
        return found if found is not None and found.user == user else None


def check_pattern(pattern: str) -> str:
    pattern = pattern.strip()
    if not pattern or len(pattern) > 500 or "\0" in pattern:
        raise HTTPException(400, "give a file name or a glob to search for, e.g. *.conf or app.conf")
    return pattern


def mtime_of(e: Entry) -> datetime:
    return datetime.fromtimestamp(e.mtime, UTC)
