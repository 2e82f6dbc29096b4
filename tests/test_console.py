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
from sqlalchemy import create_engine, delete, func, select, update
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response

from tests.conftest import fresh_cli
from tests.console_support import (
    BROWSER_ZONE,
    DESKTOP,
    PHONE,
    SHOTS,
    audit_actions,
    csrf_of,
    form_login,
    log_in,
    shoot,
)
from tests.test_catalog import backed_up
from tests.test_server import ADMIN_PASSWORD, Server
from vmkeep.catalog.db import upgrade
from vmkeep.catalog.models import (
    ApiToken,
    BackupDay,
    Hypervisor,
    Job,
    JobVM,
    NewestPoint,
    PointDay,
    Policy,
    RepositoryRecord,
    RestorePointRecord,
    VirtualMachine,
)
from vmkeep.server.auth import token_digest
from vmkeep.server.console.dashboard import coverage, rpo_deadline
from vmkeep.server.console.render import ibytes
from vmkeep.server.console.session import COOKIE, set_session_cookie
from vmkeep.server.dispatch import select_vms


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
    page.set_viewport_size(PHONE)  # (the screenshots come with every figure: test_dashboard_figures_at_work)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
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


# The dashboard's figures at work (after the tests above, which see a catalog without hypervisor)

def _catalog_rows(database: str, rows: list[Any]) -> None:
    engine = create_engine(database)
    with Session(engine) as session:
        session.add_all(rows)
        session.commit()
    engine.dispose()


