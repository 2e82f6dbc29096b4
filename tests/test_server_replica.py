"""VM replicas through the server, with a real proxy and a bare VM: a policy with a replica target
gets, after each run, a powered-off replica of its VM on the target libvirt host at the run's
point (the catalog lists it standby there; its disk equals the VM's disk at backup time by
qemu-img compare), and the next run writes only the slot that changed; the console's policies
page lists it. A failover through the API starts it; later syncs are refused until a failback. A target naming an
unknown hypervisor, one that cannot hold replicas, storage outside the restore locations or a
bad name is refused and changes nothing. The replica host is the lab's libvirtd (the VM's own:
the replica is a second VM there).

One master, proxy and VM for the module (heavy: run under ``flock /tmp/vmkeep-heavy.lock``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests import bare_vm
from tests.bare_vm import BareVM
from tests.conftest import MiB, fresh_cli, qemu_img_compare
from tests.test_scale_out import local_host_and_proxy, run_to_end, stop, wait_for
from tests.test_server import Server
from tests.test_server_copy import client_cli, console_page

SLOT = 4 * MiB  # the repository's chunk size: what a replica update writes per changed slot


@dataclass
class Lab:
    vm: BareVM
    folder: Path  # the hypervisor's restore location
    storage: Path  # where the replica's disks go, inside it

    @property
    def replica(self) -> str:
        return f"{self.vm.name}-replica"


@pytest.fixture(scope="module")
def lab(console_master: Server, console_api: httpx.Client,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A plain repository "main", the local libvirt host discovered with a small VM on it, a
    restore location, a proxy, and a policy "mirror" backing the VM up into main."""
    cli = fresh_cli()
    del cli.env["VMKEEP_PASSPHRASE"]  # plain repository: a passphrase given to it is refused
    folder = tmp_path_factory.mktemp("replicas")
    machine = bare_vm.create({"vda": (48 * MiB, "qcow2")})
    machine.extra.append(f"{machine.name}-replica")
    proxy = None
    try:
        machine.write("vda", 0, 16 * MiB, 0x41)
        cli.run("repo", "init", str(folder / "main"))
        reply = console_api.post("/api/repositories", json={"name": "main", "location": str(folder / "main")})
        assert reply.status_code == 201, reply.text
        proxy = local_host_and_proxy(console_master, console_api, folder)
        policy = {"name": "mirror", "repository": "main", "vms": [machine.name], "transports": "hotadd"}
        assert console_api.post("/api/policies", json=policy).status_code == 201
        yield Lab(machine, folder, folder / "replicas")
    finally:
        if proxy is not None:
            stop(proxy)
        bare_vm.destroy(machine)


def synced(api: httpx.Client, vm: str, point: str) -> dict[str, Any]:
    """The VM's one replica once its sync to ``point`` ended; it must have succeeded."""
    def ended() -> dict[str, Any] | None:
        rows = api.get("/api/replicas", params={"vm": vm}).json()
        return rows[0] if rows and rows[0]["pending_point"] == point and rows[0]["status"] in (
            "succeeded", "failed") else None
    row = wait_for(f"the replica of {vm} at {point}", ended, timeout=60)
    assert len(api.get("/api/replicas").json()) == 1 and row["status"] == "succeeded", row
    return dict(row)


def test_a_replica_target_the_server_cannot_use_is_refused(console_api: httpx.Client, lab: Lab) -> None:
    assert console_api.post("/api/hypervisors", json={"name": "vc", "kind": "vsphere",
                                                      "uri": "vsphere://admin@vcenter"}).status_code == 201
    unset = {"policy": "mirror", "hypervisor": None, "storage": None, "network": None, "name": None}
    refusals = [
        ({"hypervisor": "nowhere"}, "no hypervisor nowhere"),
        ({"hypervisor": "vc"}, "libvirt hosts only"),
        ({"hypervisor": "local", "storage": "/etc"}, "restore locations"),
        ({"hypervisor": "local", "name": "same-name"}, "{vm}"),
        ({"hypervisor": "local", "name": "{vm}/../x"}, "{vm}"),
    ]
    for body, why in refusals:
        reply = console_api.put("/api/policies/mirror/replica", json=body)
        assert reply.status_code == 422 and why in reply.json()["detail"], (body, reply.text)
        assert console_api.get("/api/policies/mirror/replica").json() == unset  # nothing changed
    missing = console_api.put("/api/policies/none/replica", json={"hypervisor": "local"})
    assert missing.status_code == 404 and "no policy none" in missing.json()["detail"]
    assert console_api.get("/api/replicas").json() == []
    assert console_api.delete("/api/hypervisors/vc").status_code == 204


