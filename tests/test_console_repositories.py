"""The Repositories page in Debian's chromium against a real `vmkeep server`, a real repository with
real points and a real `vmkeep proxy` that runs the maintenance: usage (dedup, compression, each
VM's unique and shared bytes), verify (intact, then a corrupted chunk named), prune (dry run, then
confirmed), GC; roles and CSRF refusals queue nothing."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Cli, fresh_cli, make_image
from tests.console_support import AUDITOR, audit_actions, csrf_of, form_login, log_in, shoot
from tests.test_catalog import backed_up
from tests.test_scale_out import start_proxy, stop, wait_for
from tests.test_server import ADMIN_PASSWORD, Server
from vmkeep.lab.images import Segment
from vmkeep.repository.backends import open_backend
from vmkeep.repository.config import Credentials
from vmkeep.repository.repo import Repository, chunk_key

PROXY_LOG: list[str] = []


@pytest.fixture(scope="module")
def stocked(console_master: Server, console_api: httpx.Client,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[Cli, str]:
    """Repository ``main`` with three points of app-1 (its policy keeps the last one) and one of
    mail-1 (no policy's retention covers it), registered through the API."""
    cli = fresh_cli()
    where = tmp_path_factory.mktemp("repos")
    repo = str(where / "main")
    disks = iter(range(100))

    def make_disk(size: int, segments: list[Segment]) -> Path:
        return make_image(where / f"disk{next(disks)}.qcow2", size, segments, "qcow2")

    cli.run("repo", "init", repo, "--encrypt")
    backed_up(cli, make_disk, repo, ["app-1", "app-1", "app-1", "mail-1"])
    assert console_api.post("/api/repositories", json={"name": "main", "location": repo,
                                                       "passphrase": cli.env["VMKEEP_PASSPHRASE"]}).status_code == 201
    assert console_api.post("/api/policies", json={"name": "apps", "repository": "main", "globs": ["app-*"],
                                                   "retention": {"last": 1}}).status_code == 201
    return cli, repo


@pytest.fixture(scope="module")
def proxy(console_master: Server, console_api: httpx.Client, stocked: Any) -> Iterator[subprocess.Popen[str]]:
    token = console_api.post("/api/tokens", json={"name": "proxy"}).json()["token"]
    running = start_proxy(console_master, token, "p1")
    assert running.stderr is not None
    # drained (a full pipe would stall the proxy at its next log line); shown when a run does not end
    drain = threading.Thread(target=lambda: PROXY_LOG.extend(running.stderr or []), daemon=True)
    drain.start()
    try:
        wait_for("the proxy", lambda: any(p["up"] for p in console_api.get("/api/proxies").json()), timeout=60)
        yield running
    finally:
        stop(running)
        drain.join(timeout=5)


def opened(cli: Cli, repo: str) -> Repository:
    return Repository.open(open_backend(repo), Credentials(cli.env["VMKEEP_PASSPHRASE"].encode()))


def finished(api: httpx.Client, run_id: int) -> dict[str, Any]:
    return wait_for(f"maintenance run {run_id}", lambda: (lambda r: r if r["finished"] else None)(
        api.get(f"/api/maintenance/{run_id}").json()), timeout=60)


def runs(api: httpx.Client) -> list[dict[str, Any]]:
    return list(api.get("/api/maintenance").json())


def done_on_page(page: Any) -> str:
    """The run page polls until its run ends; its final state."""
    ended = page.locator("#run-status[data-status=succeeded], #run-status[data-status=failed]")
    try:
        ended.wait_for(timeout=60_000)
    except Exception:
        raise AssertionError(f"{page.locator('main').inner_text()}\nproxy: {''.join(PROXY_LOG[-20:])}") from None
    return str(ended.get_attribute("data-status"))


def test_without_a_proxy_the_error_is_beside_the_button(console_master: Server, console_api: httpx.Client,
                                                        stocked: Any, chromium: Any) -> None:
    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/repositories/main")
    page.get_by_role("button", name="Verify").click()
    error = page.locator("#maintenance-error")
    assert "no proxy is up" in error.inner_text() and "vmkeep proxy" in error.inner_text()
    assert page.get_by_role("button", name="Verify").get_attribute("aria-describedby") == "maintenance-error"
    assert runs(console_api) == []  # nothing queued
    page.context.close()


def test_usage_fills_the_list_and_the_repository_page(console_master: Server, console_api: httpx.Client,
                                                      stocked: Any, proxy: Any, chromium: Any) -> None:
    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/repositories")
    row = page.locator("tr[data-repository=main]")
    assert row.locator("[data-figure=points]").inner_text() == "4"
    assert "KiB" in row.locator("[data-figure=used]").inner_text() or "MiB" in row.inner_text()
    assert "not measured yet" in row.inner_text() and "never" in row.inner_text()
    assert "Dedup ratio" in page.inner_text("main")  # what the ratios mean

    page.goto(console_master.url + "/repositories/main")
    page.get_by_role("button", name="Measure usage").click()
    page.wait_for_url("**/maintenance/*")
    assert done_on_page(page) == "succeeded"
    assert "dedup" in page.locator("#run-status").inner_text()

    page.goto(console_master.url + "/repositories/main")
    apps, mail = page.locator("tr[data-vm=app-1]"), page.locator("tr[data-vm=mail-1]")
    assert apps.locator("td").nth(1).inner_text() == "3" and mail.locator("td").nth(1).inner_text() == "1"
    assert "MiB" in apps.locator("[data-figure=unique]").inner_text()  # three different 1 MiB writes
    assert mail.locator("[data-figure=shared]").inner_text() == "0 B"
    dedup = float(page.locator("[data-figure=dedup]").inner_text().rstrip("×"))
    assert dedup >= 1.0 and float(page.locator("[data-figure=compression]").inner_text().rstrip("×")) > 0
    page.goto(console_master.url + "/repositories")
    row = page.locator("tr[data-repository=main]")
    assert row.locator("[data-figure=dedup]").inner_text() == f"{dedup:.2f}×"
    page.context.close()


def test_verify_says_intact_then_names_the_damage(console_master: Server, console_api: httpx.Client,
                                                  stocked: tuple[Cli, str], proxy: Any, chromium: Any) -> None:
    cli, repo = stocked
    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/repositories/main")
    page.get_by_role("button", name="Verify").click()
    page.wait_for_url("**/maintenance/*")
    assert done_on_page(page) == "succeeded"
    assert page.locator("[data-verdict=intact]").count() == 1 and "intact" in page.locator("#run-status").inner_text()

    r = opened(cli, repo)
    mail = r.find_point("mail-1")
    cid = next(iter(r.load_index(mail, next(iter(mail.disks))).chunk_ids()))
    chunk = Path(repo) / chunk_key(cid)
    original = chunk.read_bytes()
    chunk.write_bytes(original[:-16] + bytes(16))  # the last bytes of the chunk rot on disk
    try:
        started = console_api.post("/api/repositories/main/verify")
        assert started.status_code == 202 and started.json()["status"] == "queued"
        # the run's page polls its state (htmx) while it goes, and stops once it has ended
        html = form_login(console_master).get(f"/maintenance/{started.json()['id']}").text
        polls = f'hx-get="/maintenance/{started.json()["id"]}/status" hx-trigger="every 1s"' in html
        assert polls == ('data-status="queued"' in html or 'data-status="running"' in html), html
        report = finished(console_api, started.json()["id"])
        assert report["status"] == "succeeded" and report["result"]["ok"] is False
        assert list(report["result"]["bad_chunks"]) == [cid.hex()]
        assert list(report["result"]["broken_points"]) == [f"mail-1@{mail.point_id}"]
        page.goto(f"{console_master.url}/maintenance/{report['id']}")
        assert page.locator("[data-verdict=damaged]").count() == 1
        assert page.locator(f"[data-point='mail-1@{mail.point_id}']").count() == 1
        assert cid.hex() in page.inner_text("main")
        page.goto(console_master.url + "/repositories/main")
        assert "damaged: 1 bad chunks, 1 points broken" in page.locator("[data-outcome=verify]").inner_text()
    finally:
        chunk.write_bytes(original)
    page.context.close()
    assert ("admin", "repository-verify") in audit_actions(console_api)


def test_prune_shows_a_dry_run_then_removes_what_it_showed(console_master: Server, console_api: httpx.Client,
                                                           stocked: tuple[Cli, str], proxy: Any, chromium: Any) -> None:
    cli, repo = stocked
    points = console_api.get("/api/points", params={"vm": "app-1"}).json()
    apps = [p["point_id"] for p in sorted(points, key=lambda p: (p["created"], p["point_id"]))]  # oldest first
    assert len(apps) == 3
    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/repositories/main")
    page.get_by_role("button", name="Prune (dry run)").click()
    page.wait_for_url("**/maintenance/*")
    assert done_on_page(page) == "succeeded"
    assert page.locator("[data-figure=prune-points]").inner_text() == "2"
    assert "KiB" in page.locator("[data-figure=prune-frees]").inner_text() or "MiB" in page.inner_text("#run-status")
    listed = sorted(str(c.get_attribute("data-point")) for c in page.locator("code[data-point]").all())
    assert listed == sorted(f"app-1@{p}" for p in apps[:2])  # the two oldest; the newest stays
    assert "mail-1" in page.locator(".run-status .hint").first.inner_text()  # left alone: no retention covers it
    shoot(page, "repository-prune")
    # a dry run removes nothing: the catalog and the repository still have every point
    assert len(console_api.get("/api/points", params={"vm": "app-1"}).json()) == 3
    assert len(opened(cli, repo).list_points("app-1")) == 3

    page.get_by_role("button", name="Remove these 2 points").click()
    page.wait_for_url(lambda url: "/maintenance/" in url and not url.endswith("/confirm"))
    assert done_on_page(page) == "succeeded"
    assert "removed 2 points" in page.locator("#run-status").inner_text()
    assert [p["point_id"] for p in console_api.get("/api/points", params={"vm": "app-1"}).json()] == [apps[2]]
    assert [m.point_id for m in opened(cli, repo).list_points("app-1")] == [apps[2]]
    assert len(opened(cli, repo).list_points("mail-1")) == 1
    page.context.close()
    confirmed = runs(console_api)[0]
    assert confirmed["params"]["dry_run"] is False
    assert sorted(confirmed["params"]["confirm"]["app-1"]) == sorted(apps[:2])


def test_gc_frees_the_bytes_prune_left(console_master: Server, console_api: httpx.Client, proxy: Any,
                                      chromium: Any) -> None:
    used = console_api.get("/api/repositories").json()[0]["used_bytes"]
    started = console_api.post("/api/repositories/main/gc")
    assert started.status_code == 202
    report = finished(console_api, started.json()["id"])
    assert report["status"] == "succeeded" and report["result"]["bytes_freed"] > 0
    assert console_api.get("/api/repositories").json()[0]["used_bytes"] == used - report["result"]["bytes_freed"]
    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/repositories")
    assert "freed" in page.locator("tr[data-repository=main]").inner_text()
    shoot(page, "repositories")
    page.goto(console_master.url + "/repositories/main")
    assert "freed" in page.locator("[data-outcome=gc]").inner_text()
    assert f"run {report['id']}" in page.locator("[data-outdated]").inner_text()  # the usage figures predate it
    shoot(page, "repository")
    page.context.close()


def test_a_run_waiting_on_a_proxy_that_went_down_moves_to_a_live_one(console_master: Server,
                                                                      console_api: httpx.Client, proxy: Any) -> None:
    """A proxy that registered and fell silent (no worker ever takes its queue): its run moves."""
    assert console_api.post("/api/proxies/register", json={"name": "a-ghost", "transports": ["nbd"],
                                                           "reaches": ["*"], "concurrency": 1}).status_code == 200
    started = console_api.post("/api/repositories/main/usage").json()
    assert started["proxy"] == "a-ghost"  # the least loaded, first by name
    report = finished(console_api, started["id"])  # once a-ghost's heartbeat is 10 s old
    assert report["status"] == "succeeded" and report["proxy"] == "p1" and report["attempts"] == 1


def test_the_cli_runs_maintenance_through_the_server(console_master: Server, stocked: tuple[Cli, str], proxy: Any,
                                                     tmp_path: Path) -> None:
    cli = stocked[0]
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "VMKEEP_SERVER": console_master.url}
    cli.run("login", "admin", env={**env, "VMKEEP_PASSWORD": ADMIN_PASSWORD})
    verified = cli.json("repository", "verify", "main", env=env)
    assert verified["status"] == "succeeded" and verified["result"]["ok"] is True
    said = cli.run("repository", "prune", "main", env=env).stdout
    assert "app-1: keep 1, would remove 0" in said and "mail-1" in said  # the earlier prune left the newest
    api = httpx.Client(base_url=console_master.url, timeout=30,
                       headers={"Authorization": f"Bearer {console_master.login('admin', ADMIN_PASSWORD)}"})
    dry = api.post("/api/repositories/main/prune")  # no body: a dry run
    assert dry.status_code == 202 and dry.json()["params"]["dry_run"] is True
    assert finished(api, dry.json()["id"])["result"]["points_removed"] == 0


