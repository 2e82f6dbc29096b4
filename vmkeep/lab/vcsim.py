"""The lab's vCenter: govmomi's simulator (vcsim), built from Debian's govmomi sources, serving
HTTPS with the lab certificate, with one VM whose flat VMDK holds known data.

``vmkeep lab vcsim start`` builds it once (``go build``, offline), starts it in the background
and creates the lab VM; ``vmkeep lab vcsim stop`` ends it. What a client needs (address, login,
CA, the datastore's local directory) is written to ``STATE/info.json`` (root only).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from vmkeep.errors import LabError
from vmkeep.lab import background
from vmkeep.lab.tls import LAB_PKI, ensure_lab_pki

SOURCE = Path(__file__).with_name("vcsim") / "main.go"
BUILD_DIR = Path("/var/lib/vmkeep-lab/vcsim")
BINARY = BUILD_DIR / "vcsim"
STATE = Path("/run/vmkeep-lab/vcsim")
GOPATH = "/usr/share/gocode"
SERVER_CERT = Path("/etc/pki/libvirt/servercert.pem")  # the lab's server certificate (names 127.0.0.1)
SERVER_KEY = Path("/etc/pki/libvirt/private/serverkey.pem")
CA_FILE = LAB_PKI / "ca-cert.pem"
USER = "administrator@vsphere.local"
LAB_VM = "vmkeep-vc1"
LAB_DISK_BYTES = 64 << 20
DEFAULT_LISTEN = "127.0.0.1:8989"


@dataclass
class Vcsim:
    """A running simulator, as ``info.json`` records it."""

    pid: int
    url: str  # https://127.0.0.1:8989/sdk
    address: str  # vsphere://USER@127.0.0.1:8989
    password: str
    ca_file: str
    datastores: list[str]  # local directories behind the datastores

    def env(self) -> dict[str, str]:
        """What a vmkeep command needs to reach it."""
        return {"VMKEEP_HOST_PASSWORD": self.password, "VMKEEP_VSPHERE_CA_FILE": self.ca_file}

    def nfc_leases(self) -> list[dict[str, Any]]:
        """Every NFC import lease the simulator gave out: its VM, state (ready, error, done,
        aborted) and the bytes each disk upload received (main.go's GET /vmkeep-lab/nfc)."""
        base = self.url.rsplit("/sdk", 1)[0]
        verify = ssl.create_default_context(cafile=self.ca_file) if base.startswith("https") else False
        reply = httpx.get(f"{base}/vmkeep-lab/nfc", verify=verify, timeout=30)
        reply.raise_for_status()
        return list(reply.json()["leases"])


def build() -> Path:
    """Compile the simulator unless the binary matches the source already."""
    if shutil.which("go") is None:
        raise LabError("Go is not installed: apt-get install golang-go golang-github-vmware-govmomi-dev "
                       "golang-github-google-uuid-dev (./scripts/setup does it)")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    stamp = BUILD_DIR / "source.sha256"
    if BINARY.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return BINARY
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOPATH": GOPATH, "GO111MODULE": "off", "GOCACHE": str(BUILD_DIR / "cache")}
    proc = subprocess.run(["go", "build", "-o", str(BINARY), str(SOURCE)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"building vcsim failed (is golang-github-vmware-govmomi-dev installed?): {proc.stderr[-800:]}")
    stamp.write_text(digest + "\n")
    return BINARY


def running(state: Path = STATE) -> Vcsim | None:
    return background.recorded(state, Vcsim)


def start(listen: str = DEFAULT_LISTEN, *, lab_vm: bool = True, state: Path = STATE) -> Vcsim:
    """Start the simulator (once per ``state`` directory) and, with ``lab_vm``, create the lab VM
    with known data."""
    current = running(state)
    if current is not None:
        return current
    binary = build()
    ensure_lab_pki()
    state.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(12)
    log = (state / "vcsim.log").open("w")
    proc = subprocess.Popen([str(binary), "-listen", listen, "-cert", str(SERVER_CERT), "-key", str(SERVER_KEY),
                             "-user", USER], env={**os.environ, "VCSIM_PASSWORD": password},
                            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise LabError(f"vcsim did not start: {(state / 'vcsim.log').read_text()[-800:]}")
    first = json.loads(line)
    sim = Vcsim(proc.pid, first["url"], f"vsphere://{USER}@{listen}", password, str(CA_FILE),
                first["datastores"])
    background.record(state, sim)
    if lab_vm:
        try:
            create_lab_vm(sim)
        except BaseException:
            stop(state)  # a simulator without its lab VM is not left running
            raise
    return sim


def stop(state: Path = STATE) -> bool:
    """End the simulator (its datastore directories go with it); whether one ran."""
    sim = running(state)
    if sim is None:
        return False
    background.end(state, sim.pid, 15)
    return True


def lab_pattern(offset: int, length: int) -> bytes:
    """The lab VM's known data: a repeating, position-dependent pattern (so misplaced blocks show)."""
    block = bytearray()
    for i in range(length // 4096):
        block += ((offset // 4096 + i).to_bytes(8, "little") * 512)
    return bytes(block)


def create_vm(sim: Vcsim, name: str, disk_bytes: int, *, disk_mode: str = "persistent",
              extra_disk_modes: tuple[str, ...] = (), networks: tuple[str, ...] = ()) -> Path:
    """A powered-off VM with one paravirtual SCSI disk (and more, of the given modes) and a
    vmxnet3 NIC on each of ``networks``; the local path of its first disk's flat file."""
    from pyVmomi import vim

    from vmkeep.hypervisors.vmware.session import Session, Target

    session = Session(Target.parse(sim.address), sim.password, ca_file=sim.ca_file)
    try:
        dc = session.content.rootFolder.childEntity[0]
        ds = dc.datastore[0]
        pool = dc.hostFolder.childEntity[0].resourcePool
        controller = vim.vm.device.ParaVirtualSCSIController(key=1000, busNumber=0, sharedBus="noSharing")
        changes = [vim.vm.device.VirtualDeviceSpec(operation="add", device=controller)]
        for unit, mode in enumerate((disk_mode, *extra_disk_modes)):
            disk = vim.vm.device.VirtualDisk(
                key=-1 - unit, controllerKey=1000, unitNumber=unit, capacityInKB=disk_bytes // 1024,
                backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(diskMode=mode, thinProvisioned=True,
                                                                       fileName=f"[{ds.name}]"))
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk))
        known = {p.get("name"): n for n, p in session.collect(vim.Network, ["name", "key"])}
        for i, net in enumerate(networks):
            group = known[net]
            if isinstance(group, vim.dvs.DistributedVirtualPortgroup):
                props = session.one(group, ["key", "config.distributedVirtualSwitch"])
                switch = session.one(props["config.distributedVirtualSwitch"], ["uuid"])["uuid"]
                backing: Any = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                    port=vim.dvs.PortConnection(portgroupKey=props["key"], switchUuid=switch))
            else:
                backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=net, network=group)
            nic = vim.vm.device.VirtualVmxnet3(key=-100 - i, addressType="generated", backing=backing)
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=nic))
        spec = vim.vm.ConfigSpec(name=name, memoryMB=64, numCPUs=1, guestId="otherGuest64",
                                 files=vim.vm.FileInfo(vmPathName=f"[{ds.name}]"), deviceChange=changes)
        session.wait(dc.vmFolder.CreateVM_Task(config=spec, pool=pool), f"creating {name}")
        flat = Path(ds.info.url) / name / f"{name}-flat.vmdk"
    finally:
        session.close()
    with flat.open("r+b") as f:
        f.truncate(disk_bytes)
    return flat


def create_lab_vm(sim: Vcsim) -> Path:
    """The lab VM: 64 MiB with the known pattern in two places and a hole between."""
    flat = create_vm(sim, LAB_VM, LAB_DISK_BYTES)
    with flat.open("r+b") as f:
        for offset, length in ((0, 8 << 20), (32 << 20, 4 << 20)):
            f.seek(offset)
            f.write(lab_pattern(offset, length))
    return flat
