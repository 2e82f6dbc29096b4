"""Policies dispatched to two proxy processes through procrastinate, and a proxy killed mid-backup."""

from __future__ import annotations

import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import libvirt
import pytest

from tests import bare_vm
from tests.bare_vm import BareVM
from tests.conftest import VMKEEP, Cli, MiB, qemu_img_compare
from tests.test_server import ADMIN_PASSWORD, Server, launch, server  # noqa: F401 - the server fixture
from vmkeep.lab import LOCAL_URI
from vmkeep.lab.netns import create_proxy_network, destroy_proxy_network
from vmkeep.lab.postgres import lab_network_url
from vmkeep.lab.tls import PROXY_NETWORK_GATEWAY

PACED = 160  # MiB/s: the big VMs' backups and restores take seconds, however fast this machine is


@pytest.fixture
def vms() -> Iterator[list[BareVM]]:
    machines = []
    try:
        for i, size in enumerate((896, 96, 96)):  # the first is big: the kill lands while it is read
            machines.append(bare_vm.create({"vda": ((size + 32) * MiB, "qcow2")}))
            machines[-1].write("vda", 0, size * MiB, 0x30 + i)
        yield machines
    finally:
        for m in machines:
            bare_vm.destroy(m)


def start_proxy(master: Server, token: str, name: str, concurrency: int = 1, max_rate: int | None = None, *,
                reaches: str = "", transports: str = "hotadd:nbd",
                where: tuple[str, ...] = (), env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """A proxy process on this host (or run under the ``where`` command prefix: another network);
    ``max_rate`` (MiB/s) makes its backups and restores last long enough for a test to act on them."""
    limit = ["--max-rate", str(max_rate)] if max_rate else []
    return subprocess.Popen([*where, VMKEEP, "proxy", "--name", name, "--server", master.url,
                             "--transports", transports, "--reaches", reaches or socket.gethostname(),
                             "--concurrency", str(concurrency), *limit],
                            env={**master.env, "VMKEEP_TOKEN": token, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def stop(proxy: subprocess.Popen[str]) -> None:
    """Stop a proxy process: politely first (it finishes its backup), then for sure."""
    if proxy.poll() is None:
        proxy.terminate()
        try:
            proxy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()


def master_with_repository(master: Server, cli: Cli, tmp_path: Path,
                           uri: str = "qemu:///system") -> tuple[httpx.Client, str]:
    """An admin client of ``master`` with a plain repository ``main`` and the libvirt ``local`` at ``uri``."""
    admin = master.client(master.login("admin", ADMIN_PASSWORD))
    repo = str(tmp_path / "repo")
    del cli.env["VMKEEP_PASSPHRASE"]  # plain: a passphrase given to it is refused
    cli.run("repo", "init", repo)
    assert admin.post("/api/repositories", json={"name": "main", "location": repo}).status_code == 201
    assert admin.post("/api/hypervisors", json={"name": "local", "kind": "libvirt",
                                                "uri": uri}).status_code == 201
    return admin, repo


def local_host_and_proxy(master: Server, api: httpx.Client, locations: Path, name: str = "p1") -> subprocess.Popen[str]:
    """The local libvirt host registered as ``local`` and discovered, restores allowed under
    ``locations``, and a proxy ``name`` on this host, up."""
    assert api.post("/api/hypervisors", json={"name": "local", "kind": "libvirt", "uri": LOCAL_URI}).status_code == 201
    assert api.post("/api/hypervisors/local/discover").status_code == 200
    assert api.put("/api/hypervisors/local/restore-locations",
                   json={"locations": [str(locations)]}).status_code == 200
    proxy = start_proxy(master, api.post("/api/tokens", json={"name": name}).json()["token"], name)
    wait_for(f"proxy {name} up", lambda: any(p["name"] == name and p["up"] for p in api.get("/api/proxies").json()),
             timeout=60)
    return proxy


def wait_for(what: str, check, timeout: float = 120):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_two_proxies_share_a_run_and_survive_a_kill(server: Server, cli: Cli, vms: list[BareVM],  # noqa: F811
                                                    tmp_path: Path) -> None:
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    assert admin.post("/api/repositories", json={"name": "main", "location": repo,
                                                 "passphrase": cli.env["VMKEEP_PASSPHRASE"]}).status_code == 201
    assert admin.post("/api/hypervisors", json={"name": "local", "kind": "libvirt",
                                                "uri": "qemu:///system"}).status_code == 201
    assert admin.post("/api/hypervisors/local/discover").status_code == 200
    names = sorted(m.name for m in vms)
    reply = admin.post("/api/policies", json={"name": "nightly", "repository": "main", "vms": names,
                                              "transports": "hotadd", "retention": {"last": 3}})
    assert reply.status_code == 201, reply.text
    token = admin.post("/api/tokens", json={"name": "proxies"}).json()["token"]
    proxies = {name: start_proxy(server, token, name, max_rate=PACED) for name in ("pa", "pb")}
    try:
        wait_for("both proxies up", lambda: sum(p["up"] for p in admin.get("/api/proxies").json()) == 2)
        at_backup = {m.name: m.snapshot("vda", tmp_path / f"{m.name}.qcow2") for m in vms}

        job = admin.post("/api/policies/nightly/run").json()
        by_vm = {v["vm"]: v for v in job["vms"]}
        assert {v["proxy"] for v in by_vm.values()} == {"pa", "pb"}, by_vm  # the work is spread
        big = vms[0]
        victim = by_vm[big.name]["proxy"]
        survivor = "pb" if victim == "pa" else "pa"
        # kill -9 the proxy while it reads the big VM (its libvirt backup job is running)
        wait_for("the big VM's backup", big.job_running, timeout=120)

        def live() -> dict | None:  # the API shows the backup's progress while it runs
            row = next(v for v in admin.get(f"/api/jobs/{job['id']}").json()["vms"] if v["vm"] == big.name)
            return row if row["status"] == "running" and (row["progress_bytes"] or 0) > 0 else None

        row = wait_for("live progress", live, timeout=30)
        assert row["progress_bytes"] < row["total_bytes"] == 896 * MiB, row
        proxies[victim].send_signal(signal.SIGKILL)
        proxies[victim].wait()

        def finished() -> dict | None:
            current = admin.get(f"/api/jobs/{job['id']}").json()
            return current if current["finished"] else None

        done = wait_for("the run to finish on the surviving proxy", finished, timeout=300)
        assert done["status"] == "succeeded", done
        outcome = {v["vm"]: v for v in done["vms"]}
        rescued = outcome[big.name]
        assert rescued["proxy"] == survivor and rescued["attempts"] == 2, rescued
        assert any(f"{victim} stopped" in w for w in rescued["warnings"]), rescued
        others = [v for name, v in outcome.items() if name != big.name]
        assert all(v["proxy"] == survivor or v["attempts"] == 1 for v in others), others
        assert not big.job_running()

        # a restore whose proxy is killed mid-way is finished by the other proxy
        proxies[victim] = start_proxy(server, token, victim, max_rate=PACED)
        wait_for("the restarted proxy", lambda: sum(p["up"] for p in admin.get("/api/proxies").json()) == 2)
        copy = f"{big.name}-copy"
        big.extra.append(copy)
        assert admin.put("/api/hypervisors/local/restore-locations",
                         json={"locations": [str(tmp_path)]}).status_code == 200
        restore = admin.post("/api/restores", json={"vm": big.name, "hypervisor": "local", "as_name": copy,
                                                    "storage": str(tmp_path / "restored"), "start": False}).json()

        def restoring() -> dict | None:
            row = admin.get(f"/api/restores/{restore['id']}").json()
            return row if row["status"] == "running" and (row["progress_bytes"] or 0) > 0 else None

        row = wait_for("the restore's progress", restoring, timeout=60)
        assert row["progress_bytes"] < row["total_bytes"], row
        first = row["proxy"]
        proxies[first].send_signal(signal.SIGKILL)
        proxies[first].wait()
        restored = wait_for("the restore on the other proxy", lambda: (
            r := admin.get(f"/api/restores/{restore['id']}").json())["finished"] and r, timeout=300)
        assert restored["status"] == "succeeded" and restored["attempts"] == 2, restored
        assert restored["proxy"] != first and any(f"{first} stopped" in w for w in restored["warnings"]), restored
        assert qemu_img_compare(at_backup[big.name], Path(restored["disks"]["vda"]))
    finally:
        for p in proxies.values():
            stop(p)

    # every VM has a good restore point: equal to its disk at backup time
    for m in vms:
        out = tmp_path / f"restored-{m.name}.qcow2"
        cli.run("restore", m.name, "--repo", repo, "--disk", "vda", "--output", str(out))
        assert qemu_img_compare(at_backup[m.name], out), m.name
    points = {p["name"] for p in admin.get("/api/points").json()}
    assert points == set(names)
    assert any(e["action"] == "backup-start" for e in admin.get("/api/audit").json())
    with httpx.Client() as plain:
        assert plain.get(f"{server.url}/api/jobs").status_code == 401


def test_one_backup_per_host_at_a_time(server: Server, cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    admin, repo = master_with_repository(server, cli, tmp_path)
    machines = [bare_vm.create({"vda": (32 * MiB, "qcow2")}) for _ in range(3)]
    token = admin.post("/api/tokens", json={"name": "proxies"}).json()["token"]
    proxies = []
    try:
        for i, m in enumerate(machines):
            m.write("vda", 0, 8 * MiB, 0x60 + i)
        assert admin.post("/api/hypervisors/local/discover").status_code == 200
        reply = admin.post("/api/policies", json={"name": "gentle", "repository": "main", "max_per_host": 1,
                                                  "vms": [m.name for m in machines], "transports": "hotadd"})
        assert reply.status_code == 201, reply.text
        proxies = [start_proxy(server, token, name) for name in ("pa", "pb")]
        wait_for("both proxies up", lambda: sum(p["up"] for p in admin.get("/api/proxies").json()) == 2)
        job = admin.post("/api/policies/gentle/run").json()
        assert sorted(v["status"] for v in job["vms"]) == ["queued", "waiting", "waiting"]

        def finished() -> dict | None:
            current = admin.get(f"/api/jobs/{job['id']}").json()
            return current if current["finished"] else None

        done = wait_for("the run", finished, timeout=300)
        assert done["status"] == "succeeded", done
        spans = sorted((v["started"], v["finished"]) for v in done["vms"])
        assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)), spans
    finally:
        for p in proxies:
            stop(p)
        for m in machines:
            bare_vm.destroy(m)


def register_discovered(cli: Cli, admin: httpx.Client, tmp_path: Path, name: str, kind: str, uri: str,
                        password: str) -> tuple[str, dict[str, dict]]:
    """A plain repository "main" on the master and hypervisor ``name`` registered with its password
    (sealed there), discovered: the repository's path and the VMs found, by name."""
    repo = str(tmp_path / "repo")
    del cli.env["VMKEEP_PASSPHRASE"]  # plain: a passphrase given to it is refused
    cli.run("repo", "init", repo)
    assert admin.post("/api/repositories", json={"name": "main", "location": repo}).status_code == 201
    reply = admin.post("/api/hypervisors", json={"name": name, "kind": kind, "uri": uri, "password": password})
    assert reply.status_code == 201, reply.text
    found = admin.post(f"/api/hypervisors/{name}/discover")
    assert found.status_code == 200, found.text
    return repo, {v["name"]: v for v in admin.get("/api/vms").json()}


def run_to_end(admin: httpx.Client, policy: str, expect: dict[str, str]) -> dict:
    """Run ``policy``; check each VM's first status (queued or waiting), return the ended run."""
    job = admin.post(f"/api/policies/{policy}/run").json()
    assert {v["vm"]: v["status"] for v in job["vms"]} == expect, job

    def finished() -> dict | None:
        current = admin.get(f"/api/jobs/{job['id']}").json()
        return current if current["finished"] else None

    done = wait_for(f"the run of {policy}", finished, timeout=300)
    assert done["status"] == "succeeded", [(v["vm"], v["status"], v["error"]) for v in done["vms"]]
    return {v["vm"]: v for v in done["vms"]}


def apart(a: dict, b: dict) -> bool:
    """Whether two VM backups of a run did not overlap in time."""
    return a["started"] >= b["finished"] or b["started"] >= a["finished"]


def test_limits_per_datastore_and_per_proxy(server: Server, cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    admin, repo = master_with_repository(server, cli, tmp_path)
    store = bare_vm.IMAGES / f"pool-{secrets.token_hex(3)}"
    store.mkdir(parents=True)
    conn = libvirt.open(bare_vm.URI)
    pool = conn.storagePoolCreateXML(f"<pool type='dir'><name>{store.name}</name><target><path>{store}</path>"
                                     "</target></pool>", 0)
    machines: list[BareVM] = []
    proxy = None
    try:
        for i in range(3):  # two share the pool (one datastore), the third has a directory of its own
            machines.append(bare_vm.create({"vda": (48 * MiB, "qcow2")}, store=store if i < 2 else None))
            machines[-1].write("vda", 0, 40 * MiB, 0x50 + i)
        pool.refresh(0)
        assert admin.post("/api/hypervisors/local/discover").status_code == 200
        a, b, alone = (m.name for m in machines)
        stores = {v["name"]: v["disks"][0]["datastore"] for v in admin.get("/api/vms").json()}
        host = socket.gethostname()
        assert stores[a] == stores[b] == f"{host}:pool/{store.name}", stores
        assert stores[alone] == f"{host}:{bare_vm.IMAGES / alone}", stores
        for body in ({"name": "per-store", "vms": [a, b, alone], "max_per_datastore": 1},
                     {"name": "per-proxy", "vms": [a, alone], "max_per_proxy": 1}):
            reply = admin.post("/api/policies", json={**body, "repository": "main", "transports": "hotadd"})
            assert reply.status_code == 201, reply.text
        token = admin.post("/api/tokens", json={"name": "proxies"}).json()["token"]
        proxy = start_proxy(server, token, "pa", concurrency=2)  # room for two backups at once
        wait_for("the proxy", lambda: any(p["up"] for p in admin.get("/api/proxies").json()))

        # the datastore holds one backup of the run at a time; the VM elsewhere goes alongside
        first, second = sorted((a, b))  # a run takes its VMs in name order
        done = run_to_end(admin, "per-store", {first: "queued", second: "waiting", alone: "queued"})
        assert apart(done[a], done[b]), done
        # one backup of the run per proxy, though the proxy has room for two
        first, second = sorted((a, alone))
        done = run_to_end(admin, "per-proxy", {first: "queued", second: "waiting"})
        assert apart(done[a], done[alone]), done
    finally:
        if proxy is not None:
            stop(proxy)
        for m in machines:
            bare_vm.destroy(m)
        pool.destroy()
        conn.close()
        shutil.rmtree(store, ignore_errors=True)


def test_verify_after_backup_catches_a_bad_chunk(server: Server, cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    admin, location = master_with_repository(server, cli, tmp_path)
    repo = Path(location)
    machine = bare_vm.create({"vda": (32 * MiB, "qcow2")})
    proxy = None
    try:
        machine.write("vda", 0, 8 * MiB, 0x5A)
        assert admin.post("/api/hypervisors/local/discover").status_code == 200
        assert admin.post("/api/policies", json={"name": "checked", "repository": "main", "vms": [machine.name],
                                                 "transports": "hotadd", "verify_after": True,
                                                 "retention": {"last": 1}}).status_code == 201
        token = admin.post("/api/tokens", json={"name": "proxies"}).json()["token"]
        proxy = start_proxy(server, token, "pa")
        wait_for("the proxy", lambda: any(p["up"] for p in admin.get("/api/proxies").json()))
        first = run_to_end(admin, "checked", {machine.name: "queued"})[machine.name]
        assert first["verified"] is True, first
        assert first["disks"]["vda"]["size"] == 32 * MiB and first["disks"]["vda"]["mode"] == "full", first
        assert first["disks"]["vda"]["bytes_read"] == first["read_bytes"] == 8 * MiB, first  # per disk, per VM

        # bit rot in a chunk the next point shares with the first (the guest's unchanged data)
        victim = next(p for p in (repo / "chunks").rglob("*") if p.is_file() and len(p.name) == 64)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
        machine.write("vda", 16 * MiB, 1 * MiB, 0x5B)
        job = admin.post("/api/policies/checked/run").json()
        done = wait_for("the second run", lambda: (j := admin.get(f"/api/jobs/{job['id']}").json())["finished"] and j)
        second = done["vms"][0]
        assert done["status"] == "failed" and second["verified"] is False, done
        assert "verify after backup" in second["error"] and "does not read back" in second["error"], second
        assert second["disks"]["vda"]["mode"] == "incremental" and second["disks"]["vda"]["bytes_read"] == MiB
        # retention (keep the last one) was not applied: the first point is still there to restore
        kept = [p["point"] for p in cli.json("points", "--repo", str(repo))["points"]]
        assert first["point_id"] in kept and second["point_id"] in kept, kept

        # the policy changes and goes; its runs stay in the history
        body = {"name": "checked", "repository": "main", "vms": [machine.name], "transports": "hotadd"}
        changed = admin.put("/api/policies/checked", json=body)
        assert changed.status_code == 200 and changed.json()["verify_after"] is False, changed.text
        assert admin.delete("/api/policies/checked").status_code == 204
        assert admin.post("/api/policies/checked/run").status_code == 404
        assert [j["policy"] for j in admin.get("/api/jobs").json()] == ["checked", "checked"]
    finally:
        if proxy is not None:
            stop(proxy)
        bare_vm.destroy(machine)


def test_cancel_drops_queued_and_stops_running_backups(server: Server, cli: Cli,  # noqa: F811
                                                       tmp_path: Path) -> None:
    admin, repo = master_with_repository(server, cli, tmp_path)
    # names sort the big VM first: its backup is the one running when the cancel comes
    big = bare_vm.create({"vda": (1056 * MiB, "qcow2")}, prefix="vmkeep-t-a")
    small = bare_vm.create({"vda": (32 * MiB, "qcow2")}, prefix="vmkeep-t-b")
    token = admin.post("/api/tokens", json={"name": "proxies"}).json()["token"]
    proxy = None
    try:
        big.write("vda", 0, 1024 * MiB, 0x71)
        small.write("vda", 0, 4 * MiB, 0x72)
        assert admin.post("/api/hypervisors/local/discover").status_code == 200
        assert admin.post("/api/policies", json={"name": "once", "repository": "main", "max_per_host": 1,
                                                 "vms": [big.name, small.name],
                                                 "transports": "hotadd"}).status_code == 201
        proxy = start_proxy(server, token, "pa", max_rate=PACED)
        wait_for("the proxy", lambda: any(p["up"] for p in admin.get("/api/proxies").json()))
        job = admin.post("/api/policies/once/run").json()
        assert {v["vm"]: v["status"] for v in job["vms"]} == {big.name: "queued", small.name: "waiting"}
        wait_for("the big VM's backup", big.job_running, timeout=120)
        cancelled = admin.post(f"/api/jobs/{job['id']}/cancel").json()
        assert {v["vm"]: v["status"] for v in cancelled["vms"]}[small.name] == "cancelled"  # never started

        def finished() -> dict | None:
            current = admin.get(f"/api/jobs/{job['id']}").json()
            return current if current["finished"] else None

        done = wait_for("the run to stop", finished, timeout=120)
        assert done["status"] == "cancelled", done
        assert "nothing partial" in next(v["error"] for v in done["vms"] if v["vm"] == big.name)
        assert admin.get("/api/points").json() == []  # nothing was committed
        assert cli.json("points", "--repo", repo)["points"] == []
        assert not big.job_running() and big.checkpoints() == []  # job and checkpoint released
    finally:
        if proxy is not None:
            stop(proxy)
        for m in (big, small):
            bare_vm.destroy(m)


def test_a_proxy_on_another_network(cli: Cli, database: str, tmp_path: Path) -> None:
    """One proxy on the host, one in a network namespace (another machine's network): a run
    spreads over both, each with the transport its place allows."""
    where = tuple(create_proxy_network())
    machines: list[BareVM] = []
    proxies: list[subprocess.Popen[str]] = []
    try:
        # the master listens on the lab network, and tells proxies the catalog's address there
        with launch(cli, database, tmp_path, "--proxy-database-url", lab_network_url(database),
                    host=PROXY_NETWORK_GATEWAY) as master:
            admin, repo = master_with_repository(master, cli, tmp_path, uri=f"qemu+tls://{PROXY_NETWORK_GATEWAY}/system")
            for i in range(2):
                machines.append(bare_vm.create({"vda": (32 * MiB, "qcow2")}))
                machines[-1].write("vda", 0, 8 * MiB, 0x40 + i)
            assert admin.post("/api/hypervisors/local/discover").status_code == 200
            names = sorted(m.name for m in machines)
            assert admin.post("/api/policies", json={"name": "both", "repository": "main", "vms": names,
                                                     "transports": "hotadd:nbd"}).status_code == 201
            at_backup = {m.name: m.snapshot("vda", tmp_path / f"{m.name}.qcow2") for m in machines}
            token = admin.post("/api/tokens", json={"name": "proxies"}).json()["token"]
            proxies = [start_proxy(master, token, "near", reaches=PROXY_NETWORK_GATEWAY),
                       start_proxy(master, token, "far", reaches="*", transports="nbd", where=where)]
            wait_for("both proxies up", lambda: sum(p["up"] for p in admin.get("/api/proxies").json()) == 2)
            done = run_to_end(admin, "both", {name: "queued" for name in names})
            by_proxy = {v["proxy"]: v for v in done.values()}
            assert by_proxy["near"]["transport"] == "hotadd", by_proxy  # on the VMs' host
            far = by_proxy["far"]
            assert far["transport"] == "nbd" and any("TLS" in w for w in far["warnings"]), far  # across the link
            for m in machines:
                out = tmp_path / f"restored-{m.name}.qcow2"
                cli.run("restore", f"{m.name}@{done[m.name]['point_id']}", "--repo", repo, "--disk", "vda",
                        "--output", str(out))
                assert qemu_img_compare(at_backup[m.name], out), m.name
            # each point records how its data travelled: on the host, or across the link under TLS
            wires = {p["name"]: p["wire"] for p in admin.get("/api/points").json()}
            assert wires == {by_proxy["near"]["vm"]: "local", far["vm"]: "tls"}, wires

            # a proxy that cannot encrypt (no client certificates) fails the backup instead of
            # reading in the clear: policies require TLS across the network unless they say otherwise
            for p in proxies:
                stop(p)
            no_certs = tmp_path / "no-certs"
            no_certs.mkdir()
            proxies = [start_proxy(master, token, "bare", reaches="*", transports="nbd", where=where,
                                   env={"VMKEEP_NBD_TLS_DIR": str(no_certs)})]
            wait_for("the bare proxy up", lambda: [p["name"] for p in admin.get("/api/proxies").json()
                                                   if p["up"]] == ["bare"], timeout=60)
            job = admin.post("/api/policies/both/run").json()
            ended = wait_for("the run", lambda: (lambda j: j if j["finished"] else None)(
                admin.get(f"/api/jobs/{job['id']}").json()), timeout=300)
            assert ended["status"] == "failed" and all("no NBD client certificates" in (v["error"] or "")
                                                       for v in ended["vms"]), ended
            assert len(admin.get("/api/points").json()) == 2  # nothing stored in the clear
    finally:
        for p in proxies:
            stop(p)
        for m in machines:
            bare_vm.destroy(m)
        destroy_proxy_network()
