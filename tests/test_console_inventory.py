"""The console's inventory page in Debian's chromium against a real `vmkeep server` on PostgreSQL:
adding a hypervisor through the form (the API's errors beside the fields), the tree of
hypervisors, hosts, folders and VMs with their disks, policies and newest points, search,
filters and paging in SQL, the protect action, discovery, deletion with a confirmation step, and
the refusals (auditor, no CSRF token, another site). The catalog's VMs are rows inserted
directly: nothing boots here."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from tests.console_support import AUDITOR, audit_actions, csrf_of, form_login, log_in, shoot
from tests.test_server import Server
from vmkeep.catalog.models import Hypervisor, RepositoryRecord, RestorePointRecord, VirtualMachine

GIB = 1024**3
NEWEST = datetime(2026, 11, 30, 22, 0, tzinfo=UTC)


def api_state(api: httpx.Client) -> tuple[Any, Any]:
    """What a refused request must leave as it was."""
    return api.get("/api/hypervisors").json(), api.get("/api/policies").json()


@pytest.fixture(scope="module")
def catalog(console_master: Server, console_api: httpx.Client) -> Iterator[None]:
    """Hypervisor "lab" (through the API; its address never resolves, so the schedule's discovery
    fails instead of marking the inserted VMs gone) with 120 VMs on two hosts, a folder, a repository with
    points of two VMs, and policy "nightly" that picks web-00* by a glob."""
    reply = console_api.post("/api/hypervisors", json={"name": "lab", "kind": "libvirt", "uri": "qemu+ssh://lab.invalid/system"})
    assert reply.status_code == 201, reply.text
    engine = create_engine(console_master.database)
    with Session(engine) as session:
        lab = session.scalars(select(Hypervisor).where(Hypervisor.name == "lab")).one()
        for i in range(60):
            disks = [{"name": "vda", "path": f"/var/lib/libvirt/images/web-{i:03}.qcow2", "format": "qcow2",
                      "size": 20 * GIB, "allocation": GIB, "backup": True, "skip_reason": "", "datastore": "default"},
                     {"name": "vdb", "path": "/dev/sdb", "format": "raw", "size": 512 * 1024**2, "allocation": 0,
                      "backup": True, "skip_reason": "", "datastore": "default"}]
            session.add(VirtualMachine(hypervisor_id=lab.id, name=f"web-{i:03}", uuid=f"w{i}", host="kvm-1",
                                       state="running", disks=disks, tags=["gold"] if i == 1 else [],
                                       folder="prod/web" if i < 30 else None))
            session.add(VirtualMachine(hypervisor_id=lab.id, name=f"db-{i:03}", uuid=f"d{i}", host="kvm-2",
                                       state="shutoff", disks=disks[:1], tags=[], folder=None))
        session.add(VirtualMachine(hypervisor_id=lab.id, name="old-1", uuid="o1", host="kvm-2", state="shutoff",
                                   disks=[], tags=[], present=False))  # gone: not listed
        repo = RepositoryRecord(name="main", location="/srv/vmkeep/main", repo_id="r" * 32, encrypted=True)
        session.add(repo)
        session.flush()
        for name, age in (("web-001", 3), ("web-001", 0), ("db-004", 1)):
            session.add(RestorePointRecord(repository_id=repo.id, name=name, point_id=f"{name}-{age}",
                                           created=NEWEST - timedelta(days=age), kind="vm",
                                           mode="full" if age else "incremental", logical_bytes=20 * GIB,
                                           disks={"vda": 20 * GIB}))
        session.commit()
    engine.dispose()
    reply = console_api.post("/api/policies", json={"name": "nightly", "repository": "main", "globs": ["web-00*"]})
    assert reply.status_code == 201, reply.text
    yield


def test_add_a_hypervisor_through_the_form(chromium: Any, console_master: Server, console_api: httpx.Client) -> None:
    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/inventory")
    main = page.inner_text("main")
    assert "No hypervisor yet — add one" in main and "qemu:///system" in main  # the empty state shows the way

    # a bad address: the API's own message, beside the address field; nothing added
    api_error = console_api.post("/api/hypervisors", json={"name": "bad", "kind": "libvirt", "uri": "http://kvm-9/"})
    assert api_error.status_code == 422
    page.get_by_label("Name", exact=True).fill("bad")
    page.get_by_label("Address", exact=True).fill("http://kvm-9/")
    with page.expect_response(lambda r: r.url.endswith("/inventory/hypervisors")) as answer:
        page.get_by_role("button", name="Add hypervisor").click()
    assert answer.value.status == 422
    assert page.locator("#hv-uri-error").inner_text() == api_error.json()["detail"][0]["msg"].removeprefix(
        "Value error, ")
    assert page.get_by_label("Address", exact=True).get_attribute("aria-invalid") == "true"
    assert page.get_by_label("Name", exact=True).input_value() == "bad"  # the form keeps what was typed
    assert console_api.get("/api/hypervisors").json() == []

    # the local libvirt host, as the end-to-end test adds it
    page.get_by_label("Address", exact=True).fill("qemu:///system")
    page.get_by_label("Name", exact=True).fill("local")
    page.get_by_label("Kind").select_option("libvirt")
    page.get_by_label("Password").fill("s3cret-pass")
    page.get_by_role("button", name="Add hypervisor").click()
    page.wait_for_url("**/inventory?added=local")
    assert "Hypervisor local added" in page.get_by_role("status").first.inner_text()
    [local] = console_api.get("/api/hypervisors").json()
    assert (local["name"], local["kind"], local["uri"], local["has_password"]) == ("local", "libvirt",
                                                                                   "qemu:///system", True)
    assert audit_actions(console_api)[0] == ("admin", "hypervisor-add")

    # discovery of this host's libvirt, as the API does it: what it found, in words
    with page.expect_response(lambda r: r.url.endswith("/discover")) as answer:
        page.get_by_role("button", name="Discover the VMs of local now").click()
    assert answer.value.status == 200
    found = len(console_api.get("/api/vms", params={"hypervisor": "local"}).json())
    said = page.locator("tr[data-hypervisor=local]").get_by_role("status").inner_text()
    assert said.startswith(f"Found {found} VMs: ") and said.endswith(" gone.")
    assert audit_actions(console_api)[0] == ("admin", "hypervisor-discover")

    # the same name again: the API's 409 beside the name; nothing changes
    page.locator("details.add-hypervisor summary").click()
    page.get_by_label("Name", exact=True).fill("local")
    page.get_by_label("Address", exact=True).fill("qemu+ssh://kvm-3/system")
    with page.expect_response(lambda r: r.url.endswith("/inventory/hypervisors")) as answer:
        page.get_by_role("button", name="Add hypervisor").click()
    assert answer.value.status == 409
    assert page.locator("#hv-name-error").inner_text() == "hypervisor local exists"
    assert [h["name"] for h in console_api.get("/api/hypervisors").json()] == ["local"]
    page.context.close()
    # the schedule discovers a new hypervisor at once: this host's VMs go again, the other tests count theirs
    assert console_api.delete("/api/hypervisors/local").status_code == 204


def test_tree_search_filters_and_paging(chromium: Any, console_master: Server, catalog: None) -> None:
    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/inventory")
    assert "Page 1 of 3 (120 in all)" in page.locator(".pager").inner_text()  # the gone VM is not counted
    assert page.locator("tr[data-vm]").count() == 50
    # the tree: hypervisor, host, folder (none first), VM: the first page is all kvm-1
    lab = page.locator("[data-tree-hypervisor=lab]")
    assert lab.locator("[data-tree-host=kvm-1] tr[data-vm]").count() == 50

    page.get_by_label("VM name").fill("web-00")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("tr[data-vm]")
    assert rows.count() == 10 and "10 in all" in page.inner_text("main")
    web1 = page.locator("tr[data-vm=web-001]")
    cells = web1.locator("td").all_inner_texts()
    assert cells[0] == "running"
    assert cells[1] == "vda 20.0 GiB, vdb 512.0 MiB"  # names and sizes, binary units
    assert cells[2] == "nightly"
    assert web1.locator("th .tag").all_inner_texts() == ["gold"]  # the hypervisor's own tags (XenServer's)
    newest = web1.locator("time")
    assert newest.get_attribute("datetime") == NEWEST.isoformat()  # the newest of its two points
    assert "incremental" in cells[3]
    assert "prod/web" in page.locator("[data-tree-host=kvm-1] .folder").inner_text()

    # a glob, and the other filters; they survive paging
    page.goto(console_master.url + "/inventory?q=db-0%3F4")
    found = page.locator("tr[data-vm]").evaluate_all("rows => rows.map(r => r.dataset.vm)")
    assert sorted(found) == [f"db-0{i}4" for i in range(6)]
    db4 = page.locator("tr[data-vm=db-004]").locator("td").all_inner_texts()
    assert db4[0] == "shutoff" and db4[2] == "not protected" and "full" in db4[3]
    page.goto(console_master.url + "/inventory")
    page.get_by_label("State", exact=True).select_option("running")
    page.get_by_label("Host", exact=True).select_option("kvm-1")
    page.get_by_role("button", name="Filter").click()
    assert "Page 1 of 2 (60 in all)" in page.locator(".pager").inner_text()
    page.get_by_role("link", name="Next").click()
    assert "state=running" in page.url and "host=kvm-1" in page.url and "page=2" in page.url
    assert page.locator("tr[data-vm]").count() == 10
    assert set(page.locator("tr[data-vm] td:first-of-type").all_inner_texts()) == {"running"}
    assert page.get_by_label("State", exact=True).input_value() == "running"  # the filter form shows them still

    page.goto(console_master.url + "/inventory?protection=protected")
    protected = page.locator("tr[data-vm]").evaluate_all("rows => rows.map(r => r.dataset.vm)")
    assert protected == [f"web-00{i}" for i in range(10)]  # SQL picks what the policy's glob picks
    page.goto(console_master.url + "/inventory?protection=unprotected&per_page=200")
    assert page.locator("tr[data-vm]").count() == 110
    page.goto(console_master.url + "/inventory?q=nothing-like-this")
    assert "No VM matches these filters" in page.inner_text("main")
    page.goto(console_master.url + "/inventory?q=-00")  # protected and unprotected VMs, points, two hosts
    shoot(page, "inventory")
    page.context.close()


def test_protect_adds_the_vm_to_a_policy(chromium: Any, console_master: Server, console_api: httpx.Client,
                                         catalog: None) -> None:
    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/inventory?q=db-007")
    row = page.locator("tr[data-vm=db-007]")
    assert row.locator("td").nth(2).inner_text() == "not protected"
    row.get_by_label("Policy for db-007").select_option("nightly")
    row.get_by_role("button", name="Protect db-007").click()
    page.wait_for_load_state()
    row = page.locator("tr[data-vm=db-007]")
    assert "db-007 added to policy nightly" in row.get_by_role("status").inner_text()
    assert row.locator("td").nth(2).inner_text() == "nightly"
    [nightly] = console_api.get("/api/policies").json()
    assert nightly["vms"] == ["db-007"] and nightly["globs"] == ["web-00*"]
    assert audit_actions(console_api)[0] == ("admin", "policy-change")  # the API's change, audited as such

    # a policy limited to another host cannot take it: the reason is beside the button, nothing changes
    assert console_api.post("/api/policies", json={"name": "kvm1-only", "repository": "main", "hosts": ["kvm-1"],
                                                   "globs": ["web-*"]}).status_code == 201
    before = console_api.get("/api/policies").json()
    page.goto(console_master.url + "/inventory?q=db-008")
    row = page.locator("tr[data-vm=db-008]")
    row.get_by_label("Policy for db-008").select_option("kvm1-only")
    with page.expect_response(lambda r: "/protect" in r.url) as answer:
        row.get_by_role("button", name="Protect db-008").click()
    assert answer.value.status == 409
    said = page.locator("tr[data-vm=db-008]").get_by_role("alert").inner_text()
    assert "Policy kvm1-only only selects VMs with hosts kvm-1, and db-008 is not one of them" in said
    assert console_api.get("/api/policies").json() == before
    page.context.close()


def test_discover_and_delete_with_confirmation(chromium: Any, console_master: Server, console_api: httpx.Client,
                                               catalog: None) -> None:
    assert console_api.post("/api/hypervisors", json={"name": "ghost", "kind": "libvirt",
                                                      "uri": "qemu+ssh://ghost.invalid/system"}).status_code == 201
    page = log_in(chromium, console_master)
    page.goto(console_master.url + "/inventory")
    ghost = page.locator("tr[data-hypervisor=ghost]")
    with page.expect_response(lambda r: r.url.endswith("/discover")) as answer:
        ghost.get_by_role("button", name="Discover the VMs of ghost now").click()
    assert answer.value.status == 502
    said = page.locator("tr[data-hypervisor=ghost]").get_by_role("alert").inner_text()
    assert said.startswith("discovery of ghost failed:")  # the hypervisor's answer, in words
    assert [h["discovery_error"] for h in console_api.get("/api/hypervisors").json() if h["name"] == "ghost"] != [None]

    page.locator("tr[data-hypervisor=ghost]").get_by_role("link", name="Delete ghost…").click()
    assert "Delete hypervisor ghost?" in page.inner_text("h1")
    assert "ghost" in [h["name"] for h in console_api.get("/api/hypervisors").json()]  # asking changed nothing
    page.get_by_role("button", name="Delete ghost").click()
    page.wait_for_url("**/inventory?deleted=ghost")
    assert "ghost" not in [h["name"] for h in console_api.get("/api/hypervisors").json()]
    assert audit_actions(console_api)[0] == ("admin", "hypervisor-delete")
    page.context.close()


def test_auditor_sees_no_controls_and_is_refused(chromium: Any, console_master: Server, console_api: httpx.Client,
                                                 catalog: None) -> None:
    page = log_in(chromium, console_master, *AUDITOR)
    page.goto(console_master.url + "/inventory?q=db-01")
    assert page.locator("tr[data-vm]").count() == 10  # it reads the inventory
    for control in ("Add hypervisor", "Discover now", "Protect", "Delete…"):
        assert page.get_by_role("button", name=control).count() == 0, control
    assert page.locator("form.protect, details.add-hypervisor, a.button").count() == 0
    page.context.close()

    client = form_login(console_master, *AUDITOR)
    csrf = csrf_of(client.get("/inventory").text)
    vm_id = client.get("/inventory?q=db-011").text.split('id="vm-', 1)[1].split('"', 1)[0]
    before, audit = api_state(console_api), audit_actions(console_api)
    origin = {"Origin": console_master.url}
    refused = [
        client.post("/inventory/hypervisors", data={"csrf": csrf, "name": "sneaky", "kind": "libvirt",
                                                    "uri": "qemu:///system"}, headers=origin),
        client.post("/inventory/hypervisors/lab/discover", data={"csrf": csrf}, headers=origin),
        client.post("/inventory/hypervisors/lab/delete", data={"csrf": csrf}, headers=origin),
        client.post(f"/inventory/vms/{vm_id}/protect", data={"csrf": csrf, "policy": "nightly"}, headers=origin),
        client.get("/inventory/hypervisors/lab/delete"),
    ]
    assert [r.status_code for r in refused] == [403] * 5
    assert "administrator or operator" in refused[0].text
    assert api_state(console_api) == before and audit_actions(console_api) == audit


def test_posts_without_csrf_or_from_another_site_are_refused(console_master: Server, console_api: httpx.Client,
                                                             catalog: None) -> None:
    client = form_login(console_master)
    csrf = csrf_of(client.get("/inventory").text)
    before, audit = api_state(console_api), audit_actions(console_api)
    form = {"name": "forged", "kind": "libvirt", "uri": "qemu:///system"}
    refused = [
        client.post("/inventory/hypervisors", data=form, headers={"Origin": console_master.url}),
        client.post("/inventory/hypervisors", data={**form, "csrf": csrf}, headers={"Origin": "https://evil.example"}),
        client.post("/inventory/hypervisors/lab/delete", data={}, headers={"Origin": console_master.url}),
        client.post("/inventory/hypervisors/lab/discover", data={"csrf": "0" * 64},
                    headers={"Origin": console_master.url}),
    ]
    assert [r.status_code for r in refused] == [403] * 4
    assert api_state(console_api) == before and audit_actions(console_api) == audit