def test_dashboard_figures_at_work(chromium: Any, console_master: Server, console_api: httpx.Client) -> None:
    """RPO breaches, storage ratios, the growth chart and a running job's per-VM progress."""
    now = datetime.now(UTC)
    engine = create_engine(console_master.database)
    with Session(engine) as session:
        repo = session.scalars(select(RepositoryRecord).where(RepositoryRecord.name == "main")).one()
        lab = Hypervisor(name="lab", kind="libvirt", uri="qemu:///system", discovered_at=now)
        lab.vms = [VirtualMachine(name=n, uuid=n, host="h1", state="running", disks=[], tags=[], first_seen=seen)
                   for n, seen in (("web-old", now - timedelta(days=9)), ("web-fresh", now - timedelta(days=9)),
                                   ("web-new", now - timedelta(minutes=5)), ("db-1", now - timedelta(days=9)))]
        session.add(lab)
        session.add_all([RestorePointRecord(repository_id=repo.id, name=n, point_id=f"p-{n}", created=at, kind="vm",
                                            logical_bytes=8 << 20, read_bytes=2 << 20, stored_bytes=1 << 19,
                                            disks={"vda": 8 << 20})
                         for n, at in (("web-old", now - timedelta(days=3)),
                                       ("web-fresh", now - timedelta(minutes=1)))])
        session.commit()
        assert console_api.post("/api/policies", json={"name": "hourly-web", "repository": "main",
                                                       "globs": ["web-*"], "schedule": "0 * * * *"}).status_code == 201
        # made two days ago, and not due again while the test runs
        session.execute(update(Policy).where(Policy.name == "hourly-web").values(created=now - timedelta(days=2),
                                                                                  next_run=None))
        vm_ids = {name: id_ for name, id_ in session.execute(select(VirtualMachine.name, VirtualMachine.id))}
        ended = Job(policy_name="hourly-web", requested_by="schedule", status="partial",
                    started=now - timedelta(hours=3), finished=now - timedelta(hours=2))
        ended.vms = [JobVM(vm_id=vm_ids[n], vm_name=n, status=s, finished=now - timedelta(hours=2), warnings=[])
                     for n, s in (("web-fresh", "failed"), ("db-1", "succeeded"), ("web-fresh", "succeeded"),
                                  ("db-1", "failed"))]  # newest last: db-1 failed last time, web-fresh not
        session.add(ended)
        job = Job(policy_name="hourly-web", requested_by="admin", status="running", started=now - timedelta(minutes=2))
        job.vms = [JobVM(vm_name="web-old", status="running", proxy="p1", progress_bytes=1 << 30,
                         total_bytes=4 << 30, started=now - timedelta(seconds=100), warnings=[]),
                   JobVM(vm_name="web-fresh", status="queued", warnings=[])]
        session.add(job)
        session.commit()
        logical, read, stored, points = session.execute(select(
            func.sum(RestorePointRecord.logical_bytes), func.sum(RestorePointRecord.read_bytes),
            func.sum(RestorePointRecord.stored_bytes), func.count())
            .where(RestorePointRecord.repository_id == repo.id)).one()
        used = repo.used_bytes
        assert used and logical and read and stored
        today = session.scalar(select(func.sum(RestorePointRecord.stored_bytes)).where(
            RestorePointRecord.created >= datetime.combine(now.date(), datetime.min.time(), UTC)))
        job_id = job.id
    try:
        page = log_in(chromium, console_master)
        assert page.locator("[data-figure=failed]").inner_text() == "1"
        assert "Failed last time: db-1" in page.get_by_role("region", name="Virtual machines").inner_text()
        rpo = page.get_by_role("region", name="Recovery points on time")
        assert page.locator("[data-figure=rpo-breaches]").inner_text() == "1"
        assert rpo.locator("[data-breach]").all_inner_texts()[0].startswith("web-old (hourly-web) newest point")
        assert "web-fresh" not in rpo.inner_text() and "web-new" not in rpo.inner_text()  # fresh; discovered since
        assert "scheduled run before the last one" in rpo.inner_text()  # the rule, on the page

        storage = page.locator("tr[data-repository=main]")
        assert storage.locator("td").nth(3).inner_text() == str(points)  # from point_days
        assert storage.locator("[data-ratio=reduction]").inner_text() == f"{logical / used:.1f}×"
        assert storage.locator("[data-ratio=dedup-compression]").inner_text() == f"{read / stored:.1f}×"
        assert "Full size of every point" in str(page.locator("th", has_text="Reduction").get_attribute("title"))
        bars = page.locator("svg[data-chart=growth] rect.bar")
        assert bars.count() == 30
        assert bars.nth(29).get_attribute("data-day") == now.date().isoformat()
        assert bars.nth(29).locator("title").text_content() == f"{now.date()}: {ibytes(today)}"
        assert float(str(bars.nth(29).get_attribute("height"))) > 0
        assert float(str(bars.nth(0).get_attribute("height"))) == 0  # nothing stored 29 days ago

        run = page.locator(f"[data-job='{job_id}']")
        assert run.get_by_role("link", name=f"Job {job_id}").get_attribute("href") == f"/jobs/{job_id}"
        counts = " ".join(run.locator("[data-job-progress]").inner_text().split())
        assert "0 done, 1 running, 1 waiting of 2 VMs" in counts
        vm = run.locator("tr[data-vm=web-old]")
        assert vm.locator("[data-progress]").inner_text() == "25 % · 1.0 GiB of 4.0 GiB"
        assert vm.locator("[data-throughput]").inner_text().endswith("MiB/s")  # about 10 MiB/s
        assert "min" in vm.locator("[data-eta]").inner_text()  # about 5 minutes left
        with page.expect_response(lambda r: r.url.endswith("/dashboard/running"), timeout=8000):
            engine.dispose()
            with Session(engine) as session:  # the proxy moves on; htmx's next poll shows it
                session.execute(update(JobVM).where(JobVM.job_id == job_id, JobVM.vm_name == "web-old")
                                .values(progress_bytes=3 << 30))
                session.commit()
        page.wait_for_function("document.querySelector('tr[data-vm=web-old] [data-progress]')"
                               ".textContent.startsWith('75 %')", timeout=8000)
        shoot(page, "dashboard")
        page.context.close()
    finally:
        with Session(engine) as session:
            session.execute(update(JobVM).where(JobVM.job_id == job_id).values(status="cancelled", finished=now))
            session.execute(update(Job).where(Job.id == job_id).values(status="cancelled", finished=now))
            session.commit()
        engine.dispose()


