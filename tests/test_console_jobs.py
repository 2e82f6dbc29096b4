"""The console's Jobs pages in Debian's chromium against a real `vmkeep server` on PostgreSQL: the
history's filters and paging, a running job's live progress (the catalog's row changes while the
page is open) and the end of its polling, cancel (admin yes, auditor 403 with nothing changed),
and a backup's log lines written by the proxy's logging handler through the proxies' own role."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect
from sqlalchemy import Engine, create_engine, insert, update
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import fresh_cli
from tests.console_support import AUDITOR, audit_actions, csrf_of, form_login, log_in, shoot
from tests.test_server import ADMIN_PASSWORD, Server
from vmkeep.catalog.models import Job, JobVM, JobVMLog
from vmkeep.proxy import log_lines
from vmkeep.proxy.log_lines import catalog_log
from vmkeep.server.console.job_view import RUNNING_TAIL

MiB = 1 << 20
NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def catalog(console_master: Server) -> Iterator[Engine]:
    engine = create_engine(console_master.database)
    yield engine
    engine.dispose()


def add_job(engine: Engine, policy: str, status: str, by: str, started: datetime,
            vms: list[tuple[str, str]], **vm_fields: Any) -> int:
    """A run with its VMs (name, status), as the dispatcher and the proxies leave them."""
    ended = status not in ("running",)
    with Session(engine) as session:
        job = Job(policy_name=policy, requested_by=by, status=status, started=started,
                  finished=started + timedelta(minutes=3) if ended else None)
        job.vms = [JobVM(vm_name=name, status=s, started=started, read_bytes=10 * MiB if s == "succeeded" else None,
                         stored_bytes=2 * MiB if s == "succeeded" else None,
                         finished=started + timedelta(minutes=3) if s in ("succeeded", "failed", "cancelled") else None,
                         **vm_fields) for name, s in vms]
        session.add(job)
        session.commit()
        return job.id


def listed(html: str) -> list[int]:
    return [int(n) for n in re.findall(r'<tr data-job="(\d+)"', html)]


def test_history_filters_and_pages(chromium: Any, console_master: Server, catalog: Engine) -> None:
    ids = {}
    for i in range(55):  # one page is 50
        day = NOW - timedelta(days=i % 5, hours=1)
        ids[i] = add_job(catalog, "nightly" if i % 2 else "hourly", "succeeded" if i % 3 else "failed",
                         "schedule" if i % 4 else "admin", day, [(f"web-{i}", "succeeded"), (f"db-{i}", "failed")])
    client = form_login(console_master)
    first = client.get("/jobs")
    assert first.status_code == 200
    everything = sorted(ids.values(), reverse=True)
    assert listed(first.text) == everything[:50]  # newest first, one page
    assert "Page 1 of 2" in first.text
    assert listed(client.get("/jobs", params={"page": 2}).text) == everything[50:]

    def only(**params: str) -> list[int]:
        reply = client.get("/jobs", params=params)
        assert reply.status_code == 200, reply.text
        return listed(reply.text)

    assert only(policy="nightly", per_page="200") == [ids[i] for i in range(54, -1, -1) if i % 2]
    assert only(status="failed", per_page="200") == [ids[i] for i in range(54, -1, -1) if i % 3 == 0]
    assert only(requested_by="admin", per_page="200") == [ids[i] for i in range(54, -1, -1) if i % 4 == 0]
    assert only(vm="db-17") == [ids[17]]
    assert only(vm="web-1*", per_page="200") == [ids[i] for i in range(54, -1, -1) if str(i).startswith("1")]
    today = NOW.date().isoformat()
    assert only(since=today, until=today, per_page="200") == [
        ids[i] for i in range(54, -1, -1) if (NOW - timedelta(days=i % 5, hours=1)).date() == NOW.date()]
    assert only(policy="hourly", status="failed", requested_by="admin", per_page="5") == [
        ids[i] for i in range(54, -1, -1) if i % 2 == 0 and i % 3 == 0 and i % 4 == 0][:5]
    paged = client.get("/jobs", params={"policy": "nightly", "per_page": "10", "page": "2"}).text
    assert listed(paged) == [ids[i] for i in range(54, -1, -1) if i % 2][10:20]
    assert "policy=nightly" in paged.split('rel="next"')[0].rsplit("<a", 1)[1]  # the pager keeps the filter
    bad = client.get("/jobs", params={"since": "yesterday"})
    assert bad.status_code == 400 and 'id="f-since-error"' in bad.text and "is not a date" in bad.text
    backwards = client.get("/jobs", params={"since": today, "until": "2020-01-01"})
    assert backwards.status_code == 400 and "swap the two dates" in backwards.text
    none = client.get("/jobs", params={"vm": "no-such-vm"})
    assert listed(none.text) == [] and "No job matches these filters" in none.text

    row = re.search(rf'<tr data-job="{ids[54]}">(.*?)</tr>', first.text, re.S)
    assert row is not None
    cells = [" ".join(re.sub(r"<[^>]+>", " ", c).split()) for c in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1),
                                                                             re.S)]
    assert cells[1:3] == ["hourly", "schedule"] and cells[4] == "3 min 00 s"
    assert cells[5] == "1 / 1 of 2" and cells[6] == "10.0 MiB" and cells[7] == "2.0 MiB" and cells[8] == "failed"

    # a run of many VMs: its page shows them a page at a time, the running ones first, in SQL
    big = add_job(catalog, "big", "running", "schedule", NOW - timedelta(minutes=5),
                  [(f"vm-{i:02d}", "running" if i in (30, 40) else "failed" if i == 7 else "succeeded")
                   for i in range(45)])
    shown = client.get(f"/jobs/{big}").text
    cards = re.findall(r'<article class="card jobvm" id="jobvm-\d+" data-vm="([^"]+)"', shown)
    assert cards == ["vm-30", "vm-40", *[f"vm-{i:02d}" for i in range(18)]] and "Page 1 of 3" in shown
    assert "2 running" in shown and "42 succeeded" in shown and "1 failed" in shown and "43 of 45 VMs ended" in shown
    assert f'hx-get="/jobs/{big}/live?page=1&amp;per_page=20"' in shown  # polls the page it shows
    third = client.get(f"/jobs/{big}", params={"page": "3"}).text
    assert re.findall(r'data-vm="([^"]+)"', third) == [f"vm-{i:02d}" for i in range(39, 45) if i != 40]
    failed = client.get(f"/jobs/{big}/live", params={"status": "failed"}).text
    assert re.findall(r'data-vm="([^"]+)"', failed) == ["vm-07"]
    odd = client.get(f"/jobs/{big}", params={"status": "sleeping"})
    assert odd.status_code == 400 and 'id="vm-status-error"' in odd.text and "pick one of the list" in odd.text

    page = log_in(chromium, console_master)
    page.get_by_role("link", name="Jobs").click()
    page.get_by_label("Policy").select_option("nightly")
    page.get_by_label("VM name (* wildcard)").fill("web-5*")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r".*policy=nightly.*"))
    assert [int(n) for n in page.locator("tr[data-job]").evaluate_all("rs => rs.map(r => r.dataset.job)")] == [
        ids[53], ids[51], ids[5]]
    shoot(page, "jobs")
    page.context.close()


def test_running_job_progress_updates_live_and_polling_stops(chromium: Any, console_master: Server,
                                                            catalog: Engine) -> None:
    started = datetime.now(UTC) - timedelta(seconds=20)
    job_id = add_job(catalog, "live", "running", "admin", started, [("web-live", "running"), ("db-live", "queued")],
                     proxy="p-live", attempts=1, mode="incremental", transport="nbd", total_bytes=100 * MiB,
                     progress_bytes=10 * MiB, mode_reason="relative to checkpoint vmkeep-3")
    with Session(catalog) as session:
        web = session.query(JobVM).filter_by(job_id=job_id, vm_name="web-live").one()
        db = session.query(JobVM).filter_by(job_id=job_id, vm_name="db-live").one()
        db.proxy = db.mode = db.mode_reason = db.transport = db.progress_bytes = db.total_bytes = None
        db.attempts = 0
        web.disks = {"vda": {"size": 80 * MiB, "mode": "incremental", "bytes_read": 8 * MiB, "bytes_zero": MiB,
                             "bytes_reused": 70 * MiB, "bytes_stored": 3 * MiB, "seconds": 4.2}}
        web.warnings = ["disk vdb skipped: it is a CD-ROM"]
        session.add(JobVMLog(job_vm_id=web.id, at=started + timedelta(seconds=1), level="INFO",
                             logger="vmkeep.engine.vm", message="incremental backup (relative to checkpoint "
                                                                "vmkeep-3) over nbd, crash-consistent, 1 disks"))
        session.commit()
        web_id = web.id

    page = log_in(chromium, console_master)
    page.goto(f"{console_master.url}/jobs/{job_id}")
    card = page.locator("article[data-vm=web-live]")
    bar = card.locator("progress")
    assert bar.get_attribute("value") == "10"
    text = card.inner_text()
    assert "relative to checkpoint vmkeep-3" in text and "nbd" in text and "p-live" in text
    assert "MiB/s" in text or "KiB/s" in text  # throughput
    assert "left" in text  # an ETA
    assert "disk vdb skipped" in text and "70.0 MiB" in text  # warning, the disk's unchanged bytes
    assert "over nbd, crash-consistent" in card.locator("ol.log").inner_text()
    assert page.locator("article[data-vm=db-live]").get_by_text("waiting for a proxy").is_visible()

    with catalog.begin() as conn:  # the proxy's progress writer, while the page stays open
        conn.execute(update(JobVM).where(JobVM.id == web_id).values(progress_bytes=55 * MiB))
    expect(bar).to_have_attribute("value", "55", timeout=5000)
    assert "55.0 MiB of 100.0 MiB" in card.inner_text()
    shoot(page, "job")

    with catalog.begin() as conn:  # both VMs end; the run closes
        conn.execute(update(JobVM).where(JobVM.job_id == job_id).values(
            status="succeeded", finished=datetime.now(UTC), read_bytes=100 * MiB, duration_seconds=25.0))
        conn.execute(update(Job).where(Job.id == job_id).values(status="succeeded", finished=datetime.now(UTC)))
    live = page.locator("#job-live")
    expect(live).to_have_attribute("data-status", "succeeded", timeout=5000)
    assert live.get_attribute("hx-trigger") is None and live.get_attribute("hx-get") is None
    assert page.get_by_role("button", name="Cancel job").count() == 0
    polls: list[str] = []
    page.on("request", lambda r: "/live" in r.url and polls.append(r.url))
    page.wait_for_timeout(2500)
    assert polls == []  # the polling stopped with the job
    assert bar.get_attribute("value") == "100"
    page.context.close()


def test_cancel_through_the_page_and_the_auditor_refused(chromium: Any, console_master: Server, catalog: Engine,
                                                         console_api: httpx.Client) -> None:
    job_id = add_job(catalog, "cancel-me", "running", "schedule", datetime.now(UTC),
                     [("app-1", "waiting"), ("app-2", "waiting")])
    before = console_api.get(f"/api/jobs/{job_id}").json()

    auditor = form_login(console_master, *AUDITOR)
    shown = auditor.get(f"/jobs/{job_id}")
    assert shown.status_code == 200 and "app-1" in shown.text and "Cancel job" not in shown.text
    refused = auditor.post(f"/jobs/{job_id}/cancel", data={"csrf": csrf_of(shown.text)},
                           headers={"Origin": console_master.url})
    assert refused.status_code == 403 and "administrator or an operator" in refused.text
    admin = form_login(console_master)
    no_token = admin.post(f"/jobs/{job_id}/cancel", data={}, headers={"Origin": console_master.url})
    assert no_token.status_code == 403
    assert console_api.get(f"/api/jobs/{job_id}").json() == before  # nothing changed
    assert ("audrey", "job-cancel") not in audit_actions(console_api)

    page = log_in(chromium, console_master)
    page.goto(f"{console_master.url}/jobs/{job_id}")
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job-live")).to_have_attribute("data-status", "cancelled", timeout=5000)
    after = console_api.get(f"/api/jobs/{job_id}").json()
    assert after["status"] == "cancelled" and {v["status"] for v in after["vms"]} == {"cancelled"}
    assert audit_actions(console_api)[0] == ("admin", "job-cancel")
    assert page.get_by_role("button", name="Cancel job").count() == 0
    missing = page.goto(f"{console_master.url}/jobs/999999")
    assert missing is not None and missing.status == 404 and "pick one from the" in page.inner_text("main")
    page.context.close()


def test_the_proxy_log_handler_writes_a_backups_lines_into_the_catalog(
        console_master: Server, catalog: Engine, console_api: httpx.Client) -> None:
    registered = console_api.post("/api/proxies/register", json={"name": "p-log", "transports": ["nbd"],
                                                                 "reaches": ["*"], "concurrency": 2})
    assert registered.status_code == 200, registered.text
    as_proxy = create_engine(registered.json()["database_url"])  # the proxies' own role, as a proxy works
    sessions = sessionmaker(as_proxy)
    job_id = add_job(catalog, "logged", "running", "admin", datetime.now(UTC),
                     [("web-log", "running"), ("other-vm", "running")])
    with Session(catalog) as session:
        rows = {v.vm_name: v.id for v in session.query(JobVM).filter_by(job_id=job_id)}
    vmkeep = logging.getLogger("vmkeep")
    level = vmkeep.level
    vmkeep.setLevel(logging.INFO)  # as `vmkeep proxy` runs
    engine_log = logging.getLogger("vmkeep.engine.test")
    try:
        with catalog_log(sessions, rows["web-log"], job_id, "web-log"):
            engine_log.info("backup started (attempt %d)", 1, extra={"job": job_id, "vm": "web-log"})
            engine_log.info("connecting to qemu+ssh://root:hunter2@host/system with password=hunter2")
            engine_log.debug("a debug line stays out")
            engine_log.warning("the other VM's line", extra={"job": job_id, "vm": "other-vm"})
            for name, line in (("vmkeep-disk_0", "read by a disk worker thread"),
                               ("Thread-9 (_heartbeat)", "heartbeat to the master failed")):
                worker = threading.Thread(target=engine_log.info, args=(line,), name=name)
                worker.start()
                worker.join()
            for i in range(log_lines.MAX_LINES):
                engine_log.info("chunk %d", i)
    finally:
        vmkeep.setLevel(level)
        as_proxy.dispose()

    lines = console_api.get(f"/api/jobs/{job_id}/log").json()
    assert len(lines) == log_lines.MAX_LINES  # bounded
    messages = [line["message"] for line in lines]
    assert messages[0] == "backup started (attempt 1)" and lines[0]["vm"] == "web-log"
    assert lines[0]["level"] == "INFO" and lines[0]["logger"] == "vmkeep.engine.test"
    assert "hunter2" not in " ".join(messages) and "password=***" in messages[1]  # masked on the way in
    assert "read by a disk worker thread" in messages
    assert not [m for m in messages if "debug line" in m or "other VM" in m or "heartbeat" in m]
    assert console_api.get(f"/api/jobs/{job_id}/log", params={"vm": "other-vm"}).json() == []
    with catalog.begin() as conn:  # the database keeps at most 500 per VM, whoever writes them
        conn.execute(insert(JobVMLog), [{"job_vm_id": rows["web-log"], "at": datetime.now(UTC), "level": "INFO",
                                         "logger": "x", "message": "one too many"}] * 3)
    assert len(console_api.get(f"/api/jobs/{job_id}/log").json()) == log_lines.MAX_LINES

    env = {"VMKEEP_SERVER": console_master.url, "VMKEEP_TOKEN": console_master.login("admin", ADMIN_PASSWORD)}
    cli = fresh_cli()
    assert len(json.loads(cli.run("jobs", "log", str(job_id), "--json", env=env).stdout)) == log_lines.MAX_LINES
    shown = cli.run("jobs", "log", str(job_id), env=env).stdout.splitlines()
    assert len(shown) == log_lines.MAX_LINES and "web-log INFO vmkeep.engine.test: backup started" in shown[0]

    client = form_login(console_master)
    running = client.get(f"/jobs/{job_id}").text  # while it runs: the last lines only
    assert f"the last {RUNNING_TAIL} of {log_lines.MAX_LINES} lines" in running
    with catalog.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(status="failed", finished=datetime.now(UTC)))
    ended = client.get(f"/jobs/{job_id}").text
    assert "backup started (attempt 1)" in ended and "password=***" in ended and "hunter2" not in ended
