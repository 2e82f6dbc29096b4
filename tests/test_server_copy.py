"""Backup copies through the server, with a real proxy and a bare VM: a policy copies each run's
new point into a second repository right after its backups, the target's own retention prunes
only the target, a cron target copies what the target lacks when due, a copy starts on demand
(the client command), the catalog and the console list where each point exists, and once
the policy's repository is deleted from the disk a restore through the server reads the copy,
bit for bit. A copy target naming an unknown repository is refused and changes nothing.

One master, proxy and VM for the module (heavy: run under ``flock /tmp/vmkeep-heavy.lock``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests import bare_vm
from tests.bare_vm import BareVM
from tests.conftest import Cli, MiB, fresh_cli, qemu_img_compare
from tests.console_support import form_login
from tests.test_scale_out import local_host_and_proxy, run_to_end, stop, wait_for
from tests.test_server import ADMIN_PASSWORD, Server


@dataclass
class Lab:
    vm: BareVM
    main: Path
    offsite: Path
    folder: Path


@pytest.fixture(scope="module")
def lab(console_master: Server, console_api: httpx.Client,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Two plain repositories registered with the master (``offsite`` made like ``main``), the
    local libvirt host discovered with a small VM on it, a restore location, and a proxy."""
    cli = fresh_cli()
    del cli.env["VMKEEP_PASSPHRASE"]  # plain repositories: a passphrase given to them is refused
    folder = tmp_path_factory.mktemp("copies")
    main, offsite = folder / "main", folder / "offsite"
    machine = bare_vm.create({"vda": (48 * MiB, "qcow2")})
    proxy = None
    try:
        machine.write("vda", 0, 16 * MiB, 0x41)
        cli.run("repo", "init", str(main))
        cli.run("repo", "init", str(offsite), "--like", str(main))
        for name, path in (("main", main), ("offsite", offsite)):
            reply = console_api.post("/api/repositories", json={"name": name, "location": str(path)})
            assert reply.status_code == 201, reply.text
        proxy = local_host_and_proxy(console_master, console_api, folder)
        yield Lab(machine, main, offsite, folder)
    finally:
        if proxy is not None:
            stop(proxy)
        bare_vm.destroy(machine)


def copies(api: httpx.Client) -> list[dict[str, Any]]:
    return list(api.get("/api/maintenance", params={"kind": "copy"}).json())


def copy_ended(api: httpx.Client, count: int) -> dict[str, Any]:
    """The newest copy run once there are ``count`` and it has ended; it must have succeeded."""
    run = wait_for(f"copy run {count}", lambda: len(runs := copies(api)) >= count and runs[0]["finished"]
                   and runs[0], timeout=120)
    assert len(copies(api)) == count and run["status"] == "succeeded", run["error"]
    return dict(run)


def where(api: httpx.Client, vm: str) -> dict[str, list[str]]:
    """Each point of ``vm`` with the repositories holding it."""
    return {p["point_id"]: p["repositories"] for p in api.get("/api/points", params={"vm": vm}).json()}


def client_cli(master: Server) -> Cli:
    """The command as a client of ``master``, logged in as the admin."""
    cli = fresh_cli()
    cli.env.update(VMKEEP_SERVER=master.url, VMKEEP_TOKEN=master.login("admin", ADMIN_PASSWORD))
    return cli


def console_page(master: Server, path: str) -> str:
    """A console page as the admin sees it."""
    console = form_login(master)
    try:
        reply = console.get(path)
        assert reply.status_code == 200, reply.text
        return reply.text
    finally:
        console.close()


def test_a_copy_target_naming_an_unknown_repository_is_refused(console_master: Server, console_api: httpx.Client,
                                                               lab: Lab) -> None:
    policy = {"name": "nightly", "repository": "main", "vms": [lab.vm.name], "transports": "hotadd"}
    refused = console_api.post("/api/policies", json={**policy, "copy_targets": [{"repository": "nowhere"}]})
    assert refused.status_code == 422 and "no repository nowhere" in refused.json()["detail"], refused.text
    assert console_api.get("/api/policies").json() == []
    own = console_api.post("/api/policies", json={**policy, "copy_targets": [{"repository": "main"}]})
    assert own.status_code == 422 and "own repository" in own.json()["detail"], own.text
    assert console_api.post("/api/policies", json=policy).status_code == 201
    changed = client_cli(console_master).json("policy", "copy-to", "nightly", "offsite", "--keep-last", "1")
    before = console_api.get("/api/policies").json()
    assert changed["copy_targets"] == before[0]["copy_targets"]
    assert before[0]["copy_targets"] == [{"repository": "offsite", "when": "after-backup", "retention": {"last": 1},
                                          "next_run": None}]
    for bad in ({"repository": "nowhere"}, {"repository": "offsite", "when": "every night"}):
        reply = console_api.put("/api/policies/nightly", json={**policy, "copy_targets": [bad]})
        assert reply.status_code == 422 and "copy target" in reply.json()["detail"], reply.text
    moved = console_api.put("/api/policies/nightly", json={**policy, "repository": "offsite"})  # into its copy
    assert moved.status_code == 422 and "copy target" in moved.json()["detail"], moved.text
    assert console_api.get("/api/policies").json() == before  # nothing changed
    page = console_page(console_master, "/policies")
    assert "copies to offsite (after each backup; last 1)" in page
    unknown = console_api.post("/api/repositories/main/copy", json={"target": "nowhere"})
    assert unknown.status_code == 404 and "nowhere" in unknown.json()["detail"]
    assert copies(console_api) == []


