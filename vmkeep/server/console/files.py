"""File-level restore: browse a point's filesystems as a tree, search by name in the point or across
the VM's newest points, download one file or a folder as a tar stream.

Everything here is a restore (admin, operator, restore-only); an auditor sees the points but gets
403 on these pages. The point's filesystems open in a worker (vmkeep.server.file_sessions): the
page says so and polls (htmx) until they are open. Downloads are audited like the API's
(vmkeep.server.file_access.download).
"""

from __future__ import annotations

import posixpath
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse
from sqlalchemy.orm import Session

from vmkeep.engine.files import Entry, shown
from vmkeep.errors import VmkeepError
from vmkeep.server.auth import RESTORE, get_session
from vmkeep.server.console.render import env, page, screen
from vmkeep.server.console.session import Refused, Visitor, changing, person
from vmkeep.server.file_access import (
    MAX_MATCHES,
    MAX_POINTS_SEARCHED,
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
    search_point,
    sessions_of,
)
from vmkeep.server.file_sessions import FileSession, NotReady, PointRef, SessionsFull

router = APIRouter(include_in_schema=False)
PathQuery = Query("/", max_length=4096)
FsQuery = Query("", max_length=200)


def restorer(who: Visitor = Depends(person)) -> Visitor:
    """A user who may restore: a file download is a restore (as in the API)."""
    if who.user.role not in RESTORE:
        raise Refused(f"A {who.user.role} account cannot browse or download a point's files: restoring files needs "
                      "an administrator, operator or restore-only account.")
    return who


def guest_query(path: str) -> str:
    """A guest path for a link's query string, its bytes as they are (a name that is not UTF-8
    included)."""
    return quote(path.encode("utf-8", "surrogateescape"), safe="/")


env.filters.update(guest_q=guest_query, guest_shown=shown, guest_folder=posixpath.dirname)


def crumbs(path: str) -> list[tuple[str, str]]:
    """(name, path) from / down to ``path``, for the breadcrumb."""
    parts = [p for p in path.split("/") if p]
    return [("/", "/")] + [(shown(p), "/" + "/".join(parts[:i + 1])) for i, p in enumerate(parts)]


def row(e: Entry) -> dict[str, Any]:
    return {"name": shown(posixpath.basename(e.path)), "path": e.path, "kind": e.kind, "size": e.size,
            "mtime": mtime_of(e), "target": None if e.target is None else shown(e.target),
            "mode": f"{e.mode:04o}"}


def _context(point: PointRef | None, s: FileSession | None, path: str, fs: str) -> dict[str, Any]:
    return {"point": point, "session": s, "path": path, "shown_path": shown(path), "fs": fs, "crumbs": crumbs(path),
            "error": None, "entries": [], "top": None, "filesystems": [], "max_points": MAX_POINTS_SEARCHED}


async def _state(request: Request, who: Visitor, ref: str, session: Session, path: str, fs: str,
                 retry: bool = False) -> tuple[dict[str, Any], int]:
    """What the files area shows: opening, the reason it failed, or the folder's listing."""
    try:
        point = find_point(session, ref)
        path = guest_path(request, path)
    except HTTPException as exc:
        return {**_context(None, None, "/", fs), "error": str(exc.detail)}, exc.status_code
    context = _context(point, None, path, fs)
    try:
        await check_reachable(request, point)
        s = sessions_of(request).get(who.user.name, point, retry=retry)
    except SessionsFull as exc:
        return {**context, "error": str(exc)}, 503
    except HTTPException as exc:
        return {**context, "error": str(exc.detail)}, exc.status_code
    context["session"] = s
    if s.state != "ready":
        return context, 502 if s.state == "failed" else 200
    try:
        fs = choose_filesystem(s, fs)
        context.update(fs=fs, filesystems=s.filesystems.filesystems)
        top, entries = await run_in_threadpool(listing, s, fs, path)
    except HTTPException as exc:
        return {**context, "error": str(exc.detail)}, exc.status_code
    except NotReady as exc:
        return {**context, "error": str(exc)}, 503
    except VmkeepError as exc:
        problem = failure(exc)
        return {**context, "error": str(problem.detail)}, problem.status_code
    return {**context, "top": row(top), "entries": [row(e) for e in entries]}, 200


