"""Where a restore as a new VM puts the VM's network cards: on a libvirt network the user chose
(checked against the host's networks), or none at all ("disconnected"); the choices the server
lists for a hypervisor; a restore through the server and a real proxy onto the chosen network."""

from __future__ import annotations

import json
import re
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from pyVmomi import vim
from sqlalchemy import create_engine, event, text
from sqlalchemy.orm import Session

from tests import bare_vm
from tests.bare_vm import virsh
from tests.conftest import Cli, MiB, fresh_cli
from tests.console_support import AUDITOR, log_in, shoot
from tests.test_scale_out import start_proxy, stop, wait_for
from tests.test_server import Server
from tests.test_vsphere import _connector, backup, env, new_vm, sim, vm_props  # noqa: F401
from tests.test_vsphere import session as vsphere_session
from vmkeep.catalog.db import upgrade
from vmkeep.hypervisors.base import RestoreChoices
from vmkeep.lab import vcsim


@contextmanager
def isolated_network() -> Iterator[str]:
    """A libvirt network of its own (a bridge with no forwarding: it reaches nothing), removed after."""
    suffix = secrets.token_hex(3)
    name = f"vmkeep-t-net-{suffix}"
    xml = f"<network><name>{name}</name><bridge name='vkt{suffix}'/></network>"
    path = Path(f"/tmp/{name}.xml")
    path.write_text(xml)
    try:
        virsh("net-define", str(path))
        virsh("net-start", name)
        yield name
    finally:
        virsh("net-destroy", name, check=False)
        virsh("net-undefine", name, check=False)
        path.unlink(missing_ok=True)


def interfaces(name: str) -> list[ET.Element]:
    return ET.fromstring(virsh("dumpxml", name)).findall("./devices/interface")


