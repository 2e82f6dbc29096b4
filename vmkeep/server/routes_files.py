"""File-level restore through the API: list a point's folders, search by name, download a file or
a folder (tar), close the point's file session. Restore roles only (a download is a restore);
each download is audited with its path.

The first call on a point opens its filesystems (libguestfs: 10-20 s, longer emulated) and waits
for them; later calls reuse the open session (vmkeep.server.file_sessions).
"""

from __future__ import annotations

import posixpath
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as FastPath
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from vmkeep.catalog.models import User
from vmkeep.engine.files import Entry, shown
from vmkeep.errors import VmkeepError
from vmkeep.server.auth import RESTORE, get_session, require
from vmkeep.server.file_access import (
    MAX_POINTS_SEARCHED,
    Search,
    Searches,
    check_pattern,
    check_reachable,
    choose_filesystem,
    download,
    failure,
    find_point,
    guest_path,
    listing,
    mtime_of,
    newest_points,
    open_session,
    run_search,
    search_point,
    sessions_of,
)
from vmkeep.server.file_sessions import FileSessions, NotReady
from vmkeep.server.schemas import NAME

router = APIRouter(prefix="/api", tags=["files"])
T = TypeVar("T")
PathQuery = Query("/", max_length=4096, description="a guest path, from the filesystem's /")
FsQuery = Query(None, max_length=200, description="which filesystem (/dev/sda1, …); the point's largest if not given")


class FilesystemOut(BaseModel):
    device: str
    kind: str
    disk: str | None
    size: int


class EntryOut(BaseModel):
    path: str  # control characters and bytes that are not UTF-8 escaped (vmkeep.engine.files.shown)
    name: str
    kind: str  # file, dir, link, other
    size: int
    mode: int
    mtime: datetime
    target: str | None


class ListingOut(BaseModel):
    vm: str
    point: str
    repository: str
    filesystems: list[FilesystemOut]
    filesystem: str
    path: str
    kind: str
    entries: list[EntryOut]


class MatchOut(BaseModel):
    vm: str
    point: str
    filesystem: str
    path: str


class SearchOut(BaseModel):
    vm: str
    pattern: str
    points_searched: list[str]
    matches: list[MatchOut]
    cut: list[str]  # points whose matches stopped at the limit
    problems: list[str]


def entry_out(e: Entry) -> EntryOut:
    return EntryOut(path=shown(e.path), name=shown(posixpath.basename(e.path) or "/"), kind=e.kind, size=e.size,
                    mode=e.mode, mtime=mtime_of(e), target=None if e.target is None else shown(e.target))


async def answered(call: Callable[..., T], *args: Any) -> T:
    """``call`` in the thread pool (libguestfs blocks), its refusals as HTTP answers."""
    try:
        return await run_in_threadpool(call, *args)
    except NotReady as exc:
        raise HTTPException(502 if exc.failed else 503, str(exc)) from exc
    except VmkeepError as exc:
        raise failure(exc) from exc


@router.get("/points/{point}/files", response_model=ListingOut)
async def list_files(point: str, request: Request, path: str = PathQuery, filesystem: str | None = FsQuery,
                     user: User = Depends(require(*RESTORE)), session: Session = Depends(get_session)) -> ListingOut:
    """A folder of the point (or one file): kind, size, mode, time of each entry. ``point`` is a
    point id or the catalog's number for it."""
    s = await open_session(request, user, point, session)
    fs = choose_filesystem(s, filesystem)
    top, entries = await answered(listing, s, fs, guest_path(request, path))
    return ListingOut(vm=s.point.vm, point=s.point.point_id, repository=s.point.repo.name,
                      filesystems=[FilesystemOut(device=f.device, kind=f.kind, disk=f.disk, size=f.size)
                                   for f in s.filesystems.filesystems],
                      filesystem=fs, path=shown(top.path), kind=top.kind,
                      entries=[entry_out(e) for e in entries] if top.kind == "dir" else [entry_out(top)])


@router.get("/points/{point}/files/download", response_class=StreamingResponse, responses={200: {
    "description": "the file's bytes, or for a folder a tar (POSIX pax) of it: links stored as links, modes "
                   "without setuid/setgid/sticky/world-write, no owners",
    "content": {"application/octet-stream": {}, "application/x-tar": {}}}})
async def download_files(point: str, request: Request, path: str = Query(max_length=4096),
                         filesystem: str | None = FsQuery, user: User = Depends(require(*RESTORE)),
                         session: Session = Depends(get_session)) -> StreamingResponse:
    """Download a file as it is, or a folder as a tar streamed as it is read; audited with the path."""
    s = await open_session(request, user, point, session)
    return await answered(download, session, request, user, s, choose_filesystem(s, filesystem),
                          guest_path(request, path))


def _search_out(search: Search) -> SearchOut:
    return SearchOut(vm=search.vm, pattern=search.pattern,
                     points_searched=[p.point_id for p in search.points[:search.searched]],
                     matches=[MatchOut(vm=m.point.vm, point=m.point.point_id, filesystem=m.filesystem,
                                       path=shown(m.path)) for m in search.matches],
                     cut=search.cut, problems=search.problems)


@router.get("/points/{point}/files/search", response_model=SearchOut)
async def search_files(point: str, request: Request, pattern: str = Query(max_length=500),
                       filesystem: str | None = Query(None, max_length=200, description="one filesystem; all if not "
                                                      "given"),
                       user: User = Depends(require(*RESTORE)), session: Session = Depends(get_session)) -> SearchOut:
    """Files of the point whose name or path matches a glob (``*.conf``, ``/etc/*``)."""
    s = await open_session(request, user, point, session)
    search = Search("", user.name, s.point.vm, check_pattern(pattern), [s.point])
    fs = choose_filesystem(s, filesystem) if filesystem else None
    search.matches, cut = await answered(search_point, s, search.pattern, fs)
    search.searched, search.cut = 1, [s.point.point_id] if cut else []
    return _search_out(search)


@router.get("/vms/{vm}/files/search", response_model=SearchOut)
async def search_vm_files(request: Request, vm: str = FastPath(pattern=NAME), pattern: str = Query(max_length=500),
        points: int = Query(3, ge=1, le=MAX_POINTS_SEARCHED, description="how many of the newest points"),
        user: User = Depends(require(*RESTORE)), session: Session = Depends(get_session)) -> SearchOut:
    """Search the VM's newest points one after the other (each opened as needed: allow 20 s per
    point not open yet)."""
    refs = newest_points(session, vm, points)
    if not refs:
        raise HTTPException(404, f"no restore point of {vm} in the catalog")
    for ref in refs:
        await check_reachable(request, ref)
    search = Search("", user.name, vm, check_pattern(pattern), refs)
    await run_in_threadpool(run_search, sessions_of(request), search)
    return _search_out(search)


@router.delete("/points/{point}/files", status_code=204)
def close_files(point: str, request: Request, user: User = Depends(require(*RESTORE)),
                session: Session = Depends(get_session)) -> Response:
    """Close the caller's file session of the point now (it closes by itself after idle minutes)."""
    ref = find_point(session, point)
    if not sessions_of(request).close(user.name, ref.id):
        raise HTTPException(404, f"no file session of {ref.label} is open for {user.name}")
    return Response(status_code=204)


def install(app: FastAPI) -> None:
    """The routes, and the file sessions they share with the console: closed when the server stops."""
    app.state.file_sessions = FileSessions()
    app.state.file_searches = Searches()
    app.include_router(router)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with inner(a) as state:
            try:
                yield state
            finally:
                await run_in_threadpool(a.state.file_sessions.close_all)

    app.router.lifespan_context = lifespan

