"""Administering a server from the command line (`vmkeep --server URL …`), no curl: accounts,
tokens, the audit log, hypervisors, repositories, proxies, policies, runs and restores — each
command with --json against a real server, and the refusals that must change nothing."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Cli
from tests.test_catalog import backed_up
from tests.test_security import _sql
from tests.test_server import ADMIN_PASSWORD, Server, launch


@pytest.fixture
def admin_cli(cli: Cli, database: str, tmp_path: Path) -> Iterator[tuple[Cli, Server]]:
    """A server, and the command line logged in to it as its administrator."""
    with launch(cli, database, tmp_path) as server:
        as_admin = Cli({**cli.env, "XDG_CONFIG_HOME": str(tmp_path / "config"), "VMKEEP_SERVER": server.url})
        as_admin.run("login", "admin", env={"VMKEEP_PASSWORD": ADMIN_PASSWORD})
        yield as_admin, server


def refused(cli: Cli, *args: str, env: dict[str, str] | None = None) -> str:
    """The error a command stops with (it must stop)."""
    proc = cli.run(*args, ok=False, env=env)
    assert proc.returncode != 0, proc.stdout
    return " ".join(proc.stderr.split())  # the message as one line, however the terminal wrapped it


def users(server: Server) -> set[str]:
    return {name for (name,) in _sql(server.database, "SELECT name FROM users")}


def test_accounts_tokens_and_the_audit_log(admin_cli: tuple[Cli, Server], tmp_path: Path) -> None:
    cli, server = admin_cli
    me = cli.json("whoami")
    assert (me["name"], me["role"], me["server"]) == ("admin", "admin", server.url)
    new = {"VMKEEP_NEW_PASSWORD": "account-password"}
    for name, role in (("otto", "operator"), ("root2", "admin"), ("p1", "proxy")):
        assert cli.json("user", "add", name, "--role", role, env=new) == {"user": name, "role": role}
    listed = {u["name"]: u["role"] for u in cli.json("user", "list")["users"]}
    assert listed == {"admin": "admin", "otto": "operator", "root2": "admin", "p1": "proxy"}

    # a proxy's account and its token file, without logging in as it by hand
    token_file = tmp_path / "proxy.token"
    made = cli.json("token", "create", "proxy-p1", "--user", "p1", "--days", "30", "--output", str(token_file),
                    env={"VMKEEP_PASSWORD": "account-password"})
    assert made["user"] == "p1" and made["token"] is None and made["file"] == str(token_file)
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    proxy_token = token_file.read_text().strip()
    assert server.client(proxy_token).get("/api/me").json()["role"] == "proxy"
    p1_tokens = [t["name"] for t in cli.json("token", "list", "--all")["tokens"] if t["user"] == "p1"]
    assert p1_tokens == ["proxy-p1"]  # the login it took to make it was logged out
    assert "name a new file" in refused(cli, "token", "create", "again", "--user", "p1", "--output",
                                        str(token_file), env={"VMKEEP_PASSWORD": "account-password"})

    script = cli.run("token", "create", "nightly-report", "--days", "7")
    assert "shown only this once" in script.stdout
    token = next(w for w in script.stdout.split() if w.startswith("vk_"))
    assert server.client(token).get("/api/me").json()["name"] == "admin"
    token_id = next(t["id"] for t in cli.json("token", "list")["tokens"] if t["name"] == "nightly-report")
    assert cli.json("token", "revoke", str(token_id)) == {"revoked": token_id}
    assert server.client(token).get("/api/me").status_code == 401

    # removing accounts: another admin yes; oneself and the last admin never, with the reason
    assert "own account" in refused(cli, "user", "delete", "admin")
    assert cli.json("user", "delete", "root2") == {"deleted": "root2"}
    assert cli.json("user", "delete", "p1") == {"deleted": "p1"}
    assert server.client(proxy_token).get("/api/me").status_code == 401  # its tokens went with it
    assert users(server) == {"admin", "otto"}
    on_catalog = {"VMKEEP_SERVER": "", "VMKEEP_DATABASE_URL": server.database}
    assert "last administrator" in refused(cli, "user", "delete", "admin", env=on_catalog)
    assert users(server) == {"admin", "otto"}
    assert {u["name"] for u in cli.json("user", "list", env=on_catalog)["users"]} == {"admin", "otto"}

    deleted = cli.json("audit", "list", "--user", "admin", "--action", "user-delete")["entries"]
    assert [e["target"] for e in deleted] == ["p1", "root2"]
    assert all(e["action"] == "user-delete" for e in deleted)
    assert cli.json("audit", "list", "--since", "2000-01-01", "--limit", "3")["entries"][0]["action"] == "user-delete"
    assert cli.json("audit", "verify")["ok"]  # through the server: it has no catalog URL here

    cli.json("logout")
    assert server.url not in json.loads((tmp_path / "config" / "vmkeep" / "tokens.json").read_text())
    assert "not logged in" in refused(cli, "whoami")


def _remove(caller: httpx.Client, target: str, at_once: threading.Barrier, replies: dict[str, int]) -> None:
    at_once.wait()
    replies[target] = caller.delete(f"/api/users/{target}").status_code


def test_two_administrators_removing_each_other_leave_one(admin_cli: tuple[Cli, Server]) -> None:
    """The last-admin rule holds under a race: both requests at once, one of them wins."""
    _cli, server = admin_cli
    name, survivor = "admin", server.client(server.login("admin", ADMIN_PASSWORD))
    for round_ in range(4):
        other = f"admin{round_}"
        assert survivor.post("/api/users", json={"name": other, "password": "account-password",
                                                 "role": "admin"}).status_code == 201
        callers = {name: survivor, other: server.client(server.login(other, "account-password"))}
        replies: dict[str, int] = {}
        at_once = threading.Barrier(2)
        threads = [threading.Thread(target=_remove, args=(callers[a], b, at_once, replies))
                   for a, b in ((name, other), (other, name))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        admins = {n for (n,) in _sql(server.database, "SELECT name FROM users WHERE role = 'admin'")}
        assert len(admins) == 1 and sorted(replies.values())[0] == 204, (replies, admins)
        assert sorted(replies.values())[1] in (401, 409), replies
        name = admins.pop()
        survivor = callers[name]


def test_inventory_repositories_proxies_policies_and_runs(admin_cli: tuple[Cli, Server], make_disk: Any,
                                                          tmp_path: Path) -> None:
    cli, server = admin_cli
    db = server.database
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    backed_up(cli, make_disk, repo, ["app-1", "app-1"])
    added = cli.json("repository", "add", "main", repo)  # the passphrase from VMKEEP_PASSPHRASE, sealed
    assert added == {"repository": "main", "points": 2, "removed": 0, "damaged": []}
    assert "registered already" in refused(cli, "repository", "add", "again", repo)
    [listed] = cli.json("repository", "list")["repositories"]
    assert listed["name"] == "main" and listed["points"] == 2 and listed["encrypted"]
    backed_up(cli, make_disk, repo, ["app-1"])
    assert cli.json("repository", "rebuild", "main")["points"] == 3
    assert "main" in cli.run("repository", "list").stdout

    # a hypervisor: added and discovered, restore locations, VMs, deleted
    hv = cli.json("hypervisor", "add", "local", "--uri", "qemu:///system")
    assert hv["name"] == "local" and hv["discovery"]["hypervisor"] == "local"
    assert cli.json("hypervisor", "discover", "local")["vms"] == hv["discovery"]["vms"]
    vms = cli.json("vms", "--hypervisor", "local")["vms"]
    assert len(vms) == hv["discovery"]["vms"] and all(v["hypervisor"] == "local" for v in vms)
    where = cli.json("hypervisor", "restore-locations", "local", "/srv/restores", "/var/tmp/restores")
    assert where == {"hypervisor": "local", "restore_locations": ["/srv/restores", "/var/tmp/restores"]}
    assert cli.json("hypervisor", "restore-locations", "local")["restore_locations"] == where["restore_locations"]
    assert cli.json("hypervisor", "restore-locations", "local", "--clear")["restore_locations"] == []

    # a policy, changed option by option
    created = cli.json("policy", "create", "nightly", "--repository", "main", "--globs", "app-*", "--keep-last", "3")
    assert created["retention"] == {"last": 3} and created["schedule"] is None
    changed = cli.json("policy", "update", "nightly", "--schedule", "0 3 * * *", "--keep-daily", "7",
                       "--verify-after")
    assert changed["retention"] == {"last": 3, "daily": 7} and changed["schedule"] == "0 3 * * *"
    assert changed["verify_after"] and changed["globs"] == ["app-*"] and changed["repository"] == "main"
    assert changed["next_run"]
    cleared = cli.json("policy", "update", "nightly", "--schedule", "", "--keep-last", "0")
    assert cleared["schedule"] is None and cleared["next_run"] is None and cleared["retention"] == {"daily": 7}
    assert "no policy nope" in refused(cli, "policy", "update", "nope", "--keep-last", "1")

    # a repository in use stays, and says what uses it
    assert "policies nightly back up into it" in refused(cli, "repository", "delete", "main")
    (job_id,) = _sql(db, "INSERT INTO jobs (policy_id, policy_name, requested_by, status) SELECT id, 'nightly', "
                         "'admin', 'running' FROM policies WHERE name = 'nightly' RETURNING id")[0]
    _sql(db, "INSERT INTO job_vms (job_id, vm_name, proxy, status, attempts, warnings) "
             "VALUES (:job, 'app-1', 'p9', 'running', 1, '[]')", job=job_id)
    assert f"runs {job_id} are going" in refused(cli, "repository", "delete", "main")
    assert cli.json("jobs", str(job_id))["status"] == "running"

    # a proxy that is up, or has work, stays
    register = {"name": "p9", "transports": ["nbd"], "reaches": ["*"], "concurrency": 1}
    assert server.client(server.login("admin", ADMIN_PASSWORD)).post("/api/proxies/register",
                                                                      json=register).status_code == 200
    [proxy] = cli.json("proxies", "list")["proxies"]
    assert proxy["name"] == "p9" and proxy["up"]
    assert "proxy p9 is up" in refused(cli, "proxies", "delete", "p9")
    _sql(db, "UPDATE proxies SET last_heartbeat = now() - interval '1 minute'")
    assert f"still has work assigned (runs {job_id})" in refused(cli, "proxies", "delete", "p9")
    assert [p["name"] for p in cli.json("proxies", "list")["proxies"]] == ["p9"]

    # the run ends; a restore from the repository is under way
    _sql(db, "UPDATE job_vms SET status = 'failed', error = 'test'")
    (empty_run,) = _sql(db, "INSERT INTO jobs (policy_id, policy_name, requested_by, status) SELECT id, 'nightly', "
                            "'admin', 'running' FROM policies WHERE name = 'nightly' RETURNING id")[0]
    cancelled = cli.json("jobs", "cancel", str(empty_run))
    assert cancelled["id"] == empty_run and cancelled["finished"]
    assert "say which run" in refused(cli, "jobs", "cancel")
    assert "give a run's id" in refused(cli, "jobs", "last")
    _sql(db, "UPDATE jobs SET status = 'failed', finished = now()")
    (restore_id,) = _sql(
        db, "INSERT INTO restore_jobs (requested_by, vm_name, point_id, repository_id, repository_name, hypervisor_id, "
            "hypervisor_name, mode, new_name, start_vm, proxy, status, attempts, warnings) SELECT 'admin', 'app-1', "
            "'0123abcd', r.id, r.name, h.id, h.name, 'as-new', 'app-copy', false, 'p9', 'running', 1, '[]' "
            "FROM repositories r, hypervisors h RETURNING id")[0]
    assert f"restores {restore_id}" in refused(cli, "proxies", "delete", "p9")
    _sql(db, "UPDATE restore_jobs SET status = 'succeeded', finished = now()")
    # a VM running instantly from a point on its machine, a repository verify on its queue: still its work
    (instant_id,) = _sql(
        db, "INSERT INTO restore_jobs (requested_by, vm_name, point_id, repository_id, repository_name, hypervisor_id, "
            "hypervisor_name, mode, new_name, start_vm, proxy, status, attempts, warnings) SELECT 'admin', 'app-1', "
            "'0123abcd', r.id, r.name, h.id, h.name, 'instant', 'app-now', true, 'p9', 'instant', 1, '[]' "
            "FROM repositories r, hypervisors h RETURNING id")[0]
    (verify_id,) = _sql(db, "INSERT INTO maintenance_runs (repository_id, repository_name, kind, requested_by, proxy, "
                            "status) SELECT id, name, 'verify', 'admin', 'p9', 'queued' FROM repositories "
                            "RETURNING id")[0]
    assert f"restores {instant_id} and maintenance runs {verify_id}" in refused(cli, "proxies", "delete", "p9")
    _sql(db, "UPDATE restore_jobs SET status = 'discarded', finished = now() WHERE id = :id", id=instant_id)
    _sql(db, "UPDATE maintenance_runs SET status = 'failed', error = 'test', finished = now()")
    assert cli.json("proxies", "delete", "p9") == {"deleted": "p9"}
    assert cli.json("proxies", "list")["proxies"] == []

    # a repository freed of its policy leaves the catalog; its restores' history stays
    assert cli.json("policy", "delete", "nightly") == {"deleted": "nightly"}
    assert cli.json("repository", "delete", "main") == {"deleted": "main"}
    assert cli.json("repository", "list")["repositories"] == []
    restore = next(r for r in cli.json("restores")["restores"] if r["id"] == restore_id)
    assert restore["repository"] == "main" and restore["new_name"] == "app-copy"
    assert cli.json("restores", str(restore_id))["status"] == "succeeded"
    assert f"restore {restore_id}: app-1@0123abcd from main" in " ".join(cli.run("restores", str(restore_id))
                                                                        .stdout.split())
    assert cli.json("points")["points"] == []  # the catalog's; the repository keeps them
    assert cli.json("repository", "add", "main", repo)["points"] == 3  # and gives them back

    assert cli.json("hypervisor", "delete", "local") == {"deleted": "local"}
    assert cli.json("hypervisor", "list")["hypervisors"] == []
    actions = {(e["action"], e["target"]) for e in cli.json("audit", "list", "--limit", "1000")["entries"]}
    assert {("repository-delete", "main"), ("proxy-delete", "p9"), ("hypervisor-delete", "local"),
            ("policy-change", "nightly"), ("job-cancel", str(empty_run))} <= actions
