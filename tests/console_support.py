"""What the console's test modules share: a logged-in browser page, a form login without a
browser, the audit trail, viewports and the screenshot folder (the fixtures are in conftest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.test_server import ADMIN_PASSWORD, Server

SHOTS = Path(__file__).resolve().parent.parent / "docs" / "console"
DESKTOP, PHONE = {"width": 1280, "height": 800}, {"width": 390, "height": 844}
BROWSER_ZONE = "Asia/Kolkata"
AUDITOR = ("audrey", "audrey-password")


def log_in(browser: Any, master: Server, name: str = "admin", password: str = ADMIN_PASSWORD) -> Any:
    """A fresh browser context logged in through the form; the page is on the dashboard. The
    browser is in India (UTC+05:30), so times shown in UTC would not pass for local ones."""
    context = browser.new_context(viewport=DESKTOP, locale="en-US", timezone_id=BROWSER_ZONE)
    page = context.new_page()
    page.goto(master.url + "/")
    assert page.url == master.url + "/login"  # no session yet: the login page
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(master.url + "/")
    return page


def form_login(master: Server, name: str = "admin", password: str = ADMIN_PASSWORD) -> httpx.Client:
    """A console session without a browser, as a form post from the console's own page does it."""
    client = httpx.Client(base_url=master.url, timeout=30)
    reply = client.post("/login", data={"name": name, "password": password}, headers={"Origin": master.url})
    assert reply.status_code == 303 and reply.headers["location"] == "/", reply.text
    return client


def csrf_of(html: str) -> str:
    """The CSRF token a console page carries in its forms."""
    return html.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def audit_actions(admin_api: httpx.Client) -> list[tuple[str, str]]:
    """(user, action) of every audit entry, newest first."""
    return [(e["user"], e["action"]) for e in admin_api.get("/api/audit", params={"limit": 1000}).json()]


def shoot(page: Any, name: str) -> None:
    """A full-page screenshot at desktop and phone width into docs/console/ (shown in the README),
    checking that the phone width needs no sideways scrolling."""
    page.set_viewport_size(DESKTOP)
    page.screenshot(path=str(SHOTS / f"{name}-1280x800.png"), full_page=True)
    page.set_viewport_size(PHONE)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), f"{name} scrolls sideways"
    page.screenshot(path=str(SHOTS / f"{name}-390x844.png"), full_page=True)
    page.set_viewport_size(DESKTOP)
