"""The master against its own users: hypervisor addresses, the proxies' database role, the audit
log's chain, tokens, logins and request sizes — each through the real server on PostgreSQL."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from tests.conftest import Cli
from tests.test_server import ADMIN_PASSWORD, Server, launch

PASSWORD = "a-long-password"


@pytest.fixture
def server(cli: Cli, database: str, tmp_path: Path) -> Iterator[Server]:
    with launch(cli, database, tmp_path) as running:
        yield running


def _users(server: Server, admin: httpx.Client, *roles: str) -> dict[str, httpx.Client]:
    """One account per role, logged in; keyed by role."""
    clients = {}
    for role in roles:
        name = role.replace("-", "")
        assert admin.post("/api/users", json={"name": name, "password": PASSWORD, "role": role}).status_code == 201
        clients[role] = server.client(server.login(name, PASSWORD))
    return clients


def _sql(url: str, statement: str, **params: object) -> list[tuple[object, ...]]:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        engine.dispose()


def _marker_program(tmp_path: Path) -> tuple[Path, Path]:
    """A program that leaves a file behind if anything runs it."""
    marker = tmp_path / "ran"
    program = tmp_path / "evil"
    program.write_text(f"#!/bin/sh\ntouch {marker}\n")
    program.chmod(0o755)
    return program, marker


def test_hypervisor_addresses_are_checked(server: Server, cli: Cli, tmp_path: Path) -> None:
    """Finding 1: a hypervisor address could name a program the master runs as root."""
    program, marker = _marker_program(tmp_path)
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    operator = _users(server, admin, "operator")["operator"]

    def add(client: httpx.Client, uri: str, name: str = "h", kind: str = "libvirt", **allow: bool) -> httpx.Response:
        return client.post("/api/hypervisors", json={"name": name, "kind": kind, "uri": uri, **allow})

    refused = [add(operator, f"qemu+ext:///system?command={program}"),
               add(admin, f"qemu+ext:///system?command={program}", allow_unsafe_options=True),
               add(admin, f"qemu+unix:///system?socket={tmp_path}/sock", allow_unsafe_options=True),
               add(operator, "qemu+ssh://root@host/system?keyfile=/root/.ssh/id_ed25519"),
               add(operator, "qemu+ssh://root@host/system?no_verify=1"),
               add(operator, "qemu+tcp://host/system"),
               add(operator, f"qemu+ssh://h/system?mode=auto;command={program}"),
               add(operator, "qemu+ssh://h/system?sshauth=privkey;keyfile=/root/.ssh/id_rsa"),
               add(operator, "qemu+ssh://h/system?NO_VERIFY=1"),
               add(operator, "qemu:///system?name=qemu%2Bext%3A%2F%2F%2Fsystem"),
               add(operator, "vsphere://admin@vcenter?insecure=1", kind="vsphere"),
               add(operator, "file:///etc/passwd"),
               add(operator, "qemu:///etc"),
               add(operator, "xapi://root:secret@xen1", kind="xen"),
               add(admin, "xapi://root@xen1?insecure=1", kind="xen", allow_unsafe_options=True),
               add(operator, "xapi://root@xen1\x01", kind="xen"),
               add(operator, "xapi://xen1", kind="xen"),
               add(operator, "xapi://root@xen1", kind="vsphere")]
    assert [r.status_code for r in refused] == [422] * len(refused), [r.text for r in refused]
    assert "connects only to" in refused[0].text and "not accepted" in refused[2].text
    assert "plain TCP" in refused[5].text and "'&' only" in refused[6].text
    assert "may not hold a password" in refused[13].text and "not accepted" in refused[14].text
    assert "control characters" in refused[15].text and "xapi://USER@HOST" in refused[16].text
    assert "does not match" in refused[17].text
    # an operator may not grant an allowance; an administrator may, and it is recorded
    assert add(operator, "qemu+tcp://host/system", allow_plain_tcp=True).status_code == 403
    # nor one that points at the cloud's metadata service
    for uri, kind in (("vsphere://admin@169.254.169.254", "vsphere"), ("qemu+tls://169.254.169.254/system", "libvirt"),
                      ("xapi://root@169.254.169.254:443", "xen")):
        metadata = add(admin, uri, kind=kind)
        assert metadata.status_code == 400 and "metadata" in metadata.text, metadata.text
    assert admin.get("/api/hypervisors").json() == []  # nothing refused was stored
    ok = add(admin, "qemu+ssh://root@host/system?keyfile=/k&no_verify=1", name="ssh", allow_unsafe_options=True)
    assert ok.status_code == 201 and ok.json()["allow_unsafe_options"], ok.text
    assert add(admin, "vsphere://admin@vcenter?insecure=1", name="vc", kind="vsphere",
               allow_unsafe_options=True).status_code == 201
    assert add(operator, "xapi://root@xen1:8443", name="xen", kind="xen").status_code == 201
    added = [e for e in admin.get("/api/audit").json() if e["action"] == "hypervisor-add"]
    assert {e["target"]: e["detail"]["allow_unsafe_options"] for e in added} == {"ssh": True, "vc": True, "xen": False}

    # a row that predates the check (written straight into the catalog) is refused when used
    _sql(server.database, "INSERT INTO hypervisors (name, kind, uri, discovery_minutes, allow_plain_tcp, "
                          "allow_unsafe_options) VALUES ('old', 'libvirt', :uri, 60, true, true)",
         uri=f"qemu+ext:///system?command={program}")
    found = admin.post("/api/hypervisors/old/discover")
    assert found.status_code == 502 and "command" in found.json()["detail"]

    # the command line checks the same, even with --insecure
    for extra in ([], ["--insecure"]):
        proc = cli.run("inventory", "--host", f"qemu+ext:///system?command={program}", *extra, ok=False)
        assert proc.returncode == 2 and "connects only to" in proc.stderr, proc.stderr
        proc = cli.run("inventory", "--host", f"qemu:///system?command={program}", *extra, ok=False)
        assert proc.returncode == 2 and "not accepted" in proc.stderr, proc.stderr
    proc = cli.run("inventory", "--host", "qemu+tcp://127.0.0.1:1/system", ok=False)
    assert proc.returncode == 2 and "--insecure" in proc.stderr
    assert not marker.exists()


def test_proxy_login_reaches_only_the_queue(server: Server) -> None:
    """Finding 2: the database login a registration hands out was the master's own."""
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    proxy = _users(server, admin, "proxy")["proxy"]
    reply = proxy.post("/api/proxies/register", json={"name": "p1", "transports": ["nbd"], "reaches": ["*"],
                                                       "concurrency": 1})
    assert reply.status_code == 200, reply.text
    url = reply.json()["database_url"]
    master_password = server.database.split(":")[2].split("@")[0]
    assert "_proxy:" in url and master_password not in url

    def refused(statement: str) -> str:
        with pytest.raises(DBAPIError) as caught:
            _sql(url, statement)
        return str(caught.value.orig)

    for statement in ("SELECT * FROM api_tokens", "SELECT * FROM users", "SELECT * FROM hypervisors",
                      "SELECT * FROM policies", "SELECT * FROM repositories", "SELECT * FROM vms",
                      "SELECT * FROM audit_log", "DELETE FROM audit_log",
                      "INSERT INTO api_tokens (user_id, name, token_sha256, expires) VALUES (1, 'x', 'y', now())",
                      "UPDATE job_vms SET vm_id = 1", "CREATE TABLE mine (x int)"):
        assert "permission denied" in refused(statement), statement
    # it cannot put work on the queue: only the master sends work
    assert "permission denied" in refused("INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
                                          "VALUES ('proxy-p1', 'vmkeep:restore_vm', '{}')")
    # what a proxy does need
    assert _sql(url, "SELECT count(*) FROM procrastinate_jobs") == [(0,)]
    assert _sql(url, "SELECT count(*) FROM proxy_backup_work") == [(0,)]
    _sql(url, "UPDATE job_vms SET progress_bytes = 1 WHERE id = -1")

    # job rows move forward only: an ended one stays the master's, nothing goes back to the queue
    db = server.database
    assert admin.post("/api/hypervisors", json={"name": "h", "kind": "libvirt", "uri": "qemu:///system",
                                                "username": "u", "password": "hypervisor-secret"}).status_code == 201
    _sql(db, "INSERT INTO vms (hypervisor_id, name, uuid, host, state, disks, tags, present, last_seen) "
             "SELECT id, 'web1', 'u-1', 'h', 'running', '[]', '[]', true, now() FROM hypervisors")
    _sql(db, "INSERT INTO repositories (name, location, repo_id, encrypted) VALUES ('r', '/nowhere', 'id', false)")
    _sql(db, "INSERT INTO policies (name, selection, repository_id, retention, transports, quiesce) "
             "SELECT 'p', '{}', id, '{}', 'nbd', 'try' FROM repositories")
    _sql(db, "INSERT INTO jobs (policy_id, policy_name, requested_by, status) SELECT id, 'p', 'admin', 'running' "
             "FROM policies")
    for status in ("succeeded", "queued"):
        _sql(db, "INSERT INTO job_vms (job_id, vm_id, vm_name, status, attempts, warnings) "
                 "SELECT j.id, v.id, 'web1', :s, 1, '[]' FROM jobs j, vms v", s=status)
    (ended,), (active,) = _sql(db, "SELECT id FROM job_vms ORDER BY id")
    assert "has ended" in refused(f"UPDATE job_vms SET status = 'queued' WHERE id = {ended}")
    _sql(url, f"UPDATE job_vms SET status = 'running' WHERE id = {active}")
    assert "back to the queue" in refused(f"UPDATE job_vms SET status = 'queued' WHERE id = {active}")
    _sql(db, f"UPDATE job_vms SET status = 'queued' WHERE id = {ended}")  # the master may
    # a condition on the work views never runs on the rows they hide (its error would show them)
    assert admin.post("/api/hypervisors", json={"name": "hidden", "kind": "libvirt",
                                                "uri": "qemu+ssh://secret@far/system"}).status_code == 201
    leak = "CASE WHEN hypervisor = 'hidden' THEN hypervisor_uri::int = 0 ELSE false END"
    engine = create_engine(url)
    try:
        with engine.begin() as conn:  # a hash join scans every hypervisor, with the caller's condition
            conn.execute(text("SET LOCAL enable_nestloop = off"))
            conn.execute(text("SET LOCAL enable_mergejoin = off"))
            assert list(conn.execute(text(f"SELECT vm_name FROM proxy_backup_work WHERE {leak}"))) == []
    finally:
        engine.dispose()
    # the master's own view is unchanged
    assert len(_sql(server.database, "SELECT * FROM api_tokens")) >= 2


