"""Backup copies through the server, with a real proxy and a bare VM: a policy copies each run's
new point into a second repository right after its backups, the target's own retention prunes
only the target, a cron target sends nothing its retention would prune again, a copy starts on
demand (the client command; refused while one is going), the catalog and the console list where
each point exists; an after-backup target that missed copies (unusable, then failing part-way,
what arrived still cataloged) catches up with the next one, which waits for a copy under way. A
restore through the server reads the copy when the primary's index of the point is damaged, the
primary when only another point's manifest is (--from-repository), and the copy, bit for bit,
once the policy's repository is deleted from the disk. A copy target naming an unknown
repository is refused and changes nothing.

One master, proxy and VM for the module (heavy: run under ``flock /tmp/vmkeep-heavy.lock``).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
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
    points: dict[str, str] = field(default_factory=dict)  # label -> point id, across the tests
    images: dict[str, Path] = field(default_factory=dict)  # label -> the disk as it was backed up


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


def copy_ended(api: httpx.Client, count: int, status: str = "succeeded") -> dict[str, Any]:
    """The newest copy run once there are ``count`` and it has ended, with ``status``."""
    run = wait_for(f"copy run {count}", lambda: len(runs := copies(api)) >= count and runs[0]["finished"]
                   and runs[0], timeout=120)
    assert len(copies(api)) == count and run["status"] == status, run["error"]
    return dict(run)


def sql(master: Server, statement: str, **params: Any) -> Any:
    """One statement on the master's catalog; its first value, if it returns rows."""
    engine = create_engine(master.database)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


def flip(path: Path, at: int = 64) -> None:
    """Damage a stored object: a few bytes inverted."""
    data = bytearray(path.read_bytes())
    data[at:at + 4] = bytes(b ^ 0xFF for b in data[at:at + 4])
    path.write_bytes(bytes(data))


def restored(api: httpx.Client, lab: Lab, body: dict[str, Any]) -> dict[str, Any]:
    """A restore through the server as a new VM on the local host, followed to its end."""
    reply = api.post("/api/restores", json={"vm": lab.vm.name, "hypervisor": "local",
                                            "storage": str(lab.folder / "restored"), "start": False, **body})
    assert reply.status_code == 202, reply.text
    lab.vm.extra.append(body["as_name"])
    done = wait_for("the restore", lambda: (r := api.get(f"/api/restores/{reply.json()['id']}").json())[
        "finished"] and r, timeout=120)
    assert done["status"] == "succeeded", done
    return dict(done)


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

    lab.points.update(first=first, second=second)
    lab.images["second"] = at_backup

    # on a cron: the target lacks the pruned point, but its retention would prune it again: not sent
    changed = client_cli(console_master).json("policy", "copy-to", "nightly", "offsite", "--when", "0 3 * * *",
                                              "--keep-last", "1")
    assert changed["copy_targets"][0]["next_run"], changed
    sql(console_master, "UPDATE policy_copy_targets SET next_run = now() - interval '1 minute'")  # its time came
    due = wait_for("the cron's next time", lambda: datetime.fromisoformat(
        d := console_api.get("/api/policies").json()[0]["copy_targets"][0]["next_run"]) > datetime.now(UTC) and d)
    time.sleep(1)  # a copy would be queued right after its next time is set
    assert len(copies(console_api)) == 2, copies(console_api)[0]
    assert where(console_api, vm) == {second: ["main", "offsite"], first: ["main"]}
    assert sorted(p.stem for p in (lab.offsite / "points" / vm).glob("*.json")) == [second], due

    # on demand: the pruned point back into the target (only its own chunks travel)
    run = client_cli(console_master).json("repository", "copy", "main", "offsite", "--point", first[:-2])
    assert run == copy_ended(console_api, 3)
    assert run["result"]["points_copied"] == [f"{vm}@{first}"] and "prune" not in run["result"], run
    assert where(console_api, vm) == {second: ["main", "offsite"], first: ["main", "offsite"]}
    page = console_page(console_master, f"/points/vm/{vm}")
    assert page.count('data-label="Copies">offsite</td>') == 2



