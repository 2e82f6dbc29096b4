"""The web console in Debian's chromium (Playwright) against a real `vmkeep server` on PostgreSQL:
login, the dashboard's figures, logout, CSRF and cross-site refusals, roles, the cookie's flags.
Screenshots of the pages go to docs/console/ (shown in the README)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from sqlalchemy import create_engine, update
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response

from tests.conftest import fresh_cli
from tests.console_support import BROWSER_ZONE, DESKTOP, PHONE, SHOTS, audit_actions, csrf_of, form_login, log_in
from tests.test_catalog import backed_up
from tests.test_server import ADMIN_PASSWORD, Server
from vmkeep.catalog.models import ApiToken, Job, JobVM
from vmkeep.server.auth import token_digest
from vmkeep.server.console.session import COOKIE, set_session_cookie


def finished_backups(database: str, outcomes: list[str]) -> None:
    """Backups that ended in the last days (the lab has no hypervisor here to run them)."""
    engine = create_engine(database)
    now = datetime.now(UTC)
    with Session(engine) as session:
        job = Job(policy_name="nightly", requested_by="schedule", status="partial", started=now - timedelta(days=2),
                  finished=now - timedelta(days=2))
        job.vms = [JobVM(vm_name=f"vm-{i}", status=s, finished=now - timedelta(days=2)) for i, s in enumerate(outcomes)]
        session.add(job)
        session.commit()
    engine.dispose()


def test_login_and_dashboard_with_real_figures(chromium: Any, console_master: Server, make_disk: Callable[..., Path],
                                                tmp_path: Path) -> None:
    cli = fresh_cli()
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    backed_up(cli, make_disk, repo, ["app-1", "app-1", "mail-1"])
    admin = console_master.client(console_master.login("admin", ADMIN_PASSWORD))
    assert admin.post("/api/repositories", json={"name": "main", "location": repo,
                                                 "passphrase": cli.env["VMKEEP_PASSPHRASE"]}).status_code == 201
    assert admin.post("/api/policies", json={"name": "nightly", "repository": "main",
                                             "globs": ["app-*"]}).status_code == 201
    assert admin.post("/api/proxies/register", json={"name": "p1", "transports": ["nbd"], "reaches": ["*"],
                                                     "concurrency": 1}).status_code == 200
    finished_backups(console_master.database, ["succeeded", "succeeded", "succeeded", "failed"])

    context = chromium.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.goto(console_master.url + "/login")
    page.screenshot(path=str(SHOTS / "login-1280x800.png"))
    page.set_viewport_size(PHONE)
    page.screenshot(path=str(SHOTS / "login-390x844.png"))
    context.close()

    page = log_in(chromium, console_master, "admin", ADMIN_PASSWORD)
    problems: list[str] = []  # script errors, Content-Security-Policy refusals
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.reload()
    with page.expect_response(lambda r: r.url.endswith("/dashboard/running"), timeout=8000) as polled:
        pass  # htmx refreshes the running jobs by itself
    assert polled.value.status == 200 and problems == []
    storage = page.locator("tr[data-repository=main]")
    assert storage.locator("td").all_inner_texts()[3] == "3"  # the three points registering imported
    assert "KiB" in storage.inner_text() or "MiB" in storage.inner_text()  # binary units
    assert page.locator("[data-figure=proxies-up]").inner_text() == "1"
    assert "75 %" in page.get_by_role("region", name="Backup success").inner_text()  # 3 of 4, last 7 days
    assert "No hypervisor yet" in page.inner_text("main")  # the empty state says what to do next
    assert "No policy yet" not in page.inner_text("main")
    heard = page.locator("time").first  # the proxy's heartbeat, in the browser's time zone
    at = datetime.fromisoformat(str(heard.get_attribute("datetime"))).astimezone(ZoneInfo(BROWSER_ZONE))
    assert heard.inner_text() == f"{at:%b} {at.day}, {at.year}, {at.hour % 12 or 12}:{at:%M} {at:%p}"
    assert page.get_by_role("navigation", name="Main").get_by_role("link").all_inner_texts() == [
        "Dashboard", "Inventory", "Policies", "Jobs", "Restore", "Repositories", "Proxies", "Audit log", "Users"]
    page.screenshot(path=str(SHOTS / "dashboard-1280x800.png"), full_page=True)
    page.set_viewport_size(PHONE)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
    page.screenshot(path=str(SHOTS / "dashboard-390x844.png"), full_page=True)
    page.keyboard.press("Tab")  # the first stop is the skip link, then the navigation
    assert page.evaluate("document.activeElement.textContent") == "Skip to the content"
    page.context.close()


def test_wrong_password_shows_an_error_by_the_form(chromium: Any, console_master: Server,
                                                   console_api: httpx.Client) -> None:
    context = chromium.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.goto(console_master.url + "/login")
    page.get_by_label("User name").fill("admin")
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Log in").click()
    error = page.get_by_role("alert")
    assert error.inner_text() == "Wrong user name or password."
    assert page.url == console_master.url + "/login" and page.get_by_label("User name").input_value() == "admin"
    assert page.get_by_label("Password").get_attribute("aria-describedby") == "login-error"
    assert not [c for c in context.cookies() if c["name"] == COOKIE]
    context.close()
    assert ("admin", "login-failed") in audit_actions(console_api)  # audited like the API's


def test_logout_ends_the_session(chromium: Any, console_master: Server, console_api: httpx.Client) -> None:
    page = log_in(chromium, console_master, "admin", ADMIN_PASSWORD)
    cookie = next(c for c in page.context.cookies() if c["name"] == COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]  # plain HTTP here
    assert page.evaluate("document.cookie") == ""  # out of the page's scripts' reach
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(console_master.url + "/login")
    assert not [c for c in page.context.cookies() if c["name"] == COOKIE]
    page.context.close()
    old = httpx.get(console_master.url + "/", cookies={COOKIE: cookie["value"]})
    assert old.status_code == 303 and old.headers["location"] == "/login"  # the old cookie is dead
    assert console_master.client(cookie["value"]).get("/api/me").status_code == 401  # the token is revoked
    assert ("admin", "logout") in audit_actions(console_api)


def test_a_revoked_or_expired_session_goes_back_to_login(console_master: Server) -> None:
    client = form_login(console_master)
    token = client.cookies[COOKIE]
    assert client.get("/").status_code == 200
    assert console_master.client(token).post("/api/auth/logout").status_code == 204  # the API ends it
    reply = client.get("/")
    assert reply.status_code == 303 and reply.headers["location"] == "/login"
    polled = client.get("/dashboard/running", headers={"HX-Request": "true"})  # htmx is told to go there
    assert polled.headers.get("HX-Redirect") == "/login"

    expiring = form_login(console_master)
    engine = create_engine(console_master.database)
    with engine.begin() as conn:  # twelve hours later
        conn.execute(update(ApiToken).where(ApiToken.token_sha256 == token_digest(expiring.cookies[COOKIE]))
                     .values(expires=datetime.now(UTC) - timedelta(seconds=1)))
    engine.dispose()
    reply = expiring.get("/")
    assert reply.status_code == 303 and reply.headers["location"] == "/login"


def test_csrf_and_cross_site_posts_are_refused(console_master: Server, console_api: httpx.Client) -> None:
    client = form_login(console_master)
    page = client.get("/").text
    csrf = csrf_of(page)
    before = audit_actions(console_api)
    refused = [
        client.post("/logout", data={}, headers={"Origin": console_master.url}),  # no token
        client.post("/logout", data={"csrf": "0" * 64}, headers={"Origin": console_master.url}),  # a wrong one
        client.post("/logout", data={"csrf": csrf}, headers={"Origin": "https://evil.example"}),  # another site
        client.post("/logout", data={"csrf": csrf}),  # neither Origin nor Referer
        client.post("/logout", data={"csrf": csrf}, headers={"Referer": "https://evil.example/x"}),
        httpx.post(console_master.url + "/login", data={"name": "admin", "password": ADMIN_PASSWORD},
                   headers={"Origin": "https://evil.example"}),  # a login forced from another site
    ]
    assert [r.status_code for r in refused] == [403] * 6
    assert "reload the page" in refused[0].text and "own pages" in refused[2].text  # what to do
    assert all(COOKIE not in r.cookies for r in refused)
    assert client.get("/").status_code == 200  # the session still works: nothing changed
    assert audit_actions(console_api) == before
    done = client.post("/logout", headers={"Origin": console_master.url, "X-CSRF-Token": csrf})  # htmx's header
    assert done.status_code == 303 and client.get("/").status_code == 303


def test_an_auditor_sees_no_changing_actions(chromium: Any, console_master: Server, console_api: httpx.Client) -> None:
    page = log_in(chromium, console_master, "admin", ADMIN_PASSWORD)
    assert page.locator(".action").count() > 0  # "add one with vmkeep … hypervisor add"
    page.context.close()
    page = log_in(chromium, console_master, "audrey", "audrey-password")
    assert "audrey (auditor)" in page.locator(".account").inner_text()
    assert page.locator(".action").count() == 0 and "hypervisor add" not in page.inner_text("main")
    assert "an administrator or operator adds it" in page.inner_text("main")
    page.context.close()
    assert ("audrey", "login") in audit_actions(console_api)


def test_console_logins_are_throttled_with_the_apis(console_master: Server) -> None:
    form = {"Origin": console_master.url}
    tries = [httpx.post(console_master.url + "/login", data={"name": "mallory", "password": f"guess-{i}"}, headers=form)
             for i in range(6)]
    assert [r.status_code for r in tries] == [401] * 5 + [429] and "try again in" in tries[-1].text
    assert int(tries[-1].headers["Retry-After"]) >= 1
    api = httpx.post(console_master.url + "/api/auth/login", json={"name": "mallory", "password": "guess-6"})
    assert api.status_code == 429  # one guard for both faces


def test_a_proxy_account_reads_nothing(console_master: Server, console_api: httpx.Client) -> None:
    assert console_api.post("/api/users", json={"name": "pete", "password": "pete-password",
                                              "role": "proxy"}).status_code == 201
    client = httpx.Client(base_url=console_master.url, timeout=30)
    refused = client.post("/login", data={"name": "pete", "password": "pete-password"},
                          headers={"Origin": console_master.url})
    assert refused.status_code == 403 and "cannot use the console" in refused.text and COOKIE not in client.cookies
    assert audit_actions(console_api)[:2] == [("pete", "logout"), ("pete", "login")]  # its token went again at once
    # a proxy's API token put into the cookie by hand reads nothing either, as in the API
    client.cookies.set(COOKIE, console_master.login("pete", "pete-password"))
    assert [client.get(p).status_code for p in ("/", "/dashboard/running")] == [403, 403]


def test_the_cookie_is_secure_under_tls() -> None:
    """uvicorn says https in the request's scope when `vmkeep server --tls-cert` serves it."""
    for scheme, secure in (("https", True), ("http", False)):
        response = Response()
        request = Request({"type": "http", "scheme": scheme, "method": "POST", "path": "/login",
                           "headers": [(b"host", b"console_master:8470")]})
        set_session_cookie(response, request, "vk_x")
        header = response.headers["set-cookie"]
        assert "HttpOnly" in header and "SameSite=strict" in header.replace("Strict", "strict")
        assert ("Secure" in header) == secure, header