MIXED_GLOBS = ["web-*", "db-?", "[!w]*-1", "app-[0-9][0-9]", "x[z-a]*", "[]]*", "*[[]*", "a^b*", "*\\*"]


def test_protected_count_is_what_select_vms_picks(database: str) -> None:
    """The dashboard's one-query count of protected VMs equals select_vms over every policy, on a
    catalog with every kind of rule (names, globs with sets and ranges, hypervisor, hosts, tags,
    folders) and VMs that are gone."""
    upgrade(database)
    engine = create_engine(database)
    names = ["web-1", "web-2", "db-1", "db-22", "mail-1", "app-07", "app-7", "x-1", "]odd", "a[b", "a^bc",
             "back\\slash", "web-gone"]
    with Session(engine) as session:
        repo = RepositoryRecord(name="r", location="/r", repo_id="r", encrypted=False)
        session.add(repo)
        for h in ("east", "west"):
            hyp = Hypervisor(name=h, kind="libvirt", uri=f"qemu+tls://{h}/system")
            hyp.vms = [VirtualMachine(name=n, uuid=f"{h}-{n}", host=f"{h}-h{i % 3}", state="running", disks=[],
                                      tags=[["prod"], ["test"], [], ["prod", "db"]][i % 4],
                                      folder=[None, "/dc/web", "/dc/db", "/lab"][i % 4], present=n != "web-gone")
                       for i, n in enumerate(names)]
            session.add(hyp)
        session.flush()
        rules: list[dict[str, Any]] = [
            {"globs": MIXED_GLOBS[:3]}, {"globs": MIXED_GLOBS[3:]}, {"vms": ["mail-1"], "hypervisor": "west"},
            {"hosts": ["east-h1"], "tags": ["db"]}, {"folders": ["/dc/*"], "globs": ["a*"]},
            {"tags": ["prod"], "hypervisor": "east", "hosts": ["east-h0", "east-h2"]}, {"folders": ["[!/]*"]},
        ]
        policies = [Policy(name=f"p{i}", selection=r, repository_id=repo.id, retention={}) for i, r in enumerate(rules)]
        session.add_all(policies)
        session.commit()
        for k in range(len(policies) + 1):
            chosen = policies[:k]
            picked = {vm.id: vm.name for p in chosen for vm in select_vms(session, p)}
            covered = coverage(session, chosen, datetime.now(UTC))
            protected, unprotected = covered.protected, covered.unprotected
            present = session.scalars(select(VirtualMachine.name).where(VirtualMachine.present.is_(True),
                                                                        VirtualMachine.id.not_in(picked))).all()
            assert protected == len(picked), (k, picked)
            assert unprotected == sorted(present)[:10]
        assert 0 < len(picked) < 2 * (len(names) - 1)  # the rules pick some VMs, not all
    engine.dispose()