def test_an_auditor_sees_but_cannot_run(console_master: Server, console_api: httpx.Client, proxy: Any,
                                        chromium: Any) -> None:
    page = log_in(chromium, console_master, *AUDITOR)
    page.goto(console_master.url + "/repositories/main")
    assert page.locator("tr[data-vm=app-1]").count() == 1  # sees the figures
    assert page.locator(".maintenance-actions button").count() == 0
    page.context.close()

    before, trail = runs(console_api), audit_actions(console_api)
    auditor = form_login(console_master, *AUDITOR)
    csrf = csrf_of(auditor.get("/repositories/main").text)
    refused = [auditor.post(f"/repositories/main/{kind}", data={"csrf": csrf}, headers={"Origin": console_master.url})
               for kind in ("verify", "prune", "gc")]
    dry_run = next(r["id"] for r in before if r["kind"] == "prune" and r["params"]["dry_run"])
    refused.append(auditor.post(f"/maintenance/{dry_run}/confirm", data={"csrf": csrf},
                                headers={"Origin": console_master.url}))
    refused.append(auditor.post("/repositories/main/remove", data={"csrf": csrf, "understood": "yes"},
                                headers={"Origin": console_master.url}))
    assert [r.status_code for r in refused] == [403] * 5 and "administrator or operator" in refused[0].text
    api = console_master.client(console_master.login(*AUDITOR))
    kinds = ("verify", "prune", "gc")
    assert [api.post(f"/api/repositories/main/{k}", json={}).status_code for k in kinds] == [403] * 3
    admin = form_login(console_master)
    no_token = admin.post("/repositories/main/verify", data={}, headers={"Origin": console_master.url})
    assert no_token.status_code == 403
    assert runs(console_api) == before  # nothing queued
    assert [a for a in audit_actions(console_api) if a[1].startswith("repository-")] == \
        [a for a in trail if a[1].startswith("repository-")]


def test_removing_the_registration_keeps_the_apis_refusals(console_master: Server, console_api: httpx.Client,
                                                           chromium: Any) -> None:
    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/repositories/main")
    remove = page.get_by_role("button", name="Remove main")
    remove.click()  # not confirmed
    assert "Tick the box" in page.locator("#remove-error").inner_text()
    page.get_by_label("I understand").check()
    page.get_by_role("button", name="Remove main").click()
    assert "policies apps back up into it" in page.locator("#remove-error").inner_text()  # the API's refusal
    assert [r["name"] for r in console_api.get("/api/repositories").json()] == ["main"]
    assert console_api.delete("/api/policies/apps").status_code == 204
    page.get_by_label("I understand").check()
    page.get_by_role("button", name="Remove main").click()
    page.wait_for_url(console_master.url + "/repositories")
    assert "No repository yet" in page.inner_text("main")
    assert console_api.get("/api/repositories").json() == []
    assert {r["repository"] for r in runs(console_api)} == {"main"}  # the history stays, by name
    page.goto(console_master.url + "/maintenance")
    assert page.locator("tr[data-run]").count() == len(runs(console_api))
    page.context.close()
    assert ("admin", "repository-delete") in audit_actions(console_api)