def test_an_after_backup_target_catches_up_on_what_it_missed(console_master: Server, console_api: httpx.Client,
                                                             lab: Lab) -> None:
    vm = lab.vm.name
    client_cli(console_master).json("policy", "copy-to", "nightly", "offsite", "--keep-last", "4")  # after-backup
    # the target cannot be opened for one run: the copy fails saying so, nothing is cataloged
    config = lab.offsite / "config.json"
    config.rename(lab.folder / "offsite-config.json")
    try:
        third = run_to_end(console_api, "nightly", {vm: "queued"})[vm]["point_id"]
        run = copy_ended(console_api, 4, "failed")
        assert "cannot open the copy's target repository offsite" in run["error"], run
    finally:
        (lab.folder / "offsite-config.json").rename(config)
    assert where(console_api, vm)[third] == ["main"]

    # the next copy sends the missed point too, then fails part-way: what arrived is cataloged
    lab.vm.write("vda", 20 * MiB, 4 * MiB, 0x43)  # chunks the target lacks: their directory refuses them
    chunk_dirs = [lab.offsite / "chunks", *(p for p in (lab.offsite / "chunks").iterdir() if p.is_dir())]
    subprocess.run(["chattr", "+i", *map(str, chunk_dirs)], check=True)
    try:
        fourth = run_to_end(console_api, "nightly", {vm: "queued"})[vm]["point_id"]
        run = copy_ended(console_api, 5, "failed")
    finally:
        subprocess.run(["chattr", "-i", *map(str, chunk_dirs)], check=True)
    assert f"{vm}@{fourth}" in run["error"] and "1 points copied before this stay" in run["error"], run["error"]
    assert run["params"]["points"] == [f"{vm}@{third}", f"{vm}@{fourth}"], run["params"]
    assert where(console_api, vm)[third] == ["main", "offsite"] and where(console_api, vm)[fourth] == ["main"]

    # one copy per source and target: on demand refused, a policy's waits for the one going
    going = sql(console_master, "INSERT INTO maintenance_runs (repository_id, repository_name, kind, params, "
                "requested_by, status, target_repository_id, target_repository_name) SELECT s.id, s.name, 'copy', "
                "'{}', 'test', 'running', t.id, t.name FROM repositories s, repositories t WHERE s.name = 'main' "
                "AND t.name = 'offsite' RETURNING id")
    try:
        refused = console_api.post("/api/repositories/main/copy", json={"target": "offsite"})
        assert refused.status_code == 409 and "already going" in refused.json()["detail"], refused.text
        lab.vm.write("vda", 28 * MiB, 2 * MiB, 0x44)
        lab.images["fifth"] = lab.vm.snapshot("vda", lab.folder / "at-fifth-backup.qcow2")
        fifth = run_to_end(console_api, "nightly", {vm: "queued"})[vm]["point_id"]
        wait_for("the copy target marked due", lambda: console_api.get("/api/policies").json()[0]["copy_targets"][0][
            "next_run"])
        assert len(copies(console_api)) == 6  # the five and the one going: nothing queued
    finally:
        sql(console_master, "DELETE FROM maintenance_runs WHERE id = :id", id=going)
    run = copy_ended(console_api, 6)
    assert run["result"]["points_copied"] == [f"{vm}@{fourth}", f"{vm}@{fifth}"], run
    assert run["result"]["prune"]["names"][vm]["remove"] == [lab.points["first"]], run
    assert console_api.get("/api/policies").json()[0]["copy_targets"][0]["next_run"] is None
    assert all(where(console_api, vm)[p] == ["main", "offsite"] for p in (third, fourth, fifth))
    lab.points.update(third=third, fifth=fifth)


def test_restores_read_a_healthy_copy_of_the_point(console_master: Server, console_api: httpx.Client,
                                                   lab: Lab) -> None:
    vm, points = lab.vm.name, lab.points
    # the primary's index of the point is damaged (its manifest reads fine): the copy is read
    flip(next((lab.main / "indexes" / vm / points["second"]).glob("*.idx")))
    done = restored(console_api, lab, {"as_name": f"{vm}-i", "point": points["second"]})
    assert (done["point"], done["repository"], done["restored_from"]) == (points["second"], "main", "offsite"), done
    assert any("offsite" in w and "main" in w for w in done["warnings"]), done
    assert qemu_img_compare(lab.images["second"], Path(done["disks"]["vda"]))

    # another point's manifest damaged in the primary: this point is still read from there, when asked
    flip(lab.main / "points" / vm / f"{points['third']}.json", at=8)
    cli = client_cli(console_master)
    out = cli.json("restore", f"{vm}@{points['fifth']}", "--hypervisor", "local", "--as", f"{vm}-m", "--storage",
                   str(lab.folder / "restored"), "--no-start", "--from-repository", "main")
    lab.vm.extra.append(f"{vm}-m")
    assert (out["status"], out["restored_from"]) == ("succeeded", "main"), out
    assert qemu_img_compare(lab.images["fifth"], Path(out["disks"]["vda"]))

    # the policy's repository is lost entirely: the restore reads the copy
    shutil.rmtree(lab.main)
    done = restored(console_api, lab, {"as_name": f"{vm}-c"})
    assert (done["point"], done["repository"], done["restored_from"]) == (points["fifth"], "main", "offsite"), done
    assert any("copy in repository offsite" in w and "main" in w for w in done["warnings"]), done
    assert qemu_img_compare(lab.images["fifth"], Path(done["disks"]["vda"]))
    assert "read from its copy in offsite" in console_page(console_master, f"/restores/{done['id']}")
