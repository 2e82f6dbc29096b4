"""The console's policies pages in Debian's chromium against a real `vmkeep server` on PostgreSQL:
create a policy through the form with the live preview of the VMs its rules pick and the next
runs of its schedule, edit it, errors beside their fields (nothing stored), run now, delete; an
auditor reads but changes nothing; posts without the CSRF token or from another site are refused."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from tests.conftest import fresh_cli
from tests.console_support import AUDITOR, BROWSER_ZONE, audit_actions, csrf_of, form_login, log_in, shoot
from tests.test_server import Server
from vmkeep.catalog.models import Hypervisor, Job, Policy, VirtualMachine
from vmkeep.server.console.policy_form import preview
from vmkeep.server.dispatch import select_vms
from vmkeep.server.schedule import next_run

# name, host, tags, folder, present
CATALOG = [("app-1", "kvm-1", ["prod"], "prod/shop", True), ("app-2", "kvm-1", ["prod"], "prod/shop", True),
           ("app-3", "kvm-2", ["test"], "prod/lab", True), ("app-old", "kvm-1", ["prod"], "prod/shop", False),
           ("web-1", "kvm-1", ["prod"], "dev", True), ("db-1", "kvm-1", ["prod"], "prod/db", True)]


@pytest.fixture(scope="module")
def catalog(console_master: Server, console_api: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A registered repository and a hypervisor's VMs in the catalog (no lab needed to select them)."""
    cli = fresh_cli()
    repo = str(tmp_path_factory.mktemp("policies") / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    reply = console_api.post("/api/repositories", json={"name": "main", "location": repo,
                                                        "passphrase": cli.env["VMKEEP_PASSPHRASE"]})
    assert reply.status_code == 201, reply.text
    engine = create_engine(console_master.database)
    with Session(engine) as session:  # discovered just now: the master does not rediscover it for a week
        lab = Hypervisor(name="lab", kind="libvirt", uri="qemu:///system", discovered_at=datetime.now(UTC),
                         discovery_minutes=10080)
        lab.vms = [VirtualMachine(name=name, uuid=f"uuid-{name}", host=host, state="running", disks=[], tags=tags,
                                  folder=folder, present=present) for name, host, tags, folder, present in CATALOG]
        other = Hypervisor(name="other", kind="libvirt", uri="qemu+tls://other/system",
                           discovered_at=datetime.now(UTC), discovery_minutes=10080)
        other.vms = [VirtualMachine(name="app-9", uuid="uuid-app-9", host="kvm-9", state="shut off", disks=[],
                                    tags=["prod"], folder=None)]
        session.add_all([lab, other])
        session.commit()
    engine.dispose()


def previewed(page: Any) -> list[str]:
    return page.locator("#policy-preview [data-vm]").evaluate_all("els => els.map(e => e.dataset.vm)")


def wait_preview(page: Any, names: list[str]) -> None:
    page.wait_for_function("names => JSON.stringify([...document.querySelectorAll('#policy-preview [data-vm]')]"
                           ".map(e => e.dataset.vm)) === JSON.stringify(names)", arg=names, timeout=5000)


def local_text(at: datetime) -> str:
    """What console.js shows for ``at`` in the browser's zone (en-US, medium date, short time)."""
    at = at.astimezone(ZoneInfo(BROWSER_ZONE))
    return f"{at:%b} {at.day}, {at.year}, {at.hour % 12 or 12}:{at:%M} {at:%p}"


STORED = {"name": "apps", "repository": "main", "vms": ["db-1"], "globs": ["app-*"], "hypervisor": "lab",
          "hosts": ["kvm-1", "kvm-2"], "tags": ["prod", "test"], "folders": ["prod/*"], "schedule": "30 2 * * *",
          "retention": {"last": 7, "daily": 14, "monthly": 6}, "full_every": 10, "transports": "nbd",
          "quiesce": "required", "nbd_tls": "auto", "max_per_host": 2, "max_per_datastore": 3, "max_per_proxy": 4,
          "verify_after": True, "verify_boot": True, "notify_webhook": "http://127.0.0.1:9/hook",
          "notify_email": ["ops@example.com", "night@example.com"], "copy_targets": []}


def changes(api: httpx.Client) -> list[tuple[str, str]]:
    """The audit trail without the logins (each browser or form session adds one)."""
    return [entry for entry in audit_actions(api) if entry[1] != "login"]


def stored(api: httpx.Client, name: str) -> dict[str, Any]:
    found = [p for p in api.get("/api/policies").json() if p["name"] == name]
    assert len(found) == 1
    return {k: v for k, v in found[0].items() if k not in ("next_run", "created")}


def test_without_a_repository_the_page_says_what_to_do(console_master: Server) -> None:
    """Before the module's catalog fixture registers one (tests run in file order)."""
    page = form_login(console_master).get("/policies").text
    assert "No repository is registered yet" in page and "repository add NAME" in page
    assert 'href="/policies/new"' not in page  # nothing to create a policy with yet
    auditor = form_login(console_master, *AUDITOR).get("/policies").text
    assert "an administrator or operator registers one" in auditor and "repository add" not in auditor


RULES: list[dict[str, Any]] = [
    {}, {"globs": ["app-*"]}, {"vms": ["db-1", "nope"], "globs": ["w?b-[0-9]"]},
    {"hypervisor": "lab", "tags": ["test"]}, {"hosts": ["kvm-1", "kvm-9"], "folders": ["prod/*"]},
    {"globs": ["[!a]*"]}, {"tags": ["prod"], "hypervisor": "other"}, {"globs": ["*-[z-a]"]}, {"folders": ["*"]},
    {"globs": ["app-?"], "tags": ["prod", "none"]}]


def test_the_preview_picks_what_the_dispatcher_picks(console_master: Server, catalog: None) -> None:
    """The preview counts and slices in SQL; a run selects in Python (dispatch.select_vms): the same VMs."""
    engine = create_engine(console_master.database)
    with Session(engine) as session:
        for rules in RULES:
            wanted = [vm.name for vm in select_vms(session, Policy(selection=rules))]
            shown = preview(session, rules)
            assert ([name for name, _, _ in shown.vms], shown.total) == (wanted, len(wanted)), rules
    engine.dispose()


def test_create_and_edit_a_policy_in_the_browser(chromium: Any, console_master: Server, console_api: httpx.Client,
                                                 catalog: None) -> None:
    page = log_in(chromium, console_master)
    problems: list[str] = []  # script errors, Content-Security-Policy refusals
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.goto(console_master.url + "/policies")
    assert "No policy yet — create one" in page.inner_text("main")
    page.get_by_role("link", name="create one").click()
    page.wait_for_url(console_master.url + "/policies/new")
    assert previewed(page)[:2] == ["app-1", "app-2"] and "app-old" not in previewed(page)  # no rule: every VM

    page.get_by_label("Name", exact=True).fill("apps")
    page.get_by_label("Repository").select_option("main")
    with page.expect_response(lambda r: "/policies/preview?" in r.url) as answered:
        page.get_by_label("Name globs").fill("app-*")
    assert "globs=app-*" in answered.value.url.replace("%2A", "*") and "csrf" not in answered.value.url
    wait_preview(page, ["app-1", "app-2", "app-3", "app-9"])  # exactly the glob's present VMs
    assert page.locator("[data-figure=preview-total]").inner_text() == "4"

    page.get_by_label("Schedule (cron, UTC)").fill("30 2 * * *")
    runs = page.locator("#policy-next-runs time")
    runs.nth(4).wait_for(timeout=5000)
    expected, at = [], datetime.now(UTC)
    for _ in range(5):
        at = next_run("30 2 * * *", at)
        expected.append(at)
    assert [datetime.fromisoformat(str(t)) for t in runs.evaluate_all("els => els.map(e => e.dateTime)")] == expected
    assert runs.all_inner_texts() == [local_text(t) for t in expected]  # the browser's zone, not UTC
    page.get_by_label("Schedule (cron, UTC)").fill("every night")
    page.locator("#policy-next-runs .error").wait_for(timeout=5000)
    assert "not a cron expression" in page.inner_text("#policy-next-runs")
    page.get_by_label("Schedule (cron, UTC)").fill("30 2 * * *")

    for label, value in (("VM names", "db-1"), ("Hosts", "kvm-1\nkvm-2"), ("Tags", "prod\ntest"), ("Folders", "prod/*"),
                         ("Keep last", "7"), ("Daily", "14"), ("Monthly", "6"), ("Full backup every", "10"),
                         ("Transports, in order", "nbd"), ("Per host", "2"), ("Per datastore", "3"), ("Per proxy", "4"),
                         ("Webhook", "http://127.0.0.1:9/hook"), ("E-mail", "ops@example.com\nnight@example.com")):
        page.get_by_label(label, exact=True).fill(value)
    for label, value in (("Hypervisor", "lab"), ("Quiesce the guest", "required"),
                         ("TLS for disks read over the network (nbd)", "auto")):
        page.get_by_label(label).select_option(value)
    wait_preview(page, ["app-1", "app-2", "app-3", "db-1"])
    page.get_by_label("Verify each new point").check()
    page.get_by_label("Boot check each new point").check()
    page.get_by_role("button", name="Create policy").click()
    page.wait_for_url(console_master.url + "/policies?saved=apps")

    assert stored(console_api, "apps") == STORED  # every field, as the API reads it
    assert audit_actions(console_api)[0] == ("admin", "policy-create")
    row = page.locator("tr[data-policy=apps]")
    assert row.locator("[data-figure=selected]").inner_text() == "4"  # counted in SQL, as the preview picked
    assert "never run" in row.inner_text() and "30 2 * * *" in row.inner_text()
    next_at = datetime.fromisoformat(console_api.get("/api/policies").json()[0]["next_run"])
    assert local_text(next_at) in row.inner_text()
    shoot(page, "policies")

    row.get_by_role("link", name="Edit apps").click()
    page.wait_for_url(console_master.url + "/policies/apps/edit")
    assert page.get_by_label("Name", exact=True).get_attribute("readonly") is not None
    assert page.get_by_label("Tags").input_value() == "prod\ntest"
    assert page.get_by_label("Per proxy").input_value() == "4"
    page.get_by_label("Tags").fill("prod")
    wait_preview(page, ["app-1", "app-2", "db-1"])
    page.get_by_label("Keep last").fill("3")
    page.get_by_label("Monthly").fill("")
    page.get_by_label("Per proxy").fill("")
    page.get_by_label("Boot check each new point").uncheck()
    page.get_by_label("Quiesce the guest").select_option("off")
    page.get_by_label("Schedule (cron, UTC)").fill("0 */6 * * *")
    page.wait_for_function("at => document.querySelector('#policy-next-runs time').dateTime === at",
                           arg=next_run("0 */6 * * *", datetime.now(UTC)).isoformat(), timeout=5000)
    shoot(page, "policy-edit")
    page.get_by_role("button", name="Save changes").click()
    page.wait_for_url(console_master.url + "/policies?saved=apps")
    assert stored(console_api, "apps") == {**STORED, "tags": ["prod"], "retention": {"last": 3, "daily": 14},
                                           "max_per_proxy": None, "verify_boot": False, "quiesce": "off",
                                           "schedule": "0 */6 * * *"}
    assert audit_actions(console_api)[0] == ("admin", "policy-change")
    assert page.locator("tr[data-policy=apps] [data-figure=selected]").inner_text() == "3"
    assert problems == []
    page.context.close()


def test_errors_appear_beside_their_field_and_nothing_is_stored(chromium: Any, console_master: Server,
                                                                console_api: httpx.Client, catalog: None) -> None:
    assert console_api.post("/api/policies", json={"name": "taken", "repository": "main"}).status_code == 201
    before, audited = console_api.get("/api/policies").json(), changes(console_api)
    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/policies/new")
    page.get_by_label("Name", exact=True).fill("taken")
    page.get_by_label("Repository").select_option("main")
    page.get_by_label("Name globs").fill("web-*")
    page.get_by_label("Schedule (cron, UTC)").fill("0 22 * * *")
    page.get_by_role("button", name="Create policy").click()
    assert page.locator("#policy-name-error").inner_text() == "policy taken exists"  # the API's 409
    assert page.get_by_label("Name", exact=True).get_attribute("aria-describedby").startswith("policy-name-error")
    assert page.get_by_label("Name globs").input_value() == "web-*"  # what was typed stays
    assert previewed(page) == ["web-1"]

    page.get_by_label("Name", exact=True).fill("nightly")
    page.get_by_label("Schedule (cron, UTC)").fill("every night")
    page.get_by_role("button", name="Create policy").click()
    assert "not a cron expression" in page.locator("#policy-schedule-error").inner_text()
    assert page.get_by_label("Schedule (cron, UTC)").input_value() == "every night"
    assert page.locator("#policy-name-error").count() == 0

    page.get_by_label("Name", exact=True).fill("no good")  # pydantic's refusals, several at once
    page.get_by_label("Schedule (cron, UTC)").fill("")
    page.get_by_label("Webhook").fill("ftp://example.com/x")
    page.get_by_label("Keep last").fill("-1")
    page.get_by_role("button", name="Create policy").click()
    assert page.locator("#policy-name-error").inner_text().startswith("Use letters, digits")
    assert page.locator("#policy-notify_webhook-error").inner_text() == "Give an address that starts with http:// or https://."
    assert "greater than or equal to 0" in page.locator("#policy-keep_last-error").inner_text()
    assert "Nothing was saved" in page.inner_text("main")
    page.context.close()

    client = form_login(console_master)  # a repository the select does not offer (gone meanwhile, or forged)
    csrf = csrf_of(client.get("/policies/new").text)
    reply = client.post("/policies/new", data={"csrf": csrf, "name": "orphan", "repository": "nope",
                                               "transports": "nbd", "quiesce": "try", "nbd_tls": "require"},
                        headers={"Origin": console_master.url})
    assert reply.status_code == 400
    assert re.search(r'id="policy-repository-error"[^>]*>no repository nope: register it first', reply.text)
    assert console_api.get("/api/policies").json() == before and changes(console_api) == audited


def test_run_now_and_delete(chromium: Any, console_master: Server, console_api: httpx.Client, catalog: None) -> None:
    assert console_api.post("/api/policies", json={"name": "webs", "repository": "main",
                                                   "globs": ["web-*"]}).status_code == 201
    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/policies")
    page.get_by_role("button", name="Run webs now").click()
    page.wait_for_url(re.compile(r"/jobs/\d+$"))  # the job's page (the Jobs pages draw it)
    job = console_api.get("/api/jobs", params={"limit": 1}).json()[0]
    assert page.url == f"{console_master.url}/jobs/{job['id']}"
    assert job["policy"] == "webs" and job["requested_by"] == "admin" and [v["vm"] for v in job["vms"]] == ["web-1"]
    assert ("admin", "backup-start") in audit_actions(console_api)[:3]
    page.goto(console_master.url + "/policies")
    outcome = page.locator("tr[data-policy=webs]").get_by_role("link", name=job["status"])
    assert outcome.get_attribute("href") == f"/jobs/{job['id']}"

    engine = create_engine(console_master.database)  # a run going on: deleting waits for it
    with Session(engine) as session:
        policy = session.scalars(select(Policy).where(Policy.name == "webs")).one()
        going = Job(policy_id=policy.id, policy_name="webs", requested_by="schedule", status="running")
        session.add(going)
        session.commit()
        client = form_login(console_master)
        csrf = csrf_of(client.get("/policies/webs/delete").text)
        refused = client.post("/policies/webs/delete", data={"csrf": csrf}, headers={"Origin": console_master.url})
        assert refused.status_code == 409 and f'href="/jobs/{going.id}"' in refused.text
        assert f"run {going.id} of policy webs is going" in refused.text
        going.finished, going.status = datetime.now(UTC), "cancelled"
        session.commit()
    engine.dispose()

    page.get_by_role("link", name="Delete webs").click()
    assert "Its run history stays" in page.inner_text("main")
    page.get_by_role("button", name="Delete policy webs").click()
    page.wait_for_url(console_master.url + "/policies?deleted=webs")
    assert "webs" not in [p["name"] for p in console_api.get("/api/policies").json()]
    assert audit_actions(console_api)[0] == ("admin", "policy-delete")
    page.context.close()


def test_an_auditor_reads_policies_and_changes_nothing(chromium: Any, console_master: Server,
                                                      console_api: httpx.Client, catalog: None) -> None:
    assert console_api.post("/api/policies", json={"name": "dbs", "repository": "main",
                                                   "globs": ["db-*"]}).status_code == 201
    page = log_in(chromium, console_master, *AUDITOR)
    page.goto(console_master.url + "/policies")
    assert page.locator("tr[data-policy=dbs]").count() == 1
    assert page.get_by_role("button").all_inner_texts() == ["Log out"]  # no run, no delete
    assert page.get_by_role("link", name="New policy").count() == 0
    assert page.get_by_role("link", name="Edit dbs").count() == 0
    page.get_by_role("link", name="dbs", exact=True).click()
    assert "Read only" in page.inner_text("main") and previewed(page) == ["db-1"]
    assert page.get_by_label("Name globs").is_disabled()
    assert page.get_by_role("button").all_inner_texts() == ["Log out"]
    page.context.close()

    before, audited, jobs = (console_api.get("/api/policies").json(), changes(console_api),
                             console_api.get("/api/jobs").json())
    client = form_login(console_master, *AUDITOR)
    csrf = csrf_of(client.get("/policies").text)
    form = {"csrf": csrf, "name": "dbs", "repository": "main", "globs": "*", "transports": "nbd", "quiesce": "try",
            "nbd_tls": "require"}
    origin = {"Origin": console_master.url}
    replies = [client.post("/policies/new", data={**form, "name": "mine"}, headers=origin),
               client.post("/policies/dbs/edit", data=form, headers=origin),
               client.post("/policies/dbs/delete", data={"csrf": csrf}, headers=origin),
               client.post("/policies/dbs/run", data={"csrf": csrf}, headers=origin),
               client.get("/policies/new"), client.get("/policies/dbs/delete")]
    assert [r.status_code for r in replies] == [403] * 6
    assert "does not change them" in replies[0].text

    admin = form_login(console_master)  # an admin's session, but no token or another site
    token = csrf_of(admin.get("/policies").text)
    refused = [admin.post("/policies/dbs/edit", data={k: v for k, v in form.items() if k != "csrf"}, headers=origin),
               admin.post("/policies/dbs/delete", data={"csrf": "0" * 64}, headers=origin),
               admin.post("/policies/dbs/run", data={"csrf": token}, headers={"Origin": "https://evil.example"}),
               admin.post("/policies/new", data={**form, "name": "forged", "csrf": token})]  # no Origin, no Referer
    assert [r.status_code for r in refused] == [403] * 4
    assert console_api.get("/api/policies").json() == before
    assert changes(console_api) == audited
    assert console_api.get("/api/jobs").json() == jobs
