"""Jinja2 for the console's templates, with the filters its pages share (binary sizes, times)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from vmkeep import __version__
from vmkeep.server.auth import ADMIN, CHANGE_INVENTORY, OVERWRITE, READ_AUDIT, RESTORE
from vmkeep.server.console.session import Visitor

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")

# every console page: nothing from elsewhere, no inline script or style, never inside a frame
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def ibytes(n: int | None) -> str:
    """1536 → '1.5 KiB': sizes in binary units, as the CLI shows them."""
    if n is None:
        return "—"
    size, unit = float(n), 0
    while size >= 1024 and unit < len(UNITS) - 1:
        size, unit = size / 1024, unit + 1
    return f"{int(size)} B" if unit == 0 else f"{size:.1f} {UNITS[unit]}"


def span(seconds: float | None) -> str | None:
    """A time in words read at a glance (durations, time left): 42 → '42 s', 185 → '3 min 05 s',
    3725 → '1 h 02 min'."""
    if seconds is None:
        return None
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def iso(at: datetime) -> str:
    """The machine-readable time a <time> element carries; console.js shows it in the browser's zone."""
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC).isoformat(timespec="seconds")


def utc_text(at: datetime) -> str:
    """What a <time> shows until (or without) JavaScript."""
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(),
                  trim_blocks=True, lstrip_blocks=True)
env.filters.update(ibytes=ibytes, iso=iso, utc_text=utc_text)
env.globals["version"] = __version__


def page(request: Request, template: str, context: dict[str, Any], status_code: int = 200,
         headers: dict[str, str] | None = None) -> HTMLResponse:
    html = env.get_template(template).render(request=request, **context)
    return HTMLResponse(html, status_code=status_code, headers={**HEADERS, **(headers or {})})


def roles(who: Visitor) -> dict[str, bool]:
    """What the templates may offer this user: the API's role rules, nothing more (the routes
    enforce them again; a hidden button is a courtesy, not the check)."""
    role = who.user.role
    return {"may_change": role in CHANGE_INVENTORY, "may_restore": role in RESTORE, "may_overwrite": role in OVERWRITE,
            "may_audit": role in READ_AUDIT, "is_admin": role == ADMIN}


def screen(request: Request, who: Visitor, template: str, active: str, context: dict[str, Any],
           status_code: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    """A whole console page for a logged-in user: the navigation marks ``active``, the templates
    get the user's role flags."""
    return page(request, template, {"who": who, "active": active, **roles(who), **context}, status_code, headers)
