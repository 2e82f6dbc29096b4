"""Where a restore as a new VM puts the VM's network cards: on a libvirt network the user chose
(checked against the host's networks), or none at all ("disconnected"); the choices the server
lists for a hypervisor; a restore through the server and a real proxy onto the chosen network."""

from __future__ import annotations

import json
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests import bare_vm
from tests.bare_vm import virsh
from tests.conftest import Cli, MiB


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