def test_audit_log_is_append_only_and_chained(server: Server, cli: Cli) -> None:
    """Finding 3: the audit log could be rewritten by the master's own login."""
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    _users(server, admin, "auditor", "operator")
    assert server.client().post("/api/auth/login", json={"name": "admin", "password": "wrong"}).status_code == 401
    verify = cli.json("audit", "verify", env=server.env)
    assert verify["ok"] and verify["entries"] >= 6 and len(verify["head"]) == 64
    auditor = server.client(server.login("auditor", PASSWORD))
    assert auditor.get("/api/audit/verify").json()["ok"]

    for statement in ("DELETE FROM audit_log", "UPDATE audit_log SET target = 'x'", "TRUNCATE audit_log"):
        with pytest.raises(DBAPIError) as caught:
            _sql(server.database, statement)
        assert "append-only" in str(caught.value.orig), statement
    assert cli.json("audit", "verify", env=server.env)["entries"] == verify["entries"] + 1  # the auditor's login

    # an owner who turns the trigger off and edits anyway is found out
    ids = [r[0] for r in _sql(server.database, "SELECT id FROM audit_log ORDER BY id")]
    _sql(server.database, "ALTER TABLE audit_log DISABLE TRIGGER USER")
    _sql(server.database, "DELETE FROM audit_log WHERE id = :id", id=ids[2])
    _sql(server.database, "UPDATE audit_log SET client = '10.9.9.9' WHERE id = :id", id=ids[4])
    proc = cli.run("audit", "verify", "--json", env=server.env, ok=False)
    assert proc.returncode == 1
    problems = auditor.get("/api/audit/verify").json()["problems"]
    assert any(p.startswith(f"entry {ids[3]} ") and "removed" in p for p in problems), problems
    assert any(p.startswith(f"entry {ids[4]} ") and "altered" in p for p in problems), problems
    assert len(problems) == 2


