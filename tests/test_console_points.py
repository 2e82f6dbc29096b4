"""The console's restore pages in Debian's chromium against a real `vmkeep server`: the VMs that
have restore points (from a real repository registered through the API), a VM's timeline, the
restore wizard (whole VM as new or over the original) creating the API's restore jobs, its errors
beside the fields, roles, and a restore's live progress. No proxy runs: the restores stay queued
(the lead's end-to-end test runs one)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session

from tests.conftest import MiB, fresh_cli
from tests.console_support import AUDITOR, audit_actions, csrf_of, form_login, log_in, shoot
from tests.test_catalog import backed_up
from tests.test_scale_out import start_proxy, stop, wait_for
from tests.test_server import Server
from vmkeep.catalog.models import Hypervisor, Job, JobVM, Proxy, RepositoryRecord, RestoreJob, RestorePointRecord
from vmkeep.catalog.models import VirtualMachine as VM
from vmkeep.errors import UsageError
from vmkeep.lab.images import make_image
from vmkeep.progress import NoProgress
from vmkeep.proxy.restore_task import restore_disk_file
from vmkeep.repository.backends import open_backend
from vmkeep.repository.config import Credentials
from vmkeep.repository.repo import Repository
from vmkeep.server.console.render import ibytes

GiB = 1024 * MiB
RITA = ("rita", "rita-password-1")  # restore-only
LOCATION = "/srv/restores"


@dataclass
class Catalog:
    """What the module's catalog holds besides the real repository's points."""

    web_points: list[str]  # web-1's two VM points, oldest first
    folder: Path  # the disk images backed up: disk0-2 are app-1's points, disk3 mail-1's
    passphrase: str  # of the repository in folder/repo


@contextmanager
def _sql(master: Server) -> Iterator[Session]:
    """A session on the master's catalog, for what no API does here (discovery, a proxy's progress)."""
    engine = create_engine(master.database)
    try:
        with Session(engine) as session:
            yield session
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def catalog(console_master: Server, console_api: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """A real repository (disk-image points of app-1 and mail-1) registered through the API; a
    hypervisor with VM web-1 and web-1's VM points, as discovery and a policy run would leave them
    (no lab VM here); a proxy on web-1's host; a restore location; a restore-only user."""
    folder = tmp_path_factory.mktemp("points")
    cli = fresh_cli()
    repo = str(folder / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    disks = iter(range(100))
    backed_up(cli, lambda size, segments: make_image(folder / f"disk{next(disks)}.qcow2", size, segments),
              repo, ["app-1", "app-1", "app-1", "mail-1"])
    assert console_api.post("/api/repositories", json={"name": "main", "location": repo,
                                                       "passphrase": cli.env["VMKEEP_PASSPHRASE"]}).status_code == 201
    now = datetime.now(UTC)
    with _sql(console_master) as session:
        # discovered just now, so the master's schedule does not try to reach this made-up host
        lab = Hypervisor(name="lab", kind="libvirt", uri="qemu+tls://node-1/system", discovered_at=now)
        session.add_all([lab, Hypervisor(name="spare", kind="libvirt", uri="qemu+tls://node-9/system",
                                         discovered_at=now)])
        session.flush()
        session.add(VM(hypervisor_id=lab.id, name="web-1", uuid="u-web-1", host="node-1", state="shutoff",
                       disks=[{"name": "vda", "size": 40 * GiB}], tags=[], present=True))
        main = session.scalar(select(RepositoryRecord).where(RepositoryRecord.name == "main"))
        assert main is not None
        ids = ["20260101T000000-full0001", "20260102T000000-incr0002"]
        for i, (point, mode, stored) in enumerate(zip(ids, ["full", "incremental"], [12 * GiB, 512 * MiB],
                                                      strict=True)):
            session.add(RestorePointRecord(
                repository_id=main.id, name="web-1", point_id=point, parent=ids[0] if i else None,
                created=now - timedelta(days=2 - i), kind="vm", mode=mode, transport="nbd",
                consistency="application" if i else "crash", logical_bytes=40 * GiB, read_bytes=stored,
                stored_bytes=stored, duration_seconds=60.0, disks={"vda": 40 * GiB}, wire="tls"))
        job = Job(policy_name="nightly", requested_by="schedule", status="succeeded", started=now, finished=now)
        job.vms = [JobVM(vm_name="web-1", status="succeeded", point_id=ids[0], verified=True),
                   JobVM(vm_name="web-1", status="succeeded", point_id=ids[1], verified=True,
                         boot_check={"passed": False, "reason": "no login prompt in 300 s"})]
        session.add(job)
        session.commit()
    assert console_api.post("/api/proxies/register", json={"name": "p1", "transports": ["nbd"], "reaches": ["node-1"],
                                                           "concurrency": 2}).status_code == 200
    assert console_api.put("/api/hypervisors/lab/restore-locations",
                           json={"locations": [LOCATION]}).status_code == 200
    assert console_api.post("/api/users", json={"name": RITA[0], "password": RITA[1],
                                                "role": "restore-only"}).status_code == 201
    return Catalog(ids, folder, cli.env["VMKEEP_PASSPHRASE"])


def proxy_alive(api: httpx.Client) -> None:
    """The proxy's heartbeat (it is up for ten seconds): the restore has somewhere to go."""
    assert api.post("/api/proxies/p1/heartbeat").status_code == 204


def restores(api: httpx.Client) -> list[dict[str, Any]]:
    reply = api.get("/api/restores")
    assert reply.status_code == 200
    return list(reply.json())


def wizard_post(client: httpx.Client, master: Server, vm: str, point: str, **fields: str) -> httpx.Response:
    """The wizard's form as its page posts it (CSRF token from the page, same origin)."""
    page = client.get(f"/points/vm/{vm}/restore", params={"point": point})
    assert page.status_code == 200, page.text
    return client.post(f"/points/vm/{vm}/restore", headers={"Origin": master.url},
                       data={"csrf": csrf_of(page.text), "point": point, "hypervisor": "lab", **fields})


def error_text(html: str, field: str) -> str:
    found = re.search(rf'<p id="{field}-error" class="error" role="alert">([^<]*)</p>', html)
    assert found, f"no error beside {field}"
    return found.group(1)


def test_points_list_and_timeline_show_the_real_points(chromium: Any, console_master: Server,
                                                       console_api: httpx.Client, catalog: Catalog) -> None:
    api_points = console_api.get("/api/points", params={"vm": "app-1"}).json()
    assert len(api_points) == 3
    with _sql(console_master) as session:
        found = session.execute(select(RestorePointRecord.point_id, RestorePointRecord.id))
        rows_of = {row.point_id: row.id for row in found}
    page = log_in(chromium, console_master)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Restore").click()
    page.wait_for_url(console_master.url + "/points")
    rows = page.locator("table.points-list tbody tr")
    assert [r.get_attribute("data-name") for r in rows.all()] == ["app-1", "mail-1", "web-1"]
    app = page.locator("tr[data-name=app-1] td").all_inner_texts()
    assert app[1] == "3" and app[3] == "main" and app[4] == "disk image"
    newest = max(datetime.fromisoformat(p["created"]) for p in api_points)
    shown = page.locator("tr[data-name=app-1] time").get_attribute("datetime")
    assert shown and abs(datetime.fromisoformat(shown) - newest) < timedelta(seconds=1)
    assert page.locator("tr[data-name=web-1] td").all_inner_texts()[4] == "VM"
    shoot(page, "points")

    page.get_by_label("VM name contains").fill("MAIL")  # any case
    page.get_by_role("button", name="Search").click()
    assert [r.get_attribute("data-name") for r in rows.all()] == ["mail-1"]
    page.get_by_label("VM name contains").fill("nothing-like-it")
    page.get_by_role("button", name="Search").click()
    assert "No VM whose name contains" in page.inner_text("main")

    page.goto(console_master.url + "/points")
    page.get_by_role("link", name="app-1").click()
    page.wait_for_url(console_master.url + "/points/vm/app-1")
    for p in api_points:  # newest first, as the API lists them
        cells = page.locator(f"tr[data-point='{p['point_id']}']")
        assert cells.locator("[data-cell=size]").inner_text() == ibytes(p["logical_bytes"]) == "8.0 MiB"
        assert cells.locator("[data-cell=stored]").inner_text() == ibytes(p["stored_bytes"])
        assert cells.locator("[data-cell=mode]").inner_text() == f"{p['mode'] or 'full'} (disk image)"
        files = cells.get_by_role("link", name="Files").get_attribute("href")  # the catalog row's number
        assert files == f"/points/{rows_of[p['point_id']]}/files"
        assert cells.get_by_role("link", name="Restore…").count() == 1  # its disk, to a file
    assert page.locator("table.timeline tbody tr").evaluate_all("rs => rs.map(r => r.dataset.point)") == [
        p["point_id"] for p in api_points]

    page.goto(console_master.url + "/points/vm/web-1")
    newest_web = page.locator(f"tr[data-point='{catalog.web_points[1]}'] td").all_inner_texts()
    assert newest_web[1:5] == ["incremental", "application", "40.0 GiB", "512.0 MiB"]
    assert newest_web[7:9] == ["verified", "failed"]  # the boot check of its backup failed
    oldest_web = page.locator(f"tr[data-point='{catalog.web_points[0]}'] td").all_inner_texts()
    assert oldest_web[1:5] == ["full", "crash", "40.0 GiB", "12.0 GiB"] and oldest_web[8] == "—"
    shoot(page, "point-timeline")
    page.context.close()


def test_the_wizard_restores_a_vm_as_a_new_one(chromium: Any, console_master: Server, console_api: httpx.Client,
                                               catalog: Catalog) -> None:
    before = len(restores(console_api))
    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/points/vm/web-1")
    page.locator(f"tr[data-point='{catalog.web_points[0]}']").get_by_role("link", name="Restore…").click()
    page.wait_for_url(re.compile(r"/points/vm/web-1/restore\?point="))
    assert page.get_by_label("Hypervisor").input_value() == "lab"  # where web-1 lives
    hint = page.locator("#storage-hint")
    assert LOCATION in hint.inner_text()
    page.get_by_label("Hypervisor").select_option("spare")  # its own locations come in (htmx)
    hint.filter(has_text="spare has no restore location yet").wait_for(timeout=5000)
    page.get_by_label("Hypervisor").select_option("lab")
    hint.filter(has_text=f"Restores to lab may write inside: {LOCATION}").wait_for(timeout=5000)
    assert page.get_by_label("Type the VM's name, web-1, to confirm").is_hidden()  # only for an overwrite
    page.get_by_label("Name of the new VM").fill("web-1-copy")
    page.get_by_label("Storage (where its disks go)").fill(LOCATION + "/web-1-copy")
    page.get_by_label("Start the VM after the restore").uncheck()
    shoot(page, "restore-wizard")
    proxy_alive(console_api)
    page.get_by_role("button", name="Start the restore").click()
    page.wait_for_url(re.compile(r"/restores/\d+$"))
    made = restores(console_api)
    assert len(made) == before + 1
    job = made[0]
    assert (job["vm"], job["point"], job["mode"], job["new_name"], job["hypervisor"], job["proxy"], job["status"]) == (
        "web-1", catalog.web_points[0], "as-new", "web-1-copy", "lab", "p1", "queued")
    assert page.url.endswith(f"/restores/{job['id']}")
    with _sql(console_master) as session:
        row = session.get(RestoreJob, job["id"])
        assert row is not None and row.storage == LOCATION + "/web-1-copy" and row.start_vm is False
    assert page.locator("[data-fact=storage]").inner_text() == LOCATION + "/web-1-copy"
    assert page.locator("[data-fact=status]").inner_text() == "queued"
    assert ("admin", "restore-start") in audit_actions(console_api)  # audited like the API's
    page.goto(console_master.url + "/restores")
    assert page.locator(f"tr[data-restore='{job['id']}']").get_by_role("link").inner_text() == f"#{job['id']}"
    page.context.close()


def test_wizard_errors_appear_beside_the_field_and_create_nothing(chromium: Any, console_master: Server,
                                                                  console_api: httpx.Client, catalog: Catalog) -> None:
    before = restores(console_api)
    page = log_in(chromium, console_master)
    page.goto(f"{console_master.url}/points/vm/web-1/restore?point={catalog.web_points[1]}")
    name, storage = page.get_by_label("Name of the new VM"), page.get_by_label("Storage (where its disks go)")
    submit = page.get_by_role("button", name="Start the restore")
    proxy_alive(console_api)
    for new_name, where, field, words in [
        ("web-2", "/etc", "storage", "restore locations (/srv/restores)"),
        ("bad name!", "", "as_name", "A VM name is 1 to 100 letters"),
        ("web-1", "", "as_name", "lab already has a VM web-1"),  # the name is taken
        ("", "", "as_name", "Enter the new VM's name"),
    ]:
        name.fill(new_name)
        storage.fill(where)
        submit.click()
        error = page.locator(f"#{field}-error")
        assert words in error.inner_text(), (field, error.inner_text())
        assert page.locator(f"#{field}").get_attribute("aria-describedby") == f"{field}-error"
        assert name.input_value() == new_name  # the form keeps what was typed
    with _sql(console_master) as session:  # no proxy is up: said beside the hypervisor
        session.execute(update(Proxy).values(last_heartbeat=datetime.now(UTC) - timedelta(minutes=5)))
        session.commit()
    name.fill("web-3")
    submit.click()
    assert "no proxy is up on a host of lab" in page.locator("#hypervisor-error").inner_text()
    assert restores(console_api) == before
    page.context.close()

    client = form_login(console_master)  # a disk image's point cannot become a VM
    app_point = console_api.get("/api/points", params={"vm": "app-1"}).json()[0]["point_id"]
    refused = wizard_post(client, console_master, "app-1", app_point, mode="as-new", as_name="app-copy")
    assert refused.status_code == 422 and "vmkeep disk restore" in error_text(refused.text, "point")
    assert restores(console_api) == before


def test_overwrite_needs_the_name_typed_and_an_operator(chromium: Any, console_master: Server,
                                                        console_api: httpx.Client, catalog: Catalog) -> None:
    before = restores(console_api)
    rita = form_login(console_master, *RITA)
    wizard = rita.get("/points/vm/web-1/restore", params={"point": catalog.web_points[1]}).text
    assert 'id="mode-overwrite"' not in wizard and 'id="mode-new"' in wizard  # not offered
    proxy_alive(console_api)
    refused = wizard_post(rita, console_master, "web-1", catalog.web_points[1], mode="overwrite", confirm="web-1")
    assert refused.status_code == 403 and "restores as a new VM only" in error_text(refused.text, "mode")
    assert restores(console_api) == before

    page = log_in(chromium, console_master)
    page.goto(f"{console_master.url}/points/vm/web-1/restore?point={catalog.web_points[1]}")
    page.get_by_label("The whole VM over the original").check()
    assert page.get_by_label("Name of the new VM").is_hidden()
    assert "everything written to the VM since" in page.get_by_role("note").inner_text()
    confirm = page.get_by_label("Type the VM's name, web-1, to confirm")
    confirm.fill("web-")
    proxy_alive(console_api)
    page.get_by_role("button", name="Start the restore").click()
    assert "Type the VM's name, web-1" in page.locator("#confirm-error").inner_text()
    assert restores(console_api) == before
    assert page.get_by_label("The whole VM over the original").is_checked()  # still the overwrite form
    page.get_by_label("Type the VM's name, web-1, to confirm").fill("web-1")
    proxy_alive(console_api)
    page.get_by_role("button", name="Start the restore").click()
    page.wait_for_url(re.compile(r"/restores/\d+$"))
    job = restores(console_api)[0]
    assert (job["vm"], job["point"], job["mode"], job["new_name"]) == ("web-1", catalog.web_points[1], "overwrite",
                                                                      None)
    page.context.close()


def test_an_auditor_sees_points_but_cannot_restore(chromium: Any, console_master: Server,
                                                   console_api: httpx.Client, catalog: Catalog) -> None:
    before = restores(console_api)
    page = log_in(chromium, console_master, *AUDITOR)
    page.goto(console_master.url + "/points/vm/web-1")
    assert page.locator("table.timeline tbody tr").count() == 2
    assert page.get_by_role("link", name="Restore…").count() == 0
    page.context.close()
    auditor = form_login(console_master, *AUDITOR)
    assert auditor.get("/points/vm/web-1/restore", params={"point": catalog.web_points[0]}).status_code == 403
    csrf = csrf_of(auditor.get("/points").text)
    proxy_alive(console_api)
    trail = audit_actions(console_api)
    posted = auditor.post("/points/vm/web-1/restore", headers={"Origin": console_master.url},
                          data={"csrf": csrf, "point": catalog.web_points[0], "hypervisor": "lab", "mode": "as-new",
                                "as_name": "audrey-copy"})
    assert posted.status_code == 403 and "cannot restore" in posted.text
    assert restores(console_api) == before and audit_actions(console_api) == trail

    admin = form_login(console_master)  # an administrator's post without the token, or from elsewhere
    fields = {"point": catalog.web_points[0], "hypervisor": "lab", "mode": "as-new", "as_name": "forged-copy"}
    forged = [admin.post("/points/vm/web-1/restore", headers={"Origin": console_master.url}, data=fields),
              admin.post("/points/vm/web-1/restore", headers={"Origin": "http://evil.example"},
                         data={**fields, "csrf": csrf_of(admin.get("/points").text)})]
    assert [r.status_code for r in forged] == [403, 403]
    assert restores(console_api) == before


def test_lists_page_in_sql(console_master: Server, console_api: httpx.Client, catalog: Catalog) -> None:
    now = datetime.now(UTC)
    with _sql(console_master) as session:
        main = session.scalar(select(RepositoryRecord.id).where(RepositoryRecord.name == "main"))
        assert main is not None
        session.add_all(RestorePointRecord(repository_id=main, name=f"bulk-{i:03d}", point_id=f"b{i:03d}-{j:03d}",
                                           created=now - timedelta(hours=j), kind="vm", mode="incremental",
                                           logical_bytes=GiB, stored_bytes=MiB, disks={"vda": GiB})
                        for i in range(55) for j in range(60 if i == 0 else 1))
        session.commit()
    client = form_login(console_master)

    def names(html: str) -> list[str]:
        return re.findall(r'<tr data-name="([^"]+)">', html)

    first, second = client.get("/points", params={"q": "bulk"}).text, client.get("/points?q=bulk&page=2").text
    assert names(first) == [f"bulk-{i:03d}" for i in range(50)] and "Page 1 of 2 (55 in all)" in first
    assert names(second) == [f"bulk-{i:03d}" for i in range(50, 55)] and 'href="?q=bulk&amp;page=1"' in second
    assert names(client.get("/points?page=2").text)[-1] == "web-1"  # 58 names in all
    assert names(client.get("/points", params={"per_page": 2}).text) == ["app-1", "bulk-000"]
    past = client.get("/points?page=3").text
    assert names(past) == [] and "(58 in all)" in past  # past the end: counted still

    def points(html: str) -> list[str]:
        return re.findall(r'<tr data-point="([^"]+)">', html)

    timeline = client.get("/points/vm/bulk-000").text
    assert points(timeline) == [f"b000-{j:03d}" for j in range(50)]  # newest first
    assert points(client.get("/points/vm/bulk-000?page=2").text) == [f"b000-{j:03d}" for j in range(50, 60)]
    assert client.get("/points/vm/nothing-here").status_code == 404

    for i in range(3):  # restores page too
        with _sql(console_master) as session:
            session.add(RestoreJob(requested_by="admin", vm_name="web-1", point_id=catalog.web_points[0],
                                   repository_name="main", hypervisor_name="lab", mode="as-new",
                                   new_name=f"paged-{i}", status="failed", warnings=[]))
            session.commit()
    total = len(restores(console_api))
    listed = client.get("/restores", params={"per_page": 2, "page": 2}).text
    assert re.findall(r'<tr data-restore="(\d+)">', listed) == [str(r["id"]) for r in restores(console_api)[2:4]]
    assert f"({total} in all)" in listed


def test_a_restore_page_shows_its_progress_live(chromium: Any, console_master: Server, console_api: httpx.Client,
                                                catalog: Catalog) -> None:
    proxy_alive(console_api)
    started = console_api.post("/api/restores", json={"vm": "web-1", "point": catalog.web_points[1],
                                                      "hypervisor": "lab", "as_name": "web-1-live",
                                                      "storage": LOCATION, "start": True})
    assert started.status_code == 202, started.text
    restore_id = started.json()["id"]
    page = log_in(chromium, console_master, *AUDITOR)  # anyone who reads may watch
    page.goto(f"{console_master.url}/restores/{restore_id}")
    assert page.locator("[data-fact=proxy]").inner_text() == "p1"

    def write(**values: Any) -> None:
        with _sql(console_master) as session:
            session.execute(update(RestoreJob).where(RestoreJob.id == restore_id).values(**values))
            session.commit()

    write(status="running", attempts=1, total_bytes=40 * GiB, progress_bytes=4 * GiB)
    percent = page.locator("[data-fact=percent]")
    percent.filter(has_text="10 %").wait_for(timeout=5000)
    assert page.locator("[data-fact=bytes]").inner_text() == "4.0 GiB of 40.0 GiB written"
    write(progress_bytes=24 * GiB)
    percent.filter(has_text="60 %").wait_for(timeout=5000)
    page.locator("[data-fact=rate]").filter(has_text="/s").wait_for(timeout=5000)  # bytes per second, and a time left
    assert re.fullmatch(r"\d+( min \d+)? s|\d+ h \d+ min", page.locator("[data-fact=eta]").inner_text())
    shoot(page, "restore")
    write(status="succeeded", progress_bytes=40 * GiB, finished=datetime.now(UTC),
          disks={"vda": f"{LOCATION}/web-1-live-vda.qcow2"}, warnings=["the VM's network was left unplugged"])
    page.locator("[data-fact=status]").filter(has_text="succeeded").wait_for(timeout=5000)
    assert f"{LOCATION}/web-1-live-vda.qcow2" in page.locator(".disks").inner_text()
    assert "left unplugged" in page.locator(".warnings").inner_text()
    assert page.locator("#restore-progress").get_attribute("hx-trigger") is None
    polls: list[str] = []
    page.on("request", lambda r: polls.extend([r.url] if "/progress" in r.url else []))
    page.wait_for_timeout(2500)
    assert polls == []  # the polling stopped
    page.context.close()


def test_the_wizard_restores_one_disk_to_a_file_with_a_real_proxy(chromium: Any, console_master: Server,
                                                                   console_api: httpx.Client, catalog: Catalog,
                                                                   tmp_path: Path) -> None:
    """A disk-image point's disk written to a file by a real proxy on the hypervisor's host: the
    same disk as the image backed up; wrong fields are refused beside them, an existing file is
    not overwritten."""
    with _sql(console_master) as session:  # a hypervisor whose host runs the proxy below
        files = Hypervisor(name="files", kind="libvirt", uri="qemu+tls://node-5/system",
                           discovered_at=datetime.now(UTC))
        session.add(files)
        session.flush()
        session.add(VM(hypervisor_id=files.id, name="db-5", uuid="u-db-5", host="node-5", state="running",
                       disks=[], tags=[], present=True))
        session.commit()
    assert console_api.put("/api/hypervisors/files/restore-locations",
                           json={"locations": [str(tmp_path)]}).status_code == 200
    mail = console_api.get("/api/points", params={"vm": "mail-1"}).json()[0]["point_id"]
    base = {"vm": "mail-1", "point": mail, "hypervisor": "files", "mode": "disk-file", "disk": "disk",
            "storage": str(tmp_path / "out"), "file": "mail-1.qcow2"}
    before = restores(console_api)
    no_proxy = console_api.post("/api/restores", json=base)  # p1 is on node-1 only
    assert no_proxy.status_code == 409 and "cannot write a file" in no_proxy.json()["detail"]
    for change, status, words in [({"file": "../mail.qcow2"}, 422, "pattern"), ({"file": "a..b"}, 400, "'..'"),
                                  ({"disk": "vdz"}, 404, "has no disk vdz (it has: disk)"),
                                  ({"storage": "/etc"}, 403, "restore locations"), ({"format": "vmdk"}, 422, "")]:
        refused = console_api.post("/api/restores", json={**base, **change})
        assert refused.status_code == status and words in refused.text, (change, refused.text)
    assert restores(console_api) == before

    token = console_api.post("/api/tokens", json={"name": "file-proxy"}).json()["token"]
    proxy = start_proxy(console_master, token, "pf", reaches="node-5")
    try:
        wait_for("proxy pf up", lambda: any(p["name"] == "pf" and p["up"]
                                            for p in console_api.get("/api/proxies").json()), timeout=60)
        page = log_in(chromium, console_master)
        page.goto(console_master.url + "/points/vm/mail-1")
        page.get_by_role("link", name="Restore…").click()
        page.wait_for_url(re.compile(r"/points/vm/mail-1/restore\?point="))
        assert page.get_by_label("One disk to an image file").is_checked()  # an image: no VM
        assert page.get_by_label("The whole VM as a new VM (the original stays as it is)").count() == 0
        assert page.get_by_label("Name of the new VM").is_hidden()
        page.get_by_label("Hypervisor").select_option("files")
        page.locator("#storage-hint").filter(has_text=str(tmp_path)).wait_for(timeout=5000)
        directory, name = page.get_by_label("Directory on the host (inside a restore location)"), page.get_by_label(
            "File name")
        submit = page.get_by_role("button", name="Start the restore")
        directory.fill(str(tmp_path / "out"))
        name.fill("mail-1.qcow2")
        shoot(page, "restore-wizard-disk-file")
        for where, file, field, words in [("/var/tmp", "m.qcow2", "directory", "restore locations"),
                                          (str(tmp_path), "sub/m.qcow2", "file", "no '/'"),
                                          ("", "m.qcow2", "directory", "Enter the directory")]:
            directory.fill(where)
            name.fill(file)
            submit.click()
            assert words in page.locator(f"#{field}-error").inner_text(), (field, words)
            assert page.get_by_label("One disk to an image file").is_checked()
        assert restores(console_api) == before
        directory.fill(str(tmp_path / "out"))
        name.fill("mail-1.qcow2")
        page.get_by_label("Format").select_option("qcow2")
        submit.click()
        page.wait_for_url(re.compile(r"/restores/\d+$"))
        page.locator("[data-fact=status]").filter(has_text="succeeded").wait_for(timeout=60000)
        assert page.locator("[data-fact=file]").inner_text() == f"{tmp_path}/out/mail-1.qcow2 (qcow2)"
        shoot(page, "restore-disk-file")
        job = restores(console_api)[0]
        written = tmp_path / "out" / "mail-1.qcow2"
        assert (job["mode"], job["disk"], job["format"], job["new_name"], job["proxy"], job["disks"]) == (
            "disk-file", "disk", "qcow2", "mail-1.qcow2", "pf", {"disk": str(written)})
        assert job["progress_bytes"] == job["total_bytes"] and job["total_bytes"] > 0
        compared = subprocess.run(["qemu-img", "compare", str(written), str(catalog.folder / "disk3.qcow2")],
                                  capture_output=True, text=True)
        assert compared.returncode == 0, compared.stdout + compared.stderr
        entry = console_api.get("/api/audit", params={"action": "restore-start"}).json()[0]
        assert entry["detail"]["mode"] == "disk-file" and entry["detail"]["file"] == str(written)

        # the same file again (raw this time): the proxy refuses to overwrite it and leaves it as it was
        again = console_api.post("/api/restores", json={**base, "format": "raw"})
        assert again.status_code == 202, again.text
        failed = wait_for("the second restore to fail", lambda: (r := console_api.get(
            f"/api/restores/{again.json()['id']}").json())["status"] == "failed" and r, timeout=60)
        assert "already exists" in failed["error"]
        assert subprocess.run(["qemu-img", "compare", str(written), str(catalog.folder / "disk3.qcow2")],
                              capture_output=True).returncode == 0
        page.context.close()
    finally:
        stop(proxy)


def test_a_retried_disk_file_restore_replaces_its_partial_file(catalog: Catalog, tmp_path: Path) -> None:
    """The proxy's disk-file step: a second attempt (its proxy died during the first) removes the
    partial file the first left and writes the disk; a first attempt never overwrites a file."""
    repo = Repository.open(open_backend(str(catalog.folder / "repo")), Credentials(catalog.passphrase.encode()))
    mail = repo.find_point("mail-1")
    partial = tmp_path / "mail.raw"
    partial.write_bytes(b"half a disk")
    job = RestoreJob(id=1, vm_name="mail-1", point_id=mail.point_id, mode="disk-file", storage=str(tmp_path),
                     new_name="mail.raw", disk="disk", format="raw", attempts=1)
    with pytest.raises(UsageError, match="already exists"):
        restore_disk_file(repo, job, NoProgress())
    assert partial.read_bytes() == b"half a disk"  # not ours: left alone
    job.attempts = 2
    assert restore_disk_file(repo, job, NoProgress()) == (str(partial), {"disk": str(partial)})
    same = subprocess.run(["qemu-img", "compare", "-f", "raw", str(partial), str(catalog.folder / "disk3.qcow2")],
                          capture_output=True, text=True)
    assert same.returncode == 0, same.stdout + same.stderr