@router.get("/points/{ref}/files")
async def files_page(ref: str, request: Request, path: str = PathQuery, fs: str = FsQuery, retry: bool = False,
                     who: Visitor = Depends(restorer), session: Session = Depends(get_session)) -> Response:
    context, status = await _state(request, who, ref, session, path, fs, retry)
    return screen(request, who, "files.html", "points", context, status)


@router.get("/points/{ref}/files/part")
async def files_part(ref: str, request: Request, path: str = PathQuery, fs: str = FsQuery,
                     who: Visitor = Depends(restorer), session: Session = Depends(get_session)) -> Response:
    """The files area alone, which the page polls while the point's filesystems open."""
    context, status = await _state(request, who, ref, session, path, fs)
    # htmx swaps 2xx and 4xx answers only: a point that failed to open says so in a 200
    return page(request, "files_part.html", {"who": who, **context}, 200 if status >= 500 else status)


@router.get("/points/{ref}/files/download")
async def files_download(ref: str, request: Request, path: str = Query(max_length=4096), fs: str = FsQuery,
                         who: Visitor = Depends(restorer), session: Session = Depends(get_session)) -> Response:
    """A file as it is, a folder as a tar; audited (``file-download``) with the path. The point is
    opened first if it is not open (a search's result whose session closed)."""
    s = await open_session(request, who.user, ref, session)  # a search's point may not be open (yet, again)
    try:
        return await run_in_threadpool(download, session, request, who.user, s, choose_filesystem(s, fs or None),
                                       guest_path(request, path))
    except NotReady as exc:
        raise HTTPException(503, str(exc)) from exc
    except VmkeepError as exc:
        raise failure(exc) from exc


@router.get("/points/{ref}/files/search")
async def files_search(ref: str, request: Request, pattern: str = Query("", max_length=500),
                       points: int = Query(1, ge=1, le=MAX_POINTS_SEARCHED), fs: str = FsQuery,
                       who: Visitor = Depends(restorer), session: Session = Depends(get_session)) -> Response:
    """Search this point (at once: its filesystems are open) or the VM's newest points (in a
    thread, the page polling its results as they come)."""
    try:
        point = find_point(session, ref)
    except HTTPException as exc:
        return screen(request, who, "files.html", "points", {"point": None, "error": exc.detail}, exc.status_code)
    context: dict[str, Any] = {"point": point, "ref": point.id, "pattern": pattern, "points": points, "fs": fs,
                               "error": None, "search": None, "matches": [], "cut": False,
                               "max_points": MAX_POINTS_SEARCHED, "max_matches": MAX_MATCHES}
    try:
        pattern = check_pattern(pattern)
    except HTTPException as exc:
        return screen(request, who, "files_search.html", "points", {**context, "error": exc.detail}, 400)
    if points == 1:
        s = sessions_of(request).find(who.user.name, point.id)
        if s is None or s.state != "ready":
            return RedirectResponse(f"/points/{ref}/files", status_code=303)
        try:
            matches, cut = await run_in_threadpool(search_point, s, pattern, None)
        except VmkeepError as exc:
            return screen(request, who, "files_search.html", "points", {**context, "error": str(exc)}, 502)
        return screen(request, who, "files_search.html", "points", {**context, "matches": matches, "cut": cut})
    refs = newest_points(session, point.vm, points)
    for r in refs:
        await check_reachable(request, r)
    search = request.app.state.file_searches.start(sessions_of(request), who.user.name, point.vm, pattern, refs)
    return screen(request, who, "files_search.html", "points", {**context, "search": search})


@router.get("/points/{ref}/files/searches/{search_id}")
def search_part(ref: str, search_id: str, request: Request, who: Visitor = Depends(restorer)) -> Response:
    """A search across points as it goes (polled until it is done)."""
    search = request.app.state.file_searches.get(search_id, who.user.name)
    if search is None:
        return page(request, "files_search_part.html", {"search": None, "ref": ref}, 404)
    return page(request, "files_search_part.html", {"search": search, "ref": ref, "max_matches": MAX_MATCHES})


@router.post("/points/{ref}/files/close")
def files_close(ref: str, request: Request, who: Visitor = Depends(changing),
                session: Session = Depends(get_session)) -> Response:
    """Close the point's files now (they close by themselves after a few idle minutes)."""
    restorer(who)
    point = find_point(session, ref)
    sessions_of(request).close(who.user.name, point.id)
    return RedirectResponse(f"/points/vm/{point.vm}", status_code=303)
