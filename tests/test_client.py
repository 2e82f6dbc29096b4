"""`vmkeep --server URL …`: the command line as a client of a running server."""

from __future__ import annotations

import json
from pathlib import Path

from tests import bare_vm
from tests.conftest import Cli, MiB, qemu_img_compare
from tests.test_scale_out import start_proxy, stop, wait_for
from tests.test_server import ADMIN_PASSWORD, launch


def test_login_register_policy_run_and_points(cli: Cli, database: str, tmp_path: Path) -> None:
    with launch(cli, database, tmp_path) as server, bare_vm.running({"vda": (32 * MiB, "qcow2")}) as machine:
        machine.write("vda", 0, 4 * MiB, 0x77)
        env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "VMKEEP_SERVER": server.url}
        refused = cli.run("jobs", ok=False, env=env)
        assert refused.returncode != 0 and "login" in refused.stderr
        cli.run("login", "admin", env={**env, "VMKEEP_PASSWORD": ADMIN_PASSWORD})
        tokens = tmp_path / "config" / "vmkeep" / "tokens.json"
        assert oct(tokens.stat().st_mode & 0o777) == "0o600" and server.url in json.loads(tokens.read_text())

        repo = str(tmp_path / "repo")
        del cli.env["VMKEEP_PASSPHRASE"]  # plain: a passphrase given to it is refused
        cli.run("repo", "init", repo)
        admin = server.client(server.login("admin", ADMIN_PASSWORD))
        assert admin.post("/api/repositories", json={"name": "main", "location": repo}).status_code == 201
        added = cli.json("hypervisor", "add", "local", "--uri", "qemu:///system", env=env)
        assert added["discovery"]["vms"] >= 1
        created = cli.json("policy", "create", "daily", "--repository", "main", "--vms", machine.name,
                           "--transports", "hotadd", "--keep-last", "2", "--schedule", "0 22 * * *", env=env)
        assert created["next_run"] and created["retention"] == {"last": 2}
        bad = cli.run("policy", "create", "odd", "--repository", "nowhere", env=env, ok=False)
        assert bad.returncode != 0 and "no repository nowhere" in bad.stderr

        token = admin.post("/api/tokens", json={"name": "proxy"}).json()["token"]
        proxy = start_proxy(server, token, "p1")
        try:
            wait_for("the proxy", lambda: any(p["up"] for p in admin.get("/api/proxies").json()))
            at_backup = machine.snapshot("vda", tmp_path / "at-backup.qcow2")
            run = cli.json("policy", "run", "daily", env=env)  # follows the run to its end
            assert run["status"] == "succeeded" and run["vms"][0]["mode"] == "full"

            # a restore through the server, run by the proxy on the hypervisor's host
            copy = f"{machine.name}-copy"
            machine.extra.append(copy)
            no_where = cli.run("restore", machine.name, "--as", copy, env=env, ok=False)
            assert no_where.returncode != 0 and "--hypervisor" in no_where.stderr
            # restores write only where an administrator allowed it on the hypervisor
            outside = cli.run("restore", machine.name, "--hypervisor", "local", "--as", copy, "--storage",
                              str(tmp_path / "copy"), "--no-start", env=env, ok=False)
            assert outside.returncode != 0 and "restore locations" in outside.stderr, outside.stderr
            assert admin.get("/api/restores").json() == []
            assert admin.put("/api/hypervisors/local/restore-locations",
                             json={"locations": [str(tmp_path)]}).status_code == 200
            restored = cli.json("restore", machine.name, "--hypervisor", "local", "--as", copy, "--storage",
                                str(tmp_path / "copy"), "--no-start", env=env)
            assert restored["status"] == "succeeded" and restored["proxy"] == "p1", restored
            assert qemu_img_compare(at_backup, Path(restored["disks"]["vda"]))
            assert any(e["action"] == "restore-start" for e in admin.get("/api/audit").json())
        finally:
            stop(proxy)
        jobs = cli.json("jobs", env=env)["jobs"]
        assert [j["id"] for j in jobs] == [run["id"]]
        points = cli.json("points", machine.name, env=env)["points"]
        assert [p["point_id"] for p in points] == [run["vms"][0]["point_id"]]
        assert "daily" in cli.run("policy", "list", env=env).stdout
        assert cli.json("policy", "delete", "daily", env=env) == {"deleted": "daily"}
        assert "daily" not in cli.run("policy", "list", env=env).stdout
        assert cli.json("jobs", env=env)["jobs"][0]["policy"] == "daily"  # its history stays
        local = cli.json("points", machine.name, "--repo", repo)["points"]  # the local command still works
        assert [p["point"] for p in local] == [run["vms"][0]["point_id"]]