def test_tokens_expire_list_and_revoke(server: Server, cli: Cli) -> None:
    """Finding 6: named tokens never expired and could be neither listed nor revoked."""
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    login = server.client().post("/api/auth/login", json={"name": "admin", "password": ADMIN_PASSWORD}).json()
    expires = datetime.fromisoformat(login["expires"])
    assert timedelta(hours=11) < expires - datetime.now(UTC) <= timedelta(hours=12)
    clients = _users(server, admin, "operator", "restore-only")
    operator, rita = clients["operator"], clients["restore-only"]

    script = operator.post("/api/tokens", json={"name": "script"}).json()  # no days: the server's maximum
    assert timedelta(days=364) < datetime.fromisoformat(script["expires"]) - datetime.now(UTC) <= timedelta(days=365)
    before = len(operator.get("/api/tokens").json())
    too_long = operator.post("/api/tokens", json={"name": "forever", "days": 3000})
    assert too_long.status_code == 400 and "365" in too_long.text
    mine = operator.get("/api/tokens").json()
    assert len(mine) == before and {t["name"] for t in mine} == {"login", "script"}
    assert all("token" not in t for t in mine) and sum(t["current"] for t in mine) == 1
    assert operator.get("/api/tokens", params={"all": True}).status_code == 403
    everyone = admin.get("/api/tokens", params={"all": True}).json()
    assert {t["user"] for t in everyone} >= {"admin", "operator", "restoreonly"}

    # somebody else's token: not found for a non-admin, and it keeps working
    script_id = next(t["id"] for t in mine if t["name"] == "script")
    assert rita.delete(f"/api/tokens/{script_id}").status_code == 404
    assert server.client(script["token"]).get("/api/me").status_code == 200
    assert operator.delete(f"/api/tokens/{script_id}").status_code == 204
    assert server.client(script["token"]).get("/api/me").status_code == 401

    # logout ends the token it came with; an expired token is refused
    assert rita.post("/api/auth/logout").status_code == 204
    assert rita.get("/api/me").status_code == 401
    late = operator.post("/api/tokens", json={"name": "late", "days": 1}).json()["token"]
    _sql(server.database, "UPDATE api_tokens SET expires = now() - interval '1 second' WHERE name = 'late'")
    assert server.client(late).get("/api/me").status_code == 401

    # the command line, with the token from the environment
    env = {**server.env, "VMKEEP_TOKEN": server.login("admin", ADMIN_PASSWORD)}
    listed = cli.json("--server", server.url, "token", "list", "--all", env=env)["tokens"]
    victim = next(t["id"] for t in listed if t["user"] == "operator" and t["name"] == "login")
    cli.run("--server", server.url, "token", "revoke", str(victim), env=env)
    assert operator.get("/api/me").status_code == 401


