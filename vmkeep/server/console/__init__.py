"""The web console: server-rendered pages (Jinja2, htmx) at ``/``, a face of the master like the API.

It works with the API's users, roles, login tokens and audit log: a login puts a 12-hour token in
an HttpOnly, SameSite=Strict cookie (Secure over TLS), and every POST carries a CSRF token derived
from it and must come from the console's own origin.

``static/htmx.min.js`` is htmx.org 2.0.11 from npm (``npm pack htmx.org@2.0.11``, ``dist/``), its
licence beside it: vendored, so neither set-up nor CI runs npm and the console needs no CDN.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles

from vmkeep.server.console import files, inventory, jobs, pages, people, points, policies, proxies, repositories
from vmkeep.server.console.render import page
from vmkeep.server.console.session import LoginNeeded, Refused, back_to_login

STATIC = Path(__file__).parent / "static"


def install(app: FastAPI) -> None:
    """Add the console's pages and static files to the master's application."""
    for module in (pages, inventory, policies, jobs, points, files, repositories, proxies, people):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(LoginNeeded, back_to_login)  # type: ignore[arg-type]
    app.add_exception_handler(Refused, refused)  # type: ignore[arg-type]


async def refused(request: Request, exc: Refused) -> Response:
    """403 that says why: a page, or for an htmx request the message alone, which htmx swaps in
    where the action's answer would have gone (nothing changed)."""
    if request.headers.get("hx-request"):
        return page(request, "refused_part.html", {"message": str(exc)}, 403)
    return page(request, "refused.html", {"message": str(exc)}, 403)
