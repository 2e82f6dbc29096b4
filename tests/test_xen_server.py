"""A XenServer / XCP-ng pool on the master: registered with its password sealed, discovered with
its VMs' own tags, the VM a policy picks by tag backed up by a proxy through XAPI, and restored
through the server as a new VM on the network and host picked from the pool's restore choices
(the lab's simulator: real images, NBD over TLS)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cli, MiB, free_port, qemu_img_compare
from vmkeep.lab import xapi


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[xapi.Xapi]:
    state = tmp_path_factory.mktemp("xapi-server")
    started = xapi.start(f"127.0.0.1:{free_port()}", lab_vm=False, state=state)
    try:
        yield started
    finally:
        xapi.stop(state)


def test_policy_run_by_a_proxy_through_the_server(cli: Cli, sim: xapi.Xapi, database: str, tmp_path: Path) -> None:
    """The master registers the pool (password sealed), discovers its VMs with their SRs, and a
    proxy backs a XAPI VM up for a policy; the restore point is the VM's disk as it was."""
    from tests.test_scale_out import register_discovered, run_to_end, start_proxy, stop, wait_for
    from tests.test_server import ADMIN_PASSWORD, launch

    uuid = xapi.create_vm(sim, "xen-policy", 64 * MiB, running=True)
    xapi.create_vm(sim, "xen-untagged", 16 * MiB, running=False)
    pool = xapi.session(sim)
    try:
        pool.xenapi.VM.add_tags(pool.xenapi.VM.get_by_uuid(uuid), "backup-gold")
    finally:
        pool.xenapi.session.logout()
    disk = xapi.disks(sim, uuid)["xvda"]
    xapi.guest_write(sim, disk, 3 * MiB, b"policy data " * 4096)
    at_backup = tmp_path / "at-backup.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(xapi.image(sim, disk)), str(at_backup)], check=True)
    cli.env.update(sim.env())
    password = cli.env.pop("VMKEEP_HOST_PASSWORD")  # the master's sealed copy is the only one
    with launch(cli, database, tmp_path) as master:
        admin = master.client(master.login("admin", ADMIN_PASSWORD))
        repo, vms = register_discovered(cli, admin, tmp_path, "pool", "xen", sim.address, password)
        assert vms["xen-policy"]["disks"][0]["datastore"] == "Local storage", vms["xen-policy"]
        assert vms["xen-policy"]["tags"] == ["backup-gold"] and vms["xen-untagged"]["tags"] == []
        assert not any(v.get("name", "").startswith("Control domain") for v in vms.values())
        assert admin.post("/api/policies", json={"name": "xen", "repository": "main", "tags": ["backup-gold"],
                                                 "transports": "nbd"}).status_code == 201
        token = admin.post("/api/tokens", json={"name": "proxy"}).json()["token"]
        proxy = start_proxy(master, token, "p1", reaches="*", transports="nbd")
        try:
            wait_for("the proxy", lambda: any(p["up"] for p in admin.get("/api/proxies").json()))
            done = run_to_end(admin, "xen", {"xen-policy": "queued"})["xen-policy"]
            assert done["mode"] == "full", done
            # back as a new VM through the same proxy, on a network and host picked from the choices
            choices = admin.get("/api/hypervisors/pool/restore-choices").json()
            assert (choices["networks"], choices["hosts"], choices["error"]) == (
                ["Lab network 1", "Pool-wide network associated with eth0"], ["xen1", "xen2"], None), choices
            job = admin.post("/api/restores", json={"vm": "xen-policy", "point": done["point_id"], "hypervisor": "pool",
                                                    "as_name": "xen-policy-copy", "network": "Lab network 1",
                                                    "host": "xen2"})
            assert job.status_code == 202, job.text
            restored = wait_for("the restore", lambda: (r := admin.get(f"/api/restores/{job.json()['id']}").json())
                                ["finished"] and r, timeout=120)
            assert restored["status"] == "succeeded", restored
        finally:
            stop(proxy)
        out = tmp_path / "restored.raw"
        cli.run("restore", f"xen-policy@{done['point_id']}", "--repo", repo, "--disk", "xvda", "--output", str(out),
                "--format", "raw")
        assert qemu_img_compare(at_backup, out)
    pool = xapi.session(sim)
    try:
        x = pool.xenapi
        (copy,) = x.VM.get_by_name_label("xen-policy-copy")
        assert x.host.get_name_label(x.VM.get_resident_on(copy)) == "xen2"
        assert [x.network.get_name_label(x.VIF.get_network(v)) for v in x.VM.get_VIFs(copy)] == ["Lab network 1"]
        copy_disks = xapi.disks(sim, x.VM.get_uuid(copy))
    finally:
        pool.xenapi.session.logout()
    assert subprocess.run(["qemu-img", "compare", "-U", "-q", "-f", "raw", "-F", "qcow2", str(at_backup),
                           str(xapi.image(sim, copy_disks["xvda"]))]).returncode == 0
    assert xapi.attached(sim) == []