def test_tokens_without_expiry_get_one_on_upgrade(cli: Cli, database: str, tmp_path: Path) -> None:
    env = {**cli.env, "VMKEEP_DATABASE_URL": database, "VMKEEP_MASTER_KEY_FILE": str(tmp_path / "master.key")}
    cli.run("db", "upgrade", "0009", env=env)
    _sql(database, "INSERT INTO users (name, role, password_hash, disabled) VALUES ('u', 'admin', 'x', false)")
    _sql(database, "INSERT INTO api_tokens (user_id, name, token_sha256) SELECT id, 'old', 'digest' FROM users")
    cli.run("db", "upgrade", env=env)
    (left,) = _sql(database, "SELECT expires - created FROM api_tokens")
    assert left[0] == timedelta(days=365)


def test_login_timing_throttling_and_body_limit(server: Server) -> None:
    """Finding 7: user enumeration by timing, unlimited guessing, unbounded bodies."""
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    _users(server, admin, "auditor")
    anonymous = server.client()

    def timed(name: str, password: str) -> float:
        started = time.perf_counter()
        assert anonymous.post("/api/auth/login", json={"name": name, "password": password}).status_code == 401
        return time.perf_counter() - started

    # guesses sent in parallel are counted as they are let through, not after their argon2 check
    with ThreadPoolExecutor(8) as pool:
        racing = list(pool.map(lambda i: anonymous.post("/api/auth/login", json={"name": "racer", "password": f"{i}"}),
                               range(8)))
    assert sorted(r.status_code for r in racing) == [401] * 5 + [429] * 3

    known = sorted(timed("auditor", f"wrong-{i}") for i in range(4))
    unknown = sorted(timed(f"nobody{i}", "wrong") for i in range(4))
    assert unknown[1] > known[1] / 3, (known, unknown)  # the same argon2 work either way

    # after five failures in a row for one name the next try waits, whatever the password, and says how long
    timed("auditor", "wrong-again")
    blocked = anonymous.post("/api/auth/login", json={"name": "auditor", "password": PASSWORD})
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) >= 1
    time.sleep(int(blocked.headers["Retry-After"]))
    assert anonymous.post("/api/auth/login", json={"name": "auditor", "password": PASSWORD}).status_code == 200
    # from one address, many names: past 20 failures the address waits too
    for i in range(6):  # 14 failures from this address so far
        reply = anonymous.post("/api/auth/login", json={"name": f"guess{i}", "password": "x"})
        assert reply.status_code == 401, (i, reply.text)
    spread = anonymous.post("/api/auth/login", json={"name": "admin", "password": ADMIN_PASSWORD})
    assert spread.status_code == 429

    # bodies: announced or streamed, over 1 MiB is refused before anything reads it
    big = anonymous.post("/api/auth/login", content=b"{" + b" " * (20 << 20) + b"}",
                         headers={"content-type": "application/json"})
    assert big.status_code == 413
    streamed = anonymous.post("/api/users", content=iter([b" " * (1 << 20)] * 3),
                              headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert admin.get("/api/me").status_code == 200


def test_deleting_a_hypervisor_keeps_its_history(server: Server) -> None:
    """Finding 14: deleting a hypervisor took its VMs' backup and restore history with it."""
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    assert admin.post("/api/hypervisors", json={"name": "gone", "kind": "libvirt",
                                                "uri": "qemu:///system"}).status_code == 201
    db = server.database
    _sql(db, "INSERT INTO repositories (name, location, repo_id, encrypted) VALUES ('r', '/nowhere', 'id', false)")
    _sql(db, "INSERT INTO vms (hypervisor_id, name, uuid, host, state, disks, tags, present, last_seen) "
             "SELECT id, 'web1', 'u-1', 'h', 'running', '[]', '[]', true, now() FROM hypervisors")
    _sql(db, "INSERT INTO jobs (policy_name, requested_by, status) VALUES ('p', 'admin', 'succeeded')")
    _sql(db, "INSERT INTO job_vms (job_id, vm_id, vm_name, status, attempts, warnings) "
             "SELECT j.id, v.id, 'web1', 'succeeded', 1, '[]' FROM jobs j, vms v")
    _sql(db, "INSERT INTO restore_jobs (requested_by, vm_name, point_id, repository_id, hypervisor_id, "
             "hypervisor_name, mode, start_vm, status, attempts, warnings) SELECT 'admin', 'web1', 'p1', r.id, h.id, "
             "h.name, 'as-new', true, 'running', 1, '[]' FROM repositories r, hypervisors h")
    busy = admin.delete("/api/hypervisors/gone")
    assert busy.status_code == 409 and "under way" in busy.text
    assert [h["name"] for h in admin.get("/api/hypervisors").json()] == ["gone"]
    _sql(db, "UPDATE restore_jobs SET status = 'succeeded'")
    assert admin.delete("/api/hypervisors/gone").status_code == 204
    (job,) = admin.get("/api/jobs").json()
    assert [v["vm"] for v in admin.get(f"/api/jobs/{job['id']}").json()["vms"]] == ["web1"]
    (restore,) = admin.get("/api/restores").json()
    assert restore["vm"] == "web1" and restore["hypervisor"] == "gone"



def test_restores_write_only_where_an_administrator_allowed(server: Server) -> None:
    """Finding 9: restore-only could have disks written anywhere on a host, and overwrite VMs."""
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    clients = _users(server, admin, "operator", "restore-only")
    operator, rita = clients["operator"], clients["restore-only"]
    added = admin.post("/api/hypervisors", json={"name": "h", "kind": "libvirt", "uri": "qemu:///system"})
    assert added.status_code == 201

    def restore(client: httpx.Client, **body: object) -> httpx.Response:
        return client.post("/api/restores", json={"vm": "web1", "hypervisor": "h", **body})

    nowhere = restore(rita, as_name="copy", storage="/etc")
    assert nowhere.status_code == 403 and "restore-locations" in nowhere.text
    assert restore(rita, overwrite=True).status_code == 403
    assert operator.put("/api/hypervisors/h/restore-locations", json={"locations": ["/srv"]}).status_code == 403
    assert admin.put("/api/hypervisors/h/restore-locations",
                     json={"locations": ["/srv/../etc"]}).status_code == 422
    assert admin.get("/api/hypervisors").json()[0]["restore_locations"] == []
    assert admin.put("/api/hypervisors/h/restore-locations",
                     json={"locations": ["/srv/restores/"]}).json()["restore_locations"] == ["/srv/restores"]
    for storage in ("/srv/restores-evil", "/srv/restores/../../etc", "/etc"):
        assert restore(rita, as_name="copy", storage=storage).status_code == 403, storage
    # inside a location, and an operator's overwrite, pass the checks (and stop at the missing point)
    assert restore(rita, as_name="copy", storage="/srv/restores/copy").status_code == 404
    assert restore(operator, overwrite=True).status_code == 404
    assert admin.get("/api/restores").json() == []
    assert any(e["action"] == "hypervisor-restore-locations" for e in admin.get("/api/audit").json())


def test_policies_require_tls_across_the_network_by_default(server: Server, tmp_path: Path, cli: Cli) -> None:
    """Finding 8 (the policy's side; a run across the lab link is in test_scale_out)."""
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, env={k: v for k, v in cli.env.items() if k != "VMKEEP_PASSPHRASE"})
    assert admin.post("/api/repositories", json={"name": "main", "location": repo}).status_code == 201
    created = admin.post("/api/policies", json={"name": "p", "repository": "main"})
    assert created.status_code == 201 and created.json()["nbd_tls"] == "require", created.text
    assert admin.post("/api/policies", json={"name": "q", "repository": "main", "nbd_tls": "maybe"}).status_code == 422
    assert [p["name"] for p in admin.get("/api/policies").json()] == ["p"]