def test_dashboard_sums_follow_the_catalog(database: str) -> None:
    """point_days, newest_points and backup_days (kept by triggers, migration 0016) match the
    rows they sum after points are added, pruned and moved, and backups end, retry and go."""
    upgrade(database)
    engine = create_engine(database)
    now = datetime.now(UTC)
    with Session(engine) as session:
        repos = [RepositoryRecord(name=n, location=f"/{n}", repo_id=n, encrypted=False) for n in ("a", "b")]
        session.add_all(repos)
        session.flush()
        session.add_all([RestorePointRecord(repository_id=repos[i % 2].id, name=f"vm-{i % 3}", point_id=f"p{i}",
                                            created=now - timedelta(days=i % 5, hours=i), kind="vm",
                                            logical_bytes=1000 + i, read_bytes=100 + i if i % 4 else None,
                                            stored_bytes=10 + i, disks={}) for i in range(40)])
        job = Job(policy_name="p", requested_by="t", status="running", started=now)
        job.vms = [JobVM(vm_name=f"vm-{i}", status=["succeeded", "failed", "queued"][i % 3], warnings=[],
                         finished=now - timedelta(days=i % 3) if i % 3 < 2 else None) for i in range(30)]
        session.add(job)
        session.commit()

        def check() -> None:
            days = {(r.repository_id, r.day): (r.points, r.logical_bytes, r.read_bytes, r.stored_bytes)
                    for r in session.scalars(select(PointDay))}
            day = func.date(func.timezone("UTC", RestorePointRecord.created))
            want = {(r[0], r[1]): tuple(r[2:]) for r in session.execute(select(
                RestorePointRecord.repository_id, day, func.count(), func.sum(RestorePointRecord.logical_bytes),
                func.coalesce(func.sum(RestorePointRecord.read_bytes), 0),
                func.coalesce(func.sum(RestorePointRecord.stored_bytes), 0))
                .group_by(RestorePointRecord.repository_id, day))}
            assert days == want
            newest = {(r.repository_id, r.name): r.created for r in session.scalars(select(NewestPoint))}
            assert newest == {(r[0], r[1]): r[2] for r in session.execute(select(
                RestorePointRecord.repository_id, RestorePointRecord.name, func.max(RestorePointRecord.created))
                .group_by(RestorePointRecord.repository_id, RestorePointRecord.name))}
            ended = func.date(func.timezone("UTC", JobVM.finished))
            outcomes = {r.day: (r.succeeded, r.failed) for r in session.scalars(select(BackupDay))
                        if r.succeeded or r.failed}
            assert outcomes == {r[0]: (r[1], r[2]) for r in session.execute(select(
                ended, func.count().filter(JobVM.status == "succeeded"), func.count().filter(JobVM.status == "failed"))
                .where(JobVM.status.in_(["succeeded", "failed"]), JobVM.finished.is_not(None)).group_by(ended))}

        check()
        session.execute(delete(RestorePointRecord).where(RestorePointRecord.name == "vm-1",
                                                         RestorePointRecord.created < now - timedelta(days=1)))  # prune
        session.execute(delete(RestorePointRecord).where(RestorePointRecord.name == "vm-2",
                                                         RestorePointRecord.repository_id == repos[1].id))  # all gone
        session.execute(update(RestorePointRecord).where(RestorePointRecord.name == "vm-0")
                        .values(repository_id=repos[1].id))
        session.execute(update(JobVM).where(JobVM.status == "queued").values(status="failed", finished=now))
        session.execute(update(JobVM).where(JobVM.vm_name.in_(["vm-1", "vm-4"])).values(status="queued", finished=None))
        session.execute(update(JobVM).where(JobVM.vm_name == "vm-0").values(finished=now - timedelta(days=7)))
        session.commit()
        check()
        assert (repos[1].id, "vm-2") not in {(r.repository_id, r.name) for r in session.scalars(select(NewestPoint))}
        session.execute(delete(JobVM).where(JobVM.vm_name.in_(["vm-3", "vm-5"])))
        session.commit()
        check()
    engine.dispose()


def test_rpo_deadline_is_the_scheduled_run_before_the_last() -> None:
    now = datetime(2026, 12, 5, 1, 30, tzinfo=UTC)
    old = now - timedelta(days=30)
    nightly = Policy(name="n", selection={}, retention={}, schedule="0 22 * * *", created=old)
    assert rpo_deadline(nightly, now) == datetime(2026, 12, 3, 22, 0, tzinfo=UTC)  # the last run was the 4th's
    assert rpo_deadline(Policy(name="h", schedule="15 * * * *", created=old), now) == datetime(2026, 12, 5, 0, 15,
                                                                                              tzinfo=UTC)
    assert rpo_deadline(Policy(name="m", schedule=None, created=old), now) is None  # run by hand: no promise
    assert rpo_deadline(Policy(name="y", schedule="0 22 * * *", created=now - timedelta(days=1)), now) is None  # new
    assert rpo_deadline(Policy(name="x", schedule="not cron", created=old), now) is None
