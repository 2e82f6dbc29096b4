"""VM replicas through the server, with a real proxy and a bare VM: a policy with a replica target
gets, after each run, a powered-off replica of its VM on the target libvirt host at the run's
point (the catalog lists it standby there; its disk equals the VM's disk at backup time by
qemu-img compare), and the next run writes only the slot that changed; the console's policies
page lists it. A sync whose task is lost or whose proxy worker stalled does not block the replica
(the master takes it over), and a task the row no longer names does nothing. A failover through
the API starts it; later syncs are refused until a failback; a sync into storage the hypervisor
no longer allows fails saying so. A target naming an unknown hypervisor, one that cannot hold
replicas, storage outside the restore locations, a bad name or a name another policy's replica
has is refused and changes nothing. The replica host is the lab's libvirtd (the VM's own: the
replica is a second VM there).

One master, proxy and VM for the module (heavy: run under ``flock /tmp/vmkeep-heavy.lock``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.orm import sessionmaker

from tests import bare_vm
from tests.bare_vm import BareVM
from tests.conftest import MiB, fresh_cli, qemu_img_compare
from tests.test_scale_out import local_host_and_proxy, run_to_end, stop, wait_for
from tests.test_server import Server
from tests.test_server_copy import client_cli, console_page
from vmkeep.proxy.replica_task import run_replica

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
        ({"hypervisor": "local", "name": "_{vm}"}, "{vm}"),  # the engine's names start with a letter or digit
        ({"hypervisor": "local", "name": "{vm}-" + "x" * 123}, f"for VM {lab.vm.name}"),  # > 128 with its name
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
    a_name_another_policy_keeps_is_refused(console_api, lab)
    with database(console_master) as conn:  # a failover's order carries no repository (its passphrase) and
        assert work_order(conn, "sync").repository == "main"  # needs none (the primary site lost)
        for change in ("error = error", "repository_id = NULL"):
            order = work_order(conn, "failover", change)
            assert (order.repository, order.repository_passphrase_sealed, order.hypervisor) == (None, None, "local")

    vm.write("vda", 24 * MiB, MiB, 0x42)  # slot 6
    at_second = vm.snapshot("vda", lab.folder / "at-second.qcow2")
    second = run_to_end(console_api, "mirror", {vm.name: "queued"})[vm.name]["point_id"]
    row = synced(console_api, vm.name, second)
    assert (row["point"], row["state"], row["mode"], row["bytes_written"]) == (second, "standby", "incremental",
                                                                               SLOT), row
    assert row["job"] and row["error"] is None, row
    assert bare_vm.virsh("domstate", lab.replica).strip() == "shut off"
    assert qemu_img_compare(at_second, disk)

    lost_and_stalled_tasks_do_not_block(console_master, console_api, lab, second)
    assert qemu_img_compare(at_second, disk)  # the stale task wrote nothing
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
    # the target's storage left the hypervisor's restore locations since it was set: the sync fails saying so
    assert console_api.put("/api/hypervisors/local/restore-locations",
                           json={"locations": [str(lab.folder / "elsewhere")]}).status_code == 200
    fourth = run_to_end(console_api, "mirror", {vm.name: "queued"})[vm.name]["point_id"]
    row = wait_for("the refused sync", lambda: (r := console_api.get("/api/replicas").json()[0])[
        "pending_point"] == fourth and r["status"] == "failed" and r, timeout=60)
    assert "no longer inside the restore locations" in row["error"] and row["point"] == second, row
    assert console_api.put("/api/hypervisors/local/restore-locations",
                           json={"locations": [str(lab.folder)]}).status_code == 200
    assert admin.json("policy", "replicate-to", "mirror", "--remove")["hypervisor"] is None
    assert console_api.get("/api/replicas").json()[0]["point"] == second  # the replica stays, and its record
    # a policy with a target is deleted with it; its replicas' records stay (the VMs are on their host)
    assert console_api.put("/api/policies/mirror/replica", json={"hypervisor": "local"}).status_code == 200
    assert console_api.delete("/api/policies/mirror").status_code == 204
    kept = console_api.get("/api/replicas").json()
    assert [(r["vm"], r["policy"], r["point"], r["state"]) for r in kept] == [(vm.name, "mirror", second,
                                                                               "failed-over")], kept
    audit = [(e["action"], e["target"]) for e in console_api.get("/api/audit", params={"limit": 100}).json()]
    assert audit.count(("policy-replica", "mirror")) == 3 and ("replica-failover", vm.name) in audit, audit


@contextmanager
def database(master: Server) -> Iterator[Connection]:
    """A transaction on the master's catalog, rolled back: what it changes is seen only inside."""
    engine = create_engine(master.database)
    try:
        with engine.connect() as conn:
            conn.begin()
            yield conn
            conn.rollback()
    finally:
        engine.dispose()