def test_libvirt_restore_onto_a_chosen_network_or_none(cli: Cli, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    with bare_vm.running({"vda": (16 * MiB, "qcow2")}) as vm, isolated_network() as network:
        vm.write("vda", 0, MiB, 0x3a)
        point = json.loads(cli.run("backup", vm.name, "--repo", repo, "--json").stdout)["vms"][0]["point"]
        storage = str(bare_vm.IMAGES / vm.name / "copies")
        assert [i.get("type") for i in interfaces(vm.name)] == ["user"]

        # every interface on the network chosen, and the copy runs there
        on_net = f"{vm.name}-n"
        vm.extra.append(on_net)
        cli.json("restore", f"{vm.name}@{point}", "--repo", repo, "--as", on_net, "--storage", storage,
                 "--network", network)
        ifaces = interfaces(on_net)
        assert [(i.get("type"), i.find("source").get("network")) for i in ifaces] == [("network", network)]
        assert ifaces[0].find("mac").get("address") != bare_vm.MAC
        assert ifaces[0].find("model").get("type") == "virtio"
        assert "running" in virsh("domstate", on_net)

        # disconnected: no interface at all
        alone = f"{vm.name}-0"
        vm.extra.append(alone)
        cli.json("restore", f"{vm.name}@{point}", "--repo", repo, "--as", alone, "--storage", storage,
                 "--network", "none", "--no-start")
        assert interfaces(alone) == []

        # an unknown network: refused with the host's networks, before anything is written
        refused = cli.run("restore", f"{vm.name}@{point}", "--repo", repo, "--as", f"{vm.name}-x",
                          "--storage", storage, "--network", "no-such-net", ok=False)
        assert refused.returncode != 0
        assert "no libvirt network 'no-such-net'" in refused.stderr and network in refused.stderr
        assert f"{vm.name}-x" not in virsh("list", "--all", "--name")
        assert not list(Path(storage).glob(f"{vm.name}-x*"))

        # a vSphere-only choice is refused too
        refused = cli.run("restore", f"{vm.name}@{point}", "--repo", repo, "--as", f"{vm.name}-y",
                          "--storage", storage, "--folder", "DC0/x", ok=False)
        assert refused.returncode != 0 and "folder" in refused.stderr
        assert f"{vm.name}-y" not in virsh("list", "--all", "--name")


def test_a_restore_through_the_server_goes_onto_the_chosen_network(chromium: Any, console_master: Server,
                                                                   console_api: httpx.Client, tmp_path: Path) -> None:
    """The hypervisor's networks listed by the API and in the wizard's select (text fields when it
    cannot be asked); the network chosen in the wizard stored on the restore, and a real proxy's
    copy defined on it."""
    cli = fresh_cli()
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    with bare_vm.running({"vda": (16 * MiB, "qcow2")}) as vm, isolated_network() as network:
        vm.write("vda", 0, MiB, 0x5d)
        point = json.loads(cli.run("backup", vm.name, "--repo", repo, "--json").stdout)["vms"][0]["point"]
        assert console_api.post("/api/repositories", json={"name": "main", "location": repo, "passphrase":
                                                           cli.env["VMKEEP_PASSPHRASE"]}).status_code == 201
        for name, uri in (("local", "qemu:///system"), ("far", "qemu+tls://192.0.2.7/system")):
            reply = console_api.post("/api/hypervisors", json={"name": name, "kind": "libvirt", "uri": uri})
            assert reply.status_code == 201, reply.text
        place = bare_vm.IMAGES / vm.name
        assert console_api.put("/api/hypervisors/local/restore-locations",
                               json={"locations": [str(place)]}).status_code == 200

        # the lists, asked of the hypervisor; one that cannot be asked says why, with empty lists
        choices = console_api.get("/api/hypervisors/local/restore-choices").json()
        assert network in choices["networks"] and choices["hosts"] == [] and choices["error"] is None, choices
        assert choices["disconnected"] == "none"
        far = console_api.get("/api/hypervisors/far/restore-choices").json()
        assert far["networks"] == [] and "type the names instead" in far["error"], far
        assert console_api.get("/api/hypervisors/nowhere/restore-choices").status_code == 404
        with console_master.client(console_master.login(*AUDITOR)) as auditor:
            assert auditor.get("/api/hypervisors/local/restore-choices").status_code == 403
        audrey = log_in(chromium, console_master, *AUDITOR)  # nor the console's part of the wizard
        try:
            part = audrey.request.get(f"{console_master.url}/points/restore-choices?hypervisor=local")
            assert part.status == 403 and network not in part.text()
        finally:
            audrey.context.close()

        # a network is a new VM's choice: refused over the original, nothing queued
        before = console_api.get("/api/restores").json()
        refused = console_api.post("/api/restores", json={"vm": vm.name, "point": point, "hypervisor": "local",
                                                          "overwrite": True, "network": network})
        assert refused.status_code == 400 and "only a restore as a new VM" in refused.text
        assert console_api.get("/api/restores").json() == before

        token = console_api.post("/api/tokens", json={"name": "placement"}).json()["token"]
        proxy = start_proxy(console_master, token, "pn")
        copy = f"{vm.name}-w"
        vm.extra.append(copy)
        page = log_in(chromium, console_master)
        try:
            wait_for("proxy pn up", lambda: any(p["name"] == "pn" and p["up"]
                                                for p in console_api.get("/api/proxies").json()), timeout=60)
            page.goto(f"{console_master.url}/points/vm/{vm.name}/restore?point={point}")
            page.locator("select#network").wait_for(timeout=15000)  # local's networks, asked when the page opened
            page.get_by_label("Hypervisor").select_option("far")  # text fields, with the reason
            page.locator("#place-note").filter(has_text="type the names instead").wait_for(timeout=15000)
            assert page.get_by_role("textbox", name="Network").is_visible()
            page.get_by_label("Hypervisor").select_option("local")  # the select again, with its networks
            select = page.locator("select#network")
            select.wait_for(timeout=15000)
            labels = select.locator("option").all_inner_texts()
            assert labels[:2] == ["Keep the original's", "Disconnected (no network cards)"] and network in labels
            assert page.locator("#host").count() == 0  # one libvirt host: no host to choose
            page.get_by_label("Name of the new VM").fill(copy)
            page.get_by_label("Storage (where its disks go)").fill(str(place / "copies"))
            select.select_option(network)
            shoot(page, "restore-wizard-network")
            page.get_by_role("button", name="Start the restore").click()
            page.wait_for_url(re.compile(r"/restores/\d+$"))
            page.locator("[data-fact=status]").filter(has_text="succeeded").wait_for(timeout=120_000)
            assert page.locator("[data-fact=network]").inner_text() == network

            # the command line through the server: --network none, a copy without network cards
            admin_token = console_api.post("/api/tokens", json={"name": "cli"}).json()["token"]
            alone = f"{vm.name}-c"
            vm.extra.append(alone)
            done = cli.json("restore", f"{vm.name}@{point}", "--hypervisor", "local", "--as", alone, "--storage",
                            str(place / "copies"), "--network", "none", "--no-start",
                            env={"VMKEEP_SERVER": console_master.url, "VMKEEP_TOKEN": admin_token})
            assert (done["status"], done["network"]) == ("succeeded", "none") and interfaces(alone) == []
        finally:
            page.context.close()
            stop(proxy)
        job = next(r for r in console_api.get("/api/restores").json() if r["new_name"] == copy)
        assert (job["new_name"], job["network"], job["host"], job["status"]) == (copy, network, None, "succeeded")
        started = console_api.get("/api/audit", params={"action": "restore-start"}).json()
        assert [e["detail"].get("network") for e in started][:2] == ["none", network]  # newest first
        ifaces = interfaces(copy)
        assert [(i.get("type"), i.find("source").get("network")) for i in ifaces] == [("network", network)]


def test_points_are_found_by_id_and_prefix_through_the_index(database: str) -> None:
    """begin_restore's "point id or unique prefix" and file_access.find_point's id read
    ix_restore_points_point_id (migration 0018), not every point: the plans of the statements they
    really send, on the catalog bench's rows."""
    from bench.catalog_bench import fill
    from vmkeep.server.file_access import find_point
    from vmkeep.server.routes_restore import RestoreIn, _point

    upgrade(database)
    fill(database, 200, 200_000)
    engine = create_engine(database)
    sent: list[tuple[str, Any]] = []
    event.listen(engine, "before_cursor_execute",
                 lambda _c, _cur, statement, parameters, _ctx, _many: sent.append((statement, parameters)))
    try:
        with Session(engine) as session:
            session.execute(text("ANALYZE restore_points"))
            name, point_id = session.execute(text("SELECT name, point_id FROM restore_points "
                                                  "ORDER BY id OFFSET 100000 LIMIT 1")).one()
            sent.clear()
            found = _point(session, RestoreIn(vm=name, point=point_id[:-2], hypervisor="dc1", as_name="x"), "as-new")
            assert found.point_id == point_id
            assert find_point(session, point_id).point_id == point_id
            lookups = [(s, p) for s, p in sent if "FROM restore_points" in s]
            assert len(lookups) == 2, sent
            for statement, parameters in lookups:
                plan = "\n".join(session.connection().exec_driver_sql("EXPLAIN " + statement, parameters).scalars())
                assert "ix_restore_points_point_id" in plan and "Seq Scan on restore_points" not in plan, plan
    finally:
        engine.dispose()


def test_vsphere_lists_its_choices_and_restores_onto_one_or_none(
        cli: Cli, sim: vcsim.Vcsim, env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """vSphere (the simulator) has the RestoreChoices capability too: networks and port groups,
    hosts, VM folders; a copy restored onto one network has every card there, and with "none" it
    has no network card at all."""
    new_vm(sim, "vc-place", networks=("VM Network", "DC0_DVPG0"))
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    backup(cli, sim.address, "vc-place", repo)
    connector = _connector(sim)
    try:
        assert isinstance(connector, RestoreChoices)
        choices = connector.restore_choices()
    finally:
        connector.close()
    assert {"VM Network", "DC0_DVPG0"} <= set(choices["networks"]), choices
    assert choices["hosts"] and all(h for h in choices["hosts"]) and "DC0" in choices["folders"], choices

    def cards(vm: str) -> list[Any]:
        return [d for d in vm_props(sim, vm, ["config.hardware.device"])["config.hardware.device"]
                if isinstance(d, vim.vm.device.VirtualEthernetCard)]

    cli.json("restore", "vc-place", "--host", sim.address, "--repo", repo, "--as", "vc-place-0", "--no-start",
             "--network", "none")
    assert cards("vc-place-0") == [] and len(cards("vc-place")) == 2
    asked = vsphere_session(sim)
    try:
        original = asked.one(vm_props(sim, "vc-place", ["runtime.host"])["runtime.host"], ["name"])["name"]
    finally:
        asked.close()
    other = next(h for h in choices["hosts"] if h != original)  # the simulator has several
    cli.json("restore", "vc-place", "--host", sim.address, "--repo", repo, "--as", "vc-place-n", "--no-start",
             "--network", "VM Network", "--esx-host", other)
    assert len(cards("vc-place-n")) == 2
    props = vm_props(sim, "vc-place-n", ["network", "runtime.host"])
    asked = vsphere_session(sim)
    try:
        assert {asked.one(n, ["name"])["name"] for n in props["network"]} == {"VM Network"}  # both cards there
        assert asked.one(props["runtime.host"], ["name"])["name"] == other
    finally:
        asked.close()