def test_the_replica_follows_each_run_writing_only_what_changed(console_master: Server, console_api: httpx.Client,
                                                               lab: Lab) -> None:
    vm, admin = lab.vm, client_cli(console_master)
    target = admin.json("policy", "replicate-to", "mirror", "local", "--storage", str(lab.storage),
                        "--network", "none")
    assert target == {"policy": "mirror", "hypervisor": "local", "storage": str(lab.storage), "network": "none",
                      "name": "{vm}-replica"}
    at_first = vm.snapshot("vda", lab.folder / "at-first.qcow2")
    first = run_to_end(console_api, "mirror", {vm.name: "queued"})[vm.name]["point_id"]
    row = synced(console_api, vm.name, first)
    assert (row["replica"], row["hypervisor"], row["policy"], row["repository"]) == (
        lab.replica, "local", "mirror", "main"), row
    assert (row["point"], row["state"], row["mode"]) == (first, "standby", "full"), row
    assert row["bytes_written"] == 16 * MiB and row["proxy"] == "p1", row  # the 4 slots of data, no holes
    assert bare_vm.virsh("domstate", lab.replica).strip() == "shut off"
    disk = lab.storage / f"{lab.replica}-vda.raw"
    assert qemu_img_compare(at_first, disk)

    vm.write("vda", 24 * MiB, MiB, 0x42)  # slot 6
    at_second = vm.snapshot("vda", lab.folder / "at-second.qcow2")
    second = run_to_end(console_api, "mirror", {vm.name: "queued"})[vm.name]["point_id"]
    row = synced(console_api, vm.name, second)
    assert (row["point"], row["state"], row["mode"], row["bytes_written"]) == (second, "standby", "incremental",
                                                                               SLOT), row
    assert row["job"] and row["error"] is None, row
    assert bare_vm.virsh("domstate", lab.replica).strip() == "shut off"
    assert qemu_img_compare(at_second, disk)

    # a sync left "running" by a proxy that is gone does not block the replica: the next run queues it again
    engine = create_engine(console_master.database)
    with engine.begin() as conn:
        conn.execute(text("UPDATE replicas SET status = 'running', proxy = 'gone'"))
    engine.dispose()
    unchanged = run_to_end(console_api, "mirror", {vm.name: "queued"})[vm.name]["point_id"]
    row = synced(console_api, vm.name, unchanged)
    assert (row["point"], row["mode"], row["bytes_written"], row["proxy"]) == (unchanged, "incremental", 0, "p1"), row
    second = unchanged  # the replica's point from here on (the same disk content as the second)

    page = console_page(console_master, "/policies")
    shown = page[page.index(f'data-replica="{lab.replica}"'):]
    assert "<h2 id=\"replicas\">Replicas</h2>" in page and second in shown and "standby" in shown, shown[:800]
    listed = admin.json("policy", "replicas", "mirror")["replicas"]
    assert [(r["vm"], r["point"], r["state"]) for r in listed] == [(vm.name, second, "standby")]

    # failover through the API: the replica starts on its host; it is not synced again until a failback
    started = console_api.post(f"/api/replicas/{vm.name}/failover", json={"network": "none"})
    assert started.status_code == 202 and started.json()["action"] == "failover", started.text
    row = wait_for("the failover", lambda: (r := console_api.get("/api/replicas").json()[0])["status"] in (
        "succeeded", "failed") and r)
    assert (row["status"], row["state"], row["point"]) == ("succeeded", "failed-over", second), row
    assert bare_vm.virsh("domstate", lab.replica).strip() == "running"
    again = console_api.post(f"/api/replicas/{vm.name}/failover", json={})
    assert again.status_code == 409 and "failed-over" in again.json()["detail"], again.text
    third = run_to_end(console_api, "mirror", {vm.name: "queued"})[vm.name]["point_id"]
    row = wait_for("the refused sync", lambda: (r := console_api.get("/api/replicas").json()[0])[
        "pending_point"] == third and r["status"] == "failed" and r, timeout=60)
    assert "failback" in row["error"] and (row["point"], row["state"]) == (second, "failed-over"), row
    assert admin.json("policy", "replicate-to", "mirror", "--remove")["hypervisor"] is None
    assert console_api.get("/api/replicas").json()[0]["point"] == second  # the replica stays, and its record
    # a policy with a target is deleted with it; its replicas' records stay (the VMs are on their host)
    assert console_api.put("/api/policies/mirror/replica", json={"hypervisor": "local"}).status_code == 200
    assert console_api.delete("/api/policies/mirror").status_code == 204
    kept = console_api.get("/api/replicas").json()
    assert [(r["vm"], r["policy"], r["point"], r["state"]) for r in kept] == [(vm.name, "mirror", second,
                                                                               "failed-over")], kept
    audit = [e["action"] for e in console_api.get("/api/audit", params={"limit": 100}).json()]
    assert audit.count("policy-replica") == 3 and "replica-failover" in audit, audit
