"""The master's REST API as a real `vmkeep server` process on a real PostgreSQL catalog."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from tests.conftest import VMKEEP, Cli, MiB, free_port
from tests.test_catalog import backed_up

ADMIN_PASSWORD = "admin-password-1"


@dataclass
class Server:
    url: str
    database: str
    env: dict[str, str]

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def login(self, name: str, password: str) -> str:
        reply = self.client().post("/api/auth/login", json={"name": name, "password": password})
        assert reply.status_code == 200, reply.text
        return str(reply.json()["token"])


@contextmanager
def launch(cli: Cli, database: str, tmp_path: Path, *extra: str, host: str = "127.0.0.1") -> Iterator[Server]:
    """A `vmkeep server` process on a fresh catalog with an admin account, listening on ``host``."""
    env = {**cli.env, "VMKEEP_DATABASE_URL": database, "VMKEEP_MASTER_KEY_FILE": str(tmp_path / "master.key"),
           "VMKEEP_NEW_PASSWORD": ADMIN_PASSWORD}
    cli.run("db", "upgrade", env=env)
    cli.run("user", "add", "admin", "--role", "admin", env=env)
    port = free_port()
    log = tmp_path / "server.log"
    proc = subprocess.Popen([VMKEEP, "server", "--listen", f"{host}:{port}", *extra], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    try:
        yield Server(url, database, env)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def server(cli: Cli, database: str, tmp_path: Path) -> Iterator[Server]:
    with launch(cli, database, tmp_path) as running:
        yield running


def test_unauthenticated_and_forbidden_requests(server: Server) -> None:
    anonymous = server.client()
    for path in ("/api/vms", "/api/points", "/api/users", "/api/audit", "/api/hypervisors"):
        assert anonymous.get(path).status_code == 401, path
    assert anonymous.get("/api/vms", headers={"Authorization": "Bearer vk_not-a-token"}).status_code == 401
    assert anonymous.post("/api/auth/login", json={"name": "admin", "password": "wrong"}).status_code == 401
    assert anonymous.get("/openapi.json").status_code == 200 and anonymous.get("/metrics").status_code == 200

    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    for name, role in (("rita", "restore-only"), ("otto", "operator"), ("audrey", "auditor")):
        reply = admin.post("/api/users", json={"name": name, "password": f"{name}-password", "role": role})
        assert reply.status_code == 201, reply.text
    assert admin.post("/api/users", json={"name": "rita", "password": "x" * 8, "role": "admin"}).status_code == 409

    rita = server.client(server.login("rita", "rita-password"))
    assert rita.get("/api/points").status_code == 200 and rita.get("/api/vms").status_code == 200
    forbidden = [rita.post("/api/hypervisors", json={"name": "h", "kind": "libvirt", "uri": "qemu:///system"}),
                 rita.delete("/api/users/otto"), rita.get("/api/audit"),
                 rita.post("/api/repositories", json={"name": "r", "location": "/nonexistent"}),
                 rita.post("/api/policies", json={"name": "p", "repository": "r"}),
                 rita.put("/api/policies/p", json={"name": "p", "repository": "r"}),
                 rita.delete("/api/policies/p"), rita.post("/api/policies/p/run")]
    assert [r.status_code for r in forbidden] == [403] * 8
    audrey = server.client(server.login("audrey", "audrey-password"))
    assert audrey.get("/api/audit").status_code == 200 and audrey.delete("/api/users/rita").status_code == 403
    otto = server.client(server.login("otto", "otto-password"))
    assert otto.get("/api/users").status_code == 403
    # registering a proxy hands out the queue's database login: proxy accounts and admins only
    register = {"name": "p9", "transports": ["nbd"], "reaches": ["*"], "concurrency": 1}
    assert otto.post("/api/proxies/register", json=register).status_code == 403
    assert admin.post("/api/users", json={"name": "pete", "password": "pete-password",
                                          "role": "proxy"}).status_code == 201
    pete = server.client(server.client(server.login("pete", "pete-password")).post(
        "/api/tokens", json={"name": "proxy", "days": 365}).json()["token"])
    registered = pete.post("/api/proxies/register", json=register)
    assert registered.status_code == 200 and registered.json()["database_url"].startswith("postgresql")
    assert pete.post("/api/proxies/p9/heartbeat").status_code == 204
    assert [pete.get(p).status_code for p in ("/api/vms", "/api/points", "/api/jobs")] == [403, 403, 403]

    # a named API token works like a login; removing the user ends it
    token = rita.post("/api/tokens", json={"name": "script", "days": 30}).json()["token"]
    assert server.client(token).get("/api/me").json()["role"] == "restore-only"
    assert admin.delete("/api/users/rita").status_code == 204
    assert server.client(token).get("/api/me").status_code == 401

    actions = [(e["user"], e["action"], e["target"]) for e in admin.get("/api/audit").json()]
    assert ("admin", "user-delete", "rita") in actions and ("admin", "login-failed", "admin") in actions
    assert ("rita", "token-create", "script") in actions


def test_hypervisor_credentials_sealed_and_discovery(server: Server, cli: Cli) -> None:
    from tests import bare_vm

    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    reply = admin.post("/api/hypervisors", json={"name": "local", "kind": "libvirt", "uri": "qemu:///system",
                                                 "username": "backup", "password": "hypervisor-secret-42"})
    assert reply.status_code == 201 and reply.json()["has_password"] and "password" not in reply.json()
    engine = create_engine(server.database)
    with engine.connect() as conn:  # the database alone does not reveal the password
        sealed = conn.execute(text("SELECT secret_sealed FROM hypervisors WHERE name = 'local'")).scalar_one()
    engine.dispose()
    assert b"hypervisor-secret-42" not in bytes(sealed)

    # libvirt on the local socket asks for no password: the sealed one is opened and offered
    with bare_vm.running({"vda": (16 * MiB, "qcow2")}) as machine:
        found = admin.post("/api/hypervisors/local/discover")
        assert found.status_code == 200, found.text
        assert found.json()["vms"] >= 1
        vms = admin.get("/api/vms", params={"name": machine.name}).json()
        assert len(vms) == 1 and vms[0]["state"] == "running" and vms[0]["disks"][0]["name"] == "vda"
    again = admin.post("/api/hypervisors/local/discover").json()
    assert again["gone"] >= 1
    assert admin.get("/api/vms", params={"name": machine.name}).json() == []
    gone = admin.get("/api/vms", params={"name": machine.name, "include_gone": True}).json()
    assert len(gone) == 1 and not gone[0]["present"]
    bad = admin.post("/api/hypervisors", json={"name": "far", "kind": "libvirt", "uri": "qemu+tcp://127.0.0.1:1/system",
                                               "allow_plain_tcp": True})
    assert bad.status_code == 201, bad.text
    failed = admin.post("/api/hypervisors/far/discover")
    assert failed.status_code == 502 and "cannot connect" in failed.json()["detail"]


def test_repositories_and_points_through_the_api(server: Server, cli: Cli, make_disk, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    backed_up(cli, make_disk, repo, ["app-1", "app-1", "mail-1"])
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    wrong = admin.post("/api/repositories", json={"name": "main", "location": repo, "passphrase": "wrong"})
    assert wrong.status_code == 400
    added = admin.post("/api/repositories", json={"name": "main", "location": repo,
                                                  "passphrase": cli.env["VMKEEP_PASSPHRASE"]})
    assert added.status_code == 201 and added.json()["points"] == 3, added.text
    assert admin.post("/api/repositories", json={"name": "again", "location": repo}).status_code == 409
    listed = admin.get("/api/repositories").json()
    assert listed[0]["name"] == "main" and listed[0]["points"] == 3 and listed[0]["encrypted"]

    backed_up(cli, make_disk, repo, ["mail-1"])  # a new point; the stored passphrase reopens the repo
    assert admin.post("/api/repositories/main/rebuild").json()["points"] == 4
    points = admin.get("/api/points", params={"vm": "mail-*"}).json()
    assert len(points) == 2 and points[0]["created"] > points[1]["created"]
    metrics = admin.get("/metrics").text
    assert 'vmkeep_restore_points{repository="main"} 4.0' in metrics


def test_api_fuzzed_against_its_own_openapi(server: Server) -> None:
    """schemathesis: no request the schema allows (or breaks) makes the server fail or lie.

    Discovery and repository registration are left out: they would reach whatever host or
    bucket a generated URI names, and test traffic stays on this machine.
    """
    token = server.login("admin", ADMIN_PASSWORD)
    proc = subprocess.run(
        [str(Path(VMKEEP).with_name("schemathesis")), "run", f"{server.url}/openapi.json",
         "-H", f"Authorization: Bearer {token}", "--checks", "not_a_server_error,response_schema_conformance",
         "--max-examples", "15", "--seed", "7", "--request-timeout", "30",
         "--exclude-path-regex", "(/discover$|^/api/repositories$)", "--exclude-path", "/api/auth/login"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    tested = re.search(r"Tested: (\d+)", proc.stdout)
    assert tested and int(tested.group(1)) >= 10, proc.stdout[-3000:]  # it reached the operations


def test_a_proxy_whose_account_is_removed_says_why_and_stops(server: Server) -> None:
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    assert admin.post("/api/users", json={"name": "porter", "password": "porter-password",
                                          "role": "proxy"}).status_code == 201
    token = server.client(server.login("porter", "porter-password")).post(
        "/api/tokens", json={"name": "proxy", "days": 30}).json()["token"]
    proxy = subprocess.Popen([VMKEEP, "proxy", "--name", "porter-1", "--server", server.url, "--transports", "nbd",
                              "--reaches", "*"], env={**server.env, "VMKEEP_TOKEN": token},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(p["name"] == "porter-1" for p in admin.get("/api/proxies").json()):
            assert proxy.poll() is None and time.monotonic() < deadline, proxy.stderr.read() if proxy.stderr else ""
            time.sleep(0.2)
        assert admin.delete("/api/users/porter").status_code == 204
        _out, err = proxy.communicate(timeout=60)  # it stops by itself, with the reason
    finally:
        if proxy.poll() is None:
            proxy.kill()
            proxy.wait()
    assert proxy.returncode != 0
    assert "refuses this proxy's token" in err and "restart the proxy" in err, err


def test_backups_through_the_server_keep_the_repository_size_current(server: Server) -> None:
    """/metrics showed 0 used bytes after backups until the catalog was rebuilt by hand."""
    from tests.test_security import _sql

    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    assert admin.post("/api/users", json={"name": "pia", "password": "pia-password-1", "role": "proxy"}).status_code \
        == 201
    pia = server.client(server.client(server.login("pia", "pia-password-1")).post(
        "/api/tokens", json={"name": "proxy", "days": 1}).json()["token"])
    reply = pia.post("/api/proxies/register", json={"name": "pia-1", "transports": ["nbd"], "reaches": ["*"],
                                                     "concurrency": 1})
    proxy_db = reply.json()["database_url"]
    db = server.database
    _sql(db, "INSERT INTO repositories (name, location, repo_id, encrypted, used_bytes) "
             "VALUES ('sized', '/nowhere', 'sized-id', false, 1000)")
    _sql(db, "INSERT INTO policies (name, selection, repository_id, retention, transports, quiesce) "
             "SELECT 'sizing', '{}', id, '{}', 'nbd', 'try' FROM repositories WHERE name = 'sized'")
    _sql(db, "INSERT INTO jobs (policy_id, policy_name, requested_by, status) "
             "SELECT id, 'sizing', 'admin', 'running' FROM policies WHERE name = 'sizing'")
    for vm in ("a", "b"):
        _sql(db, "INSERT INTO job_vms (job_id, vm_name, status, attempts, warnings) "
                 "SELECT id, :vm, 'queued', 0, '[]' FROM jobs WHERE policy_name = 'sizing'", vm=vm)
    (a,), (b,) = _sql(db, "SELECT id FROM job_vms WHERE vm_name IN ('a', 'b') ORDER BY vm_name")

    def used() -> float:
        metrics = admin.get("/metrics").text
        found = re.search(r'^vmkeep_repository_used_bytes\{repository="sized"\} (\S+)$', metrics, re.M)
        assert found, metrics
        return float(found.group(1))

    # what the proxies' login does at the end of a backup, succeeded or failed
    _sql(proxy_db, f"UPDATE job_vms SET status = 'running' WHERE id IN ({a}, {b})")
    _sql(proxy_db, f"UPDATE job_vms SET status = 'succeeded', stored_bytes = 4096 WHERE id = {a}")
    _sql(proxy_db, f"UPDATE job_vms SET status = 'failed', stored_bytes = 999 WHERE id = {b}")
    assert used() == 1000 + 4096
    with pytest.raises(DBAPIError, match="permission denied"):  # the proxies' login still cannot touch it
        _sql(proxy_db, "UPDATE repositories SET used_bytes = 0")


def test_the_server_logs_one_json_line_per_event_and_no_secret(cli: Cli, database: str, tmp_path: Path) -> None:
    with launch(cli, database, tmp_path, "--log-format", "json") as server:
        admin = server.client(server.login("admin", ADMIN_PASSWORD))
        token = admin.post("/api/tokens", json={"name": "script", "days": 1}).json()["token"]
        assert server.client(token).get("/api/vms").status_code == 200
        assert admin.post("/api/hypervisors", json={"name": "h", "kind": "libvirt", "uri": "qemu:///system",
                                                    "username": "u", "password": "hypervisor-secret-42"}
                          ).status_code == 201
        assert server.client().post("/api/auth/login", json={"name": "admin", "password": "wrong-pw-9"}
                                    ).status_code == 401
        server.client().get("/api/health")
    text = (tmp_path / "server.log").read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    messages = [(e["logger"], e["message"]) for e in lines]
    assert any(m.startswith("serving the API on http://127.0.0.1:") for _l, m in messages), messages
    assert any(m.startswith("vmkeep server") and "up" in m for _l, m in messages), messages
    assert any(m.startswith("POST /api/auth/login → 200") for _l, m in messages), messages
    assert any(m.startswith("POST /api/auth/login → 401") for _l, m in messages), messages
    assert not any("/api/health" in m for _l, m in messages)  # polling stays out of the event log
    for secret in (ADMIN_PASSWORD, token, "hypervisor-secret-42", "wrong-pw-9", database.split(":")[2].split("@")[0]):
        assert secret not in text