def test_work_whose_target_went_fails_instead_of_waiting(cli: Cli, database: str, tmp_path: Path) -> None:
    """A backup or restore whose VM, hypervisor or repository was removed while it waited ends
    failed with the reason (the proxy reads no work order for it), instead of staying queued."""
    from vmkeep.catalog.db import sessions
    from vmkeep.proxy.backup_task import run_backup
    from vmkeep.proxy.restore_task import run_restore

    env = {**cli.env, "VMKEEP_DATABASE_URL": database, "VMKEEP_MASTER_KEY_FILE": str(tmp_path / "master.key")}
    cli.run("db", "upgrade", env=env)
    _sql(database, "INSERT INTO repositories (name, location, repo_id, encrypted) VALUES ('r', '/nowhere', 'i', false)")
    _sql(database, "INSERT INTO restore_jobs (requested_by, vm_name, point_id, repository_id, hypervisor_name, mode, "
                   "start_vm, status, attempts, warnings) SELECT 'admin', 'web1', 'p1', id, 'gone', 'as-new', true, "
                   "'queued', 0, '[]' FROM repositories")
    _sql(database, "INSERT INTO jobs (policy_name, requested_by, status) VALUES ('p', 'admin', 'running')")
    _sql(database, "INSERT INTO job_vms (job_id, vm_name, status, attempts, warnings) "
                   "SELECT id, 'web1', 'queued', 0, '[]' FROM jobs")
    factory = sessions(database)
    ((restore_id,),) = _sql(database, "SELECT id FROM restore_jobs")
    ((job_vm_id,),) = _sql(database, "SELECT id FROM job_vms")
    run_restore(factory, "p1", int(str(restore_id)))
    run_backup(factory, "p1", int(str(job_vm_id)))
    assert _sql(database, "SELECT status, error LIKE '%removed%' FROM restore_jobs") == [("failed", True)]
    assert _sql(database, "SELECT status, error LIKE '%removed%' FROM job_vms") == [("failed", True)]
    assert _sql(database, "SELECT status FROM jobs") == [("failed",)]
    factory.kw["bind"].dispose()


