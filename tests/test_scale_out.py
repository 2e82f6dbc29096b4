"""Policies dispatched to two proxy processes through procrastinate, and a proxy killed mid-backup."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import bare_vm
from tests.bare_vm import BareVM
from tests.conftest import VMKEEP, Cli, MiB, qemu_img_compare
from tests.test_server import ADMIN_PASSWORD, Server, server  # noqa: F401 - the server fixture


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


def start_proxy(master: Server, token: str, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen([VMKEEP, "proxy", "--name", name, "--server", master.url, "--token", token,
                             "--transports", "hotadd:nbd", "--reaches", socket.gethostname(), "--concurrency", "1"],
                            env=master.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop(proxy: subprocess.Popen[str]) -> None:
    """Stop a proxy process: politely first (it finishes its backup), then for sure."""
    if proxy.poll() is None:
        proxy.terminate()
        try:
            proxy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()


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
    proxies = {name: start_proxy(server, token, name) for name in ("pa", "pb")}
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
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo)
    assert admin.post("/api/repositories", json={"name": "main", "location": repo}).status_code == 201
    assert admin.post("/api/hypervisors", json={"name": "local", "kind": "libvirt",
                                                "uri": "qemu:///system"}).status_code == 201
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


def test_cancel_drops_queued_and_stops_running_backups(server: Server, cli: Cli,  # noqa: F811
                                                       tmp_path: Path) -> None:
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo)
    assert admin.post("/api/repositories", json={"name": "main", "location": repo}).status_code == 201
    assert admin.post("/api/hypervisors", json={"name": "local", "kind": "libvirt",
                                                "uri": "qemu:///system"}).status_code == 201
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
        proxy = start_proxy(server, token, "pa")
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