def work_order(conn: Connection, action: str, change: str = "error = error") -> Any:
    """The proxies' view of the one replica row made queued with ``action`` (and ``change``)."""
    conn.execute(text(f"UPDATE replicas SET status = 'queued', action = :action, {change}"), {"action": action})
    return conn.execute(text("SELECT * FROM proxy_replica_work")).one()


def a_name_another_policy_keeps_is_refused(api: httpx.Client, lab: Lab) -> None:
    """A second policy of the same VM with a target on the same host and the default name would
    overwrite the first one's replica: refused (422), nothing changed; with a name of its own it is taken."""
    policy = {"name": "mirror2", "repository": "main", "vms": [lab.vm.name], "transports": "hotadd"}
    assert api.post("/api/policies", json=policy).status_code == 201
    try:
        clash = api.put("/api/policies/mirror2/replica", json={"hypervisor": "local"})
        assert clash.status_code == 422, clash.text
        assert f"{lab.replica} on local is taken by the replica of {lab.vm.name} kept by policy mirror" in clash.json()[
            "detail"], clash.text
        assert api.get("/api/policies/mirror2/replica").json()["hypervisor"] is None
        own = api.put("/api/policies/mirror2/replica", json={"hypervisor": "local", "name": "{vm}-second"})
        assert own.status_code == 200, own.text
    finally:
        assert api.delete("/api/policies/mirror2").status_code == 204


def lost_and_stalled_tasks_do_not_block(master: Server, api: httpx.Client, lab: Lab, point: str) -> None:
    """A row left running whose task ended without an outcome is failed by the master's rescue
    (the next run queues it again); a task the row does not name does nothing; a task held by a
    proxy worker that stopped heartbeating (a crashed or restarted proxy) is queued again as a new
    task on a live proxy, which brings the replica to its point."""
    engine = create_engine(master.database)
    try:
        with engine.begin() as conn:
            old = conn.execute(text("UPDATE replicas SET status = 'running', proxy = 'gone' "
                                    "RETURNING task_id")).scalar_one()
        row = wait_for("the lost task given up", lambda: (r := api.get("/api/replicas").json()[0])[
            "status"] == "failed" and r, timeout=30)
        assert f"its task {old} ended (succeeded) without writing an outcome (proxy gone)" in row["error"], row

        with engine.begin() as conn:  # a task under way on the live proxy's worker, as the row says
            worker = conn.execute(text("SELECT id FROM procrastinate_workers ORDER BY last_heartbeat DESC LIMIT 1"))
            task = conn.execute(text(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, worker_id) VALUES "
                "('proxy-gone', 'vmkeep:replicate_vm', CAST(:args AS jsonb), 'doing', :worker) RETURNING id"),
                {"args": json.dumps({"replica_id": row["id"]}), "worker": worker.scalar_one()}).scalar_one()
            conn.execute(text("UPDATE replicas SET status = 'running', task_id = :task, error = NULL"),
                         {"task": task})
        before = api.get("/api/replicas").json()[0]
        run_replica(sessionmaker(engine), "stale", row["id"], task + 1000)  # a task the row does not name
        assert api.get("/api/replicas").json()[0] == before  # no attempt counted, nothing written
        assert api.post(f"/api/replicas/{lab.vm.name}/failover", json={}).status_code == 409  # under way

        with engine.begin() as conn:  # its worker stops heartbeating
            dead = conn.execute(text("INSERT INTO procrastinate_workers (last_heartbeat) VALUES "
                                     "(now() - interval '1 hour') RETURNING id")).scalar_one()
            conn.execute(text("UPDATE procrastinate_jobs SET worker_id = :dead WHERE id = :task"),
                         {"dead": dead, "task": task})
        row = wait_for("the stalled task taken over", lambda: (r := api.get("/api/replicas").json()[0])[
            "status"] in ("succeeded", "failed") and r, timeout=60)
        assert (row["status"], row["proxy"], row["point"], row["state"]) == ("succeeded", "p1", point, "standby"), row
        with engine.begin() as conn:
            assert conn.execute(text("SELECT status FROM procrastinate_jobs WHERE id = :task"),
                                {"task": task}).scalar_one() == "failed"  # ended by the master
            assert conn.execute(text("SELECT task_id FROM replicas")).scalar_one() != task  # a new task did it
    finally:
        engine.dispose()