def test_proxy_role_made_by_a_superuser_needs_no_createrole(cli: Cli, server_url: str, tmp_path: Path) -> None:
    """Where the catalog's login may not manage roles, a superuser creates the proxies' role once
    from `vmkeep db proxy-role-sql`; the upgrade then only grants."""
    from vmkeep.lab.postgres import psql

    name = f"vmkeep_t_{secrets.token_hex(4)}"
    owner, password = f"{name}_owner", secrets.token_hex(12)
    psql(f"CREATE ROLE {owner} WITH LOGIN NOCREATEROLE PASSWORD '{password}'")
    psql(f"CREATE DATABASE {name} OWNER {owner}")
    try:
        url = make_url(server_url).set(username=owner, password=password, database=name) \
            .render_as_string(hide_password=False)
        env = {**cli.env, "VMKEEP_DATABASE_URL": url, "VMKEEP_MASTER_KEY_FILE": str(tmp_path / "master.key")}
        refused = cli.run("db", "upgrade", env=env, ok=False)
        assert refused.returncode == 1 and "proxy-role-sql" in refused.stderr, refused.stderr
        statement = cli.run("db", "proxy-role-sql", env=env).stdout.strip()
        assert statement.startswith(f'CREATE ROLE "{name}_proxy"')
        psql(statement, database=name)
        assert cli.json("db", "upgrade", env=env)["proxy_role"] == f"{name}_proxy"
        proxy_url = url.replace(f"{owner}:{password}", f"{name}_proxy:" + statement.rsplit("'", 2)[1])
        assert _sql(proxy_url, "SELECT count(*) FROM proxy_backup_work") == [(0,)]
        with pytest.raises(DBAPIError):
            _sql(proxy_url, "SELECT * FROM users")
    finally:
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        psql(f"DROP ROLE IF EXISTS {name}_proxy")
        psql(f"DROP ROLE IF EXISTS {owner}")
