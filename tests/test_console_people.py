"""The console's proxies, audit log, and users and tokens pages in Debian's chromium against a real
`vmkeep server` on PostgreSQL: state read from the catalog, changes through the API's own rules
and audit entries, the roles of the API (an auditor reads the audit log, nobody but an admin
touches users), the audit chain's check before and after tampering."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from sqlalchemy import create_engine, text, update
from sqlalchemy.orm import Session

from tests.console_support import AUDITOR, BROWSER_ZONE, audit_actions, csrf_of, form_login, log_in, shoot
from tests.test_server import Server
from vmkeep.catalog.models import Job, JobVM, Proxy, RestoreJob

MiB = 1024 * 1024


def register(api: httpx.Client, name: str, **extra: Any) -> None:
    body = {"name": name, "transports": ["nbd"], "reaches": ["*"], "concurrency": 2, **extra}
    reply = api.post("/api/proxies/register", json=body)
    assert reply.status_code == 200, reply.text


def sql(master: Server, statement: str, **params: object) -> None:
    engine = create_engine(master.database)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement), params)
    finally:
        engine.dispose()


def test_proxies_show_their_state_work_and_throughput_and_delete_follows_the_apis_rules(
        chromium: Any, console_master: Server, console_api: httpx.Client) -> None:
    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/proxies")
    empty = page.inner_text("main")
    assert "No proxy registered yet" in empty and "vmkeep proxy --name NAME --server " + console_master.url in empty

    register(console_api, "edge-1", transports=["hotadd", "nbd"], reaches=["host-a", "host-b"], storage=["ds1"])
    register(console_api, "edge-2", concurrency=4)
    engine = create_engine(console_master.database)
    now = datetime.now(UTC)
    with Session(engine) as session:  # edge-2 fell silent five minutes ago; edge-1 is backing up a VM
        session.execute(update(Proxy).where(Proxy.name == "edge-2").values(last_heartbeat=now - timedelta(minutes=5)))
        job = Job(policy_name="nightly", requested_by="schedule", status="running", started=now - timedelta(seconds=20))
        job.vms = [JobVM(vm_name="db-1", status="running", proxy="edge-1", started=now - timedelta(seconds=20),
                         progress_bytes=400 * MiB, total_bytes=1600 * MiB),
                   JobVM(vm_name="web-1", status="queued", proxy="edge-1")]
        restore = RestoreJob(requested_by="admin", vm_name="db-1", point_id="0" * 64, mode="as-new",
                             new_name="db-1-copy", status="running", proxy="edge-1", progress_bytes=100 * MiB,
                             total_bytes=200 * MiB, created=now - timedelta(seconds=20))
        session.add_all([job, restore])
        session.commit()
        job_id, restore_id = job.id, restore.id
    engine.dispose()

    assert console_api.post("/api/proxies/edge-1/heartbeat").status_code == 204
    page.reload()
    up, down = page.locator("tr[data-proxy=edge-1]"), page.locator("tr[data-proxy=edge-2]")
    assert up.locator("[data-state]").inner_text() == "up" and down.locator("[data-state]").inner_text() == "down"
    assert re.fullmatch(r"\d s ago", up.locator("[data-age]").inner_text())
    assert down.locator("[data-age]").inner_text() == "5 min ago"
    cells = up.locator("td").all_inner_texts()
    assert cells[1:5] == ["hotadd, nbd", "host-a, host-b", "ds1", "2"]
    assert f"run {job_id}: db-1 (running, 25 %)" in cells[5] and "web-1 (queued)" in cells[5]
    assert f"restore {restore_id}: db-1-copy (running, 50 %)" in cells[5]
    rate = float(up.locator("[data-throughput]").inner_text().removesuffix(" MiB/s"))
    assert 500 / 30 < rate <= 500 / 20  # 400 + 100 MiB in the 20-odd seconds since they started
    assert down.locator("[data-work]").inner_text() == "idle" and down.locator("[data-throughput]").inner_text() == "—"
    heard = up.locator("time").first  # in the browser's zone
    at = datetime.fromisoformat(str(heard.get_attribute("datetime"))).astimezone(ZoneInfo(BROWSER_ZONE))
    assert heard.inner_text() == f"{at:%b} {at.day}, {at.year}, {at.hour % 12 or 12}:{at:%M} {at:%p}"
    with page.expect_response(lambda r: r.url.endswith("/proxies/table"), timeout=8000) as polled:
        shoot(page, "proxies")  # meanwhile htmx refreshes the heartbeats by itself
    assert polled.value.status == 200

    # an up proxy stays, with the API's reason beside the button
    assert console_api.post("/api/proxies/edge-1/heartbeat").status_code == 204
    page.goto(console_master.url + "/proxies/edge-1/delete")
    with page.expect_response(lambda r: r.request.method == "POST") as answer:
        page.get_by_role("button", name="Delete proxy edge-1").click()
    assert answer.value.status == 409
    assert page.locator("#delete-error").inner_text().startswith("Proxy edge-1 is up (heartbeat at ")
    # a down one goes, after the confirmation
    page.goto(console_master.url + "/proxies")
    page.get_by_role("link", name="Delete proxy edge-2").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Delete proxy edge-2?"
    page.get_by_role("button", name="Delete proxy edge-2").click()
    page.wait_for_url(console_master.url + "/proxies?deleted=edge-2")
    assert page.get_by_role("status").inner_text() == "Proxy edge-2 deleted."
    assert [p["name"] for p in console_api.get("/api/proxies").json()] == ["edge-1"]
    assert audit_actions(console_api)[0] == ("admin", "proxy-delete")
    page.context.close()


def verify_in(page: Any) -> Any:
    page.get_by_role("button", name="Verify the chain").click()
    result = page.locator("#verify-result [data-chain]")
    result.wait_for()
    return result


def test_audit_log_filters_pages_and_verifies_its_chain(chromium: Any, console_master: Server,
                                                        console_api: httpx.Client) -> None:
    for i in range(60):  # real actions, so the chain stays whole: 60 token-create entries
        assert console_api.post("/api/tokens", json={"name": f"batch-{i:02d}", "days": 1}).status_code == 201
    assert console_master.client().post("/api/auth/login", json={"name": "nobody-x", "password": "wrong-one"}
                                        ).status_code == 401
    total = len(console_api.get("/api/audit", params={"limit": 10000}).json())

    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/audit")
    rows = page.locator("table.audit tbody tr")
    assert rows.count() == 50 and f"Page 1 of {-(-(total + 1) // 50)} ({total + 1} in all)" in page.inner_text("main")
    first = rows.first.locator("td").all_inner_texts()
    assert first[1:3] == ["admin", "login"]  # newest first: this page's own login

    page.get_by_label("Action").fill("token-create")
    page.get_by_role("button", name="Filter").click()
    assert "Page 1 of 2 (60 in all)" in page.inner_text("main")
    assert rows.first.locator("td").nth(3).inner_text() == "batch-59"
    page.get_by_role("link", name="Next").click()
    assert rows.count() == 10 and rows.last.locator("td").nth(3).inner_text() == "batch-00"
    assert "action=token-create" in page.url and "page=2" in page.url  # the filter stays in the pager's links

    page.goto(console_master.url + "/audit?target=BATCH-4")  # contains, any case: batch-40 to batch-49
    assert rows.count() == 10
    page.goto(console_master.url + "/audit?user=nobody-x")
    assert rows.locator("td").nth(2).all_inner_texts() == ["login-failed"]
    page.goto(console_master.url + "/audit?target=100%25")  # a literal %, not a wildcard
    assert "No entry matches these filters" in page.inner_text("main")

    # since/until are the browser's own time (India: 5.5 h ahead of UTC, so a UTC reading would find nothing)
    local = datetime.now(ZoneInfo(BROWSER_ZONE))
    page.goto(console_master.url + "/audit")
    page.get_by_label("User").fill("admin")
    page.get_by_label("Since (your time)").fill(f"{local - timedelta(minutes=10):%Y-%m-%dT%H:%M}")
    page.get_by_label("Until").fill(f"{local + timedelta(minutes=10):%Y-%m-%dT%H:%M}")
    page.get_by_role("button", name="Filter").click()
    assert "zone=Asia%2F" in page.url  # console.js sent the browser's zone (Chromium calls it Asia/Calcutta)
    assert rows.count() == 50
    page.get_by_label("Since (your time)").fill(f"{local + timedelta(minutes=10):%Y-%m-%dT%H:%M}")
    page.get_by_role("button", name="Filter").click()
    assert rows.count() == 0 and "No entry matches these filters" in page.inner_text("main")
    assert page.goto(console_master.url + "/audit?since=yesterday").status == 400
    assert page.locator("#since-error").inner_text().startswith("Enter a date and time")

    page.goto(console_master.url + "/audit")
    result = verify_in(page)
    assert result.get_attribute("data-chain") == "intact" and "The chain is intact" in result.inner_text()
    shoot(page, "audit")

    # someone with the owner's rights turns the trigger off and rewrites an entry: found out
    victim = console_api.get("/api/audit", params={"action": "token-create", "limit": 1}).json()[0]
    sql(console_master, "ALTER TABLE audit_log DISABLE TRIGGER USER")
    try:
        sql(console_master, "UPDATE audit_log SET target = 'nothing-to-see' WHERE target = :t", t=victim["target"])
        page.reload()
        result = verify_in(page)
        assert result.get_attribute("data-chain") == "broken"
        assert re.search(r"entry \d+ .*altered", result.inner_text()), result.inner_text()
    finally:
        sql(console_master, "UPDATE audit_log SET target = :t WHERE target = 'nothing-to-see'", t=victim["target"])
        sql(console_master, "ALTER TABLE audit_log ENABLE TRIGGER USER")
    assert console_api.get("/api/audit/verify").json()["ok"]

    page.goto(console_master.url + "/users")  # everyone's tokens page in SQL too
    assert page.locator("tr[data-token]").count() == 50
    assert page.get_by_role("navigation", name="Token pages").inner_text().startswith("Page 1 of 2")
    page.context.close()
    for t in console_api.get("/api/tokens").json():  # the batch goes: the users page's screenshot shows a few
        if t["name"].startswith("batch-"):
            assert console_api.delete(f"/api/tokens/{t['id']}").status_code == 204


def test_users_are_added_and_deleted_with_the_apis_rules(chromium: Any, console_master: Server,
                                                          console_api: httpx.Client) -> None:
    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/users")
    assert page.locator("tr[data-user=admin]").inner_text().startswith("admin (you)")

    def add(name: str, password: str, again: str | None = None, role: str = "operator") -> int:
        page.get_by_label("Name", exact=True).fill(name)
        page.get_by_label("Role").select_option(role)
        page.get_by_label("Password", exact=True).fill(password)
        page.get_by_label("Password again").fill(password if again is None else again)
        with page.expect_response(lambda r: r.request.method == "POST") as answer:
            page.get_by_role("button", name="Add user").click()
        return int(answer.value.status)

    assert add("olga", "olga-password") == 303
    assert page.get_by_role("status").inner_text() == "User olga added."
    assert {"name": "olga", "role": "operator"}.items() <= next(
        u for u in console_api.get("/api/users").json() if u["name"] == "olga").items()
    assert audit_actions(console_api)[0] == ("admin", "user-create")
    olga = log_in(chromium, console_master, "olga", "olga-password")  # the new account logs in
    assert "Users" not in olga.get_by_role("navigation", name="Main").inner_text()
    olga.context.close()

    before = console_api.get("/api/users").json()
    assert add("olga", "another-password") == 409  # the API's own refusal, beside the name
    assert page.locator("#name-error").inner_text() == "User olga exists."
    assert page.get_by_label("Name", exact=True).get_attribute("aria-describedby") == "name-error"
    assert add("pete", "short") == 400
    assert page.locator("#password-error").inner_text() == "A password has at least 8 characters (at most 1000)."
    assert page.get_by_label("Name", exact=True).input_value() == "pete"  # kept for the next try
    assert add("pete", "pete-password", "pete-passwort") == 400
    assert page.locator("#password2-error").inner_text().startswith("The two passwords differ")
    assert add("no spaces", "long-enough-password") == 400
    assert "letters, digits" in page.locator("#name-error").inner_text()
    assert console_api.get("/api/users").json() == before  # nothing created

    page.goto(console_master.url + "/users/admin/delete")  # nobody deletes themselves
    page.get_by_role("button", name="Delete user admin").click()
    assert page.locator("#delete-error").inner_text() == (
        "User admin stays: nobody removes their own account: ask another administrator.")
    page.goto(console_master.url + "/users")
    page.get_by_role("link", name="Delete user olga").click()
    page.get_by_role("button", name="Delete user olga").click()
    page.wait_for_url(console_master.url + "/users?deleted=olga")
    assert page.get_by_role("status").inner_text() == "User olga deleted."
    assert "olga" not in {u["name"] for u in console_api.get("/api/users").json()}
    assert audit_actions(console_api)[0] == ("admin", "user-delete")
    shoot(page, "users")
    page.context.close()


def test_a_token_is_shown_once_works_and_is_revoked(chromium: Any, console_master: Server,
                                                    console_api: httpx.Client) -> None:
    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/users")
    assert page.locator("tr.current").inner_text().startswith("console (this session)\tadmin")
    page.get_by_label("Token name").fill("ci-script")
    page.get_by_label("Days it lives").fill("400")
    page.get_by_role("button", name="Create token").click()
    assert page.locator("#days-error").inner_text() == (
        "A token lives at most 365 days on this server: ask for fewer days.")
    page.get_by_label("Days it lives").fill("7")
    page.get_by_role("button", name="Create token").click()
    token = page.get_by_label("Your new token").input_value()
    assert token.startswith("vk_") and "it is not shown again" in page.inner_text("main")
    assert console_master.client(token).get("/api/me").json()["name"] == "admin"
    page.goto(console_master.url + "/users")
    assert token not in page.content()  # once
    row = page.locator("tr[data-token]", has_text="ci-script")
    expires = datetime.fromisoformat(str(row.locator("time").nth(1).get_attribute("datetime")))
    assert timedelta(days=6, hours=23) < expires - datetime.now(UTC) <= timedelta(days=7)
    row.get_by_role("button", name="Revoke").click()
    page.wait_for_url(console_master.url + "/users?revoked=1")
    assert console_master.client(token).get("/api/me").status_code == 401
    assert [a for a in audit_actions(console_api)[:2]] == [("admin", "token-revoke"), ("admin", "token-create")]

    audrey = console_master.login(*AUDITOR)  # everyone's tokens are listed, and an admin revokes anyone's
    page.reload()
    theirs = page.locator("tr[data-token]", has_text=AUDITOR[0])
    assert theirs.locator("td").first.inner_text() == AUDITOR[0] and theirs.locator("th").inner_text() == "login"
    theirs.get_by_role("button", name="Revoke").click()
    page.wait_for_url(console_master.url + "/users?revoked=1")
    assert console_master.client(audrey).get("/api/me").status_code == 401
    page.context.close()


def test_auditor_and_operator_get_the_apis_roles(console_master: Server, console_api: httpx.Client) -> None:
    register(console_api, "edge-9")
    assert console_api.post("/api/users", json={"name": "oscar", "password": "oscar-password",
                                                "role": "operator"}).status_code == 201
    operator = form_login(console_master, "oscar", "oscar-password")
    for path in ("/audit", "/audit/verify", "/users", "/users/admin/delete"):
        assert operator.get(path).status_code == 403, path
    proxies = operator.get("/proxies")
    assert proxies.status_code == 200 and "edge-9" in proxies.text and "Delete…" not in proxies.text
    assert 'href="/audit"' not in proxies.text and 'href="/users"' not in proxies.text

    auditor = form_login(console_master, *AUDITOR)
    audit = auditor.get("/audit")
    assert audit.status_code == 200 and 'href="/audit"' in audit.text and 'href="/users"' not in audit.text
    assert '"intact"' in auditor.get("/audit/verify", headers={"HX-Request": "true"}).text  # the result alone
    assert "The chain is intact" in auditor.get("/audit/verify").text  # without JavaScript: the page with it
    assert auditor.get("/users").status_code == 403
    csrf = csrf_of(audit.text)
    state = {path: [x["name"] for x in console_api.get(path).json()] for path in ("/api/users", "/api/proxies")}
    tokens = len(console_api.get("/api/tokens", params={"all": True}).json())
    trail = audit_actions(console_api)
    token_id = console_api.get("/api/tokens").json()[0]["id"]
    origin = {"Origin": console_master.url}
    for client in (auditor, operator):
        for path, data in (("/users/add", {"name": "mallory", "role": "admin", "password": "x" * 12,
                                           "password2": "x" * 12}),
                           ("/users/admin/delete", {}), ("/tokens/create", {"token_name": "sneaky"}),
                           (f"/tokens/{token_id}/revoke", {}), ("/proxies/edge-9/delete", {})):
            sent = {**data, "csrf": csrf if client is auditor else csrf_of(operator.get("/proxies").text)}
            assert client.post(path, data=sent, headers=origin).status_code == 403, path
    # an admin's post without the token is refused too
    admin = form_login(console_master)
    assert admin.post("/users/add", data={"name": "mallory", "role": "admin", "password": "x" * 12,
                                          "password2": "x" * 12}, headers=origin).status_code == 403
    assert {path: [x["name"] for x in console_api.get(path).json()] for path in ("/api/users", "/api/proxies")} == state
    assert len(console_api.get("/api/tokens", params={"all": True}).json()) == tokens + 1  # the admin's login only
    assert audit_actions(console_api)[1:] == trail and audit_actions(console_api)[0] == ("admin", "login")