def test_copies_after_backup_pruned_by_their_own_retention_and_restored_when_the_primary_is_gone(
        console_master: Server, console_api: httpx.Client, lab: Lab) -> None:
    vm = lab.vm.name
    first = run_to_end(console_api, "nightly", {vm: "queued"})[vm]["point_id"]
    run = copy_ended(console_api, 1)
    assert (run["repository"], run["target"], run["requested_by"]) == ("main", "offsite", "schedule")
    assert run["result"]["points_copied"] == [f"{vm}@{first}"] and run["result"]["bytes_sent"] > 0, run
    assert run["progress_bytes"] and run["progress_bytes"] == run["total_bytes"], run
    assert where(console_api, vm) == {first: ["main", "offsite"]}
    page = console_page(console_master, f"/maintenance/{run['id']}")
    assert "Copy to offsite" in page and "1 points copied, 0 there already" in page and f"{vm}@{first}" in page

    lab.vm.write("vda", 8 * MiB, 4 * MiB, 0x42)
    at_backup = lab.vm.snapshot("vda", lab.folder / "at-second-backup.qcow2")
    second = run_to_end(console_api, "nightly", {vm: "queued"})[vm]["point_id"]
    run = copy_ended(console_api, 2)
    assert run["result"]["points_copied"] == [f"{vm}@{second}"], run
    # the target keeps its last point only; the policy's repository keeps both (no retention of its own)
    assert run["result"]["prune"]["names"][vm]["remove"] == [first], run
    assert where(console_api, vm) == {second: ["main", "offsite"], first: ["main"]}
    assert sorted(p.stem for p in (lab.offsite / "points" / vm).glob("*.json")) == [second]
    assert len(list((lab.main / "points" / vm).glob("*.json"))) == 2

    # on a cron: what the target lacks (the pruned point) travels, then its retention prunes it again
    changed = client_cli(console_master).json("policy", "copy-to", "nightly", "offsite", "--when", "0 3 * * *",
                                              "--keep-last", "1")
    assert changed["copy_targets"][0]["next_run"], changed
    engine = create_engine(console_master.database)
    with engine.begin() as conn:  # its time has come
        conn.execute(text("UPDATE policy_copy_targets SET next_run = now() - interval '1 minute'"))
    engine.dispose()
    run = copy_ended(console_api, 3)
    assert run["result"]["points_copied"] == [f"{vm}@{first}"] and run["requested_by"] == "schedule", run
    assert run["result"]["prune"]["names"][vm]["remove"] == [first], run
    assert where(console_api, vm) == {second: ["main", "offsite"], first: ["main"]}
    due = console_api.get("/api/policies").json()[0]["copy_targets"][0]["next_run"]
    assert datetime.fromisoformat(due) > datetime.now(UTC), due  # its next time, set before the copy went

    # on demand: the pruned point back into the target (only its own chunks travel)
    run = client_cli(console_master).json("repository", "copy", "main", "offsite", "--point", first[:-2])
    assert run == copy_ended(console_api, 4)
    assert run["result"]["points_copied"] == [f"{vm}@{first}"] and "prune" not in run["result"], run
    assert where(console_api, vm) == {second: ["main", "offsite"], first: ["main", "offsite"]}
    page = console_page(console_master, f"/points/vm/{vm}")
    assert page.count('data-label="Copies">offsite</td>') == 2

    # the policy's repository is lost entirely: the restore reads the copy
    shutil.rmtree(lab.main)
    restore = console_api.post("/api/restores", json={"vm": vm, "hypervisor": "local", "as_name": f"{vm}-c",
                                                      "storage": str(lab.folder / "restored"), "start": False})
    assert restore.status_code == 202, restore.text
    lab.vm.extra.append(f"{vm}-c")
    done = wait_for("the restore", lambda: (r := console_api.get(f"/api/restores/{restore.json()['id']}").json())[
        "finished"] and r, timeout=120)
    assert done["status"] == "succeeded", done
    assert (done["point"], done["repository"], done["restored_from"]) == (second, "main", "offsite"), done
    assert any("copy in repository offsite" in w and "main" in w for w in done["warnings"]), done
    assert qemu_img_compare(at_backup, Path(done["disks"]["vda"]))
    assert "read from its copy in offsite" in console_page(console_master, f"/restores/{done['id']}")
