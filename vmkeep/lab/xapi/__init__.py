"""The lab's XenServer: a XAPI simulator for tests and the demo, NOT a product feature.

No XenServer can run here, so ``python -m vmkeep.lab.xapi.server`` serves the subset of XAPI the
Xen connector uses (docs/xen.md, "The lab's simulator": XML-RPC over HTTPS with XAPI's errors and rules,
NBD exports, raw import/export), backed by real qcow2 images whose CBT answers come from QEMU's
persistent dirty bitmaps. A connector that breaks XAPI's rules fails here as on a real pool.

This module is the client side: start/stop the simulator in the background (``vmkeep lab xapi
start|stop``), and the lab-only knobs (guest writes, fault injection, inspection) tests and the
bench use. ``STATE/info.json`` (root only) records what a client needs.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import subprocess
import sys
import xmlrpc.client
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmkeep.errors import LabError
from vmkeep.lab import background
from vmkeep.lab.tls import LAB_PKI, ensure_lab_pki
from vmkeep.lab.vcsim import lab_pattern

STATE = Path("/run/vmkeep-lab/xapi")
CA_FILE = LAB_PKI / "ca-cert.pem"
USER = "root"
LAB_VM = "vmkeep-xen1"
LAB_DISK_BYTES = 64 << 20
LAB_DATA = ((0, 8 << 20), (32 << 20, 4 << 20))  # (offset, length) of the lab VM's known data
NBD_NETWORK = "Pool-wide network associated with eth0"
WRITE_PIECE = 4 << 20  # bytes per lab.write call (base64 in XML: keep requests moderate)

__all__ = ["Xapi", "attached", "create_vm", "disks", "fault", "guest_write", "image", "nbd_break", "reads",
           "running", "session", "snapshot_name", "start", "stop", "write_pattern"]


@dataclass
class Xapi:
    """A running simulator, as ``info.json`` records it."""

    pid: int
    url: str  # https://127.0.0.1:PORT/
    address: str  # xapi://root@127.0.0.1:PORT (the master)
    member_address: str  # xapi://root@127.0.0.2:PORT (a pool member: logins there get HOST_IS_SLAVE)
    password: str
    ca_file: str
    state: str

    def env(self) -> dict[str, str]:
        """What a vmkeep command needs to reach it."""
        return {"VMKEEP_HOST_PASSWORD": self.password, "VMKEEP_XAPI_CA_FILE": self.ca_file}


def running(state: Path = STATE) -> Xapi | None:
    return background.recorded(state, Xapi)


def start(listen: str = "127.0.0.1:8443", *, lab_vm: bool = True, state: Path = STATE) -> Xapi:
    """Start the simulator (once per ``state`` directory) and, with ``lab_vm``, create the lab VM
    vmkeep-xen1 (64 MiB, known data in two places, CBT off, running)."""
    current = running(state)
    if current is not None:
        return current
    ensure_lab_pki()
    state.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(12)
    pw_file = state / "password"
    pw_file.touch(mode=0o600)
    pw_file.write_text(password + "\n")
    log = (state / "server.stderr").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "vmkeep.lab.xapi.server", "--state", str(state),
                             "--listen", listen, "--password-file", str(pw_file)],
                            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise LabError(f"the XAPI simulator did not start: {(state / 'server.stderr').read_text()[-800:]} "
                       f"(log: {state / 'xapi.log'})")
    first = json.loads(line)
    port = listen.rpartition(":")[2]
    sim = Xapi(proc.pid, first["url"], f"xapi://{USER}@127.0.0.1:{port}", f"xapi://{USER}@127.0.0.2:{port}",
               password, str(CA_FILE), str(state))
    background.record(state, sim)
    if lab_vm:
        try:
            create_lab_vm(sim)
        except BaseException:
            stop(state)  # a simulator without its lab VM is not left running
            raise
    return sim


def stop(state: Path = STATE) -> bool:
    """End the simulator (its images and NBD servers go with it); whether one ran."""
    sim = running(state)
    if sim is None:
        return False
    background.end(state, sim.pid, 20)
    return True


# --- clients -------------------------------------------------------------------------------------
def _context(sim: Xapi) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=sim.ca_file)


def session(sim: Xapi, url: str | None = None) -> Any:
    """A logged-in session of the official XenAPI SDK, trusting the lab CA (caller logs out)."""
    import XenAPI

    s = XenAPI.Session(url or sim.url, transport=xmlrpc.client.SafeTransport(context=_context(sim)))
    s.xenapi.login_with_password(USER, sim.password, "2.21", "vmkeep-lab")
    return s


def _lab(sim: Xapi, method: str, *args: Any) -> Any:
    """Call a lab.* method (password instead of a session); failures raise XenAPI.Failure."""
    import XenAPI

    proxy = xmlrpc.client.ServerProxy(sim.url, context=_context(sim), allow_none=True)
    try:
        reply = getattr(proxy, method)(sim.password, *args)
    finally:
        proxy("close")()
    if reply["Status"] != "Success":
        raise XenAPI.Failure(reply["ErrorDescription"])
    return reply["Value"]


def create_vm(sim: Xapi, name: str, disk_bytes: Sequence[int] | int, *, running: bool = True,
              networks: Sequence[str] = (NBD_NETWORK,), vss: bool = False, cd: bool = True) -> str:
    """A VM with empty disks (xvda…) on Local storage, an empty CD, a VIF per network; its uuid."""
    sizes = [disk_bytes] if isinstance(disk_bytes, int) else list(disk_bytes)
    return str(_lab(sim, "lab.create_vm", name, [str(s) for s in sizes], "Running" if running else "Halted",
                    list(networks), vss, cd))


def disks(sim: Xapi, vm_uuid: str) -> dict[str, str]:
    """The VM's disks: "xvda" (from userdevice) -> VDI uuid."""
    s = session(sim)
    try:
        x = s.xenapi
        out = {}
        for vbd in x.VM.get_VBDs(x.VM.get_by_uuid(vm_uuid)):
            rec = x.VBD.get_record(vbd)
            if rec["type"] == "Disk" and rec["VDI"] != "OpaqueRef:NULL":
                out[f"xvd{chr(97 + int(rec['userdevice']))}"] = x.VDI.get_uuid(rec["VDI"])
        return dict(sorted(out.items()))
    finally:
        s.xenapi.session.logout()


def guest_write(sim: Xapi, vdi_uuid: str, offset: int, data: bytes) -> None:
    """What the guest writing would do: through the live image, so CBT records it."""
    for at in range(0, len(data), WRITE_PIECE):
        piece = data[at:at + WRITE_PIECE]
        _lab(sim, "lab.write", vdi_uuid, str(offset + at), base64.b64encode(piece).decode("ascii"))


def write_pattern(sim: Xapi, vdi_uuid: str, offset: int, length: int) -> None:
    """The lab's known, position-dependent data (``vcsim.lab_pattern``) as a guest write."""
    guest_write(sim, vdi_uuid, offset, lab_pattern(offset, length))


def image(sim: Xapi, vdi_uuid: str) -> Path:
    """The qcow2 file holding the VDI (a snapshot VDI: its source's file)."""
    return Path(_lab(sim, "lab.image", vdi_uuid))


def snapshot_name(sim: Xapi, vdi_uuid: str) -> str | None:
    """The internal qcow2 snapshot of a snapshot VDI (``qemu-img compare -l``); None otherwise."""
    return str(_lab(sim, "lab.snapshot_name", vdi_uuid)) or None


def attached(sim: Xapi) -> list[str]:
    """VDI uuids with an NBD connection open now."""
    return list(_lab(sim, "lab.attached"))


def reads(sim: Xapi, vdi_uuid: str) -> int:
    """Bytes the simulator sent over NBD for the VDI so far."""
    return int(_lab(sim, "lab.reads", vdi_uuid))


def fault(sim: Xapi, method: str, code: str, times: int = 1) -> None:
    """The next ``times`` calls of ``method`` ("VM.snapshot", or "export_raw_vdi" /
    "import_raw_vdi") fail with ``code``."""
    _lab(sim, "lab.fault", method, code, times)


def nbd_break(sim: Xapi, vdi_uuid: str, after_bytes: int) -> None:
    """Cut NBD connections to the VDI after ``after_bytes`` more bytes; refuse new ones."""
    _lab(sim, "lab.nbd_break", vdi_uuid, str(after_bytes))


def create_lab_vm(sim: Xapi) -> str:
    """The lab VM vmkeep-xen1: 64 MiB, the known pattern at 0 (8 MiB) and 32 MiB (4 MiB)."""
    vm = create_vm(sim, LAB_VM, LAB_DISK_BYTES)
    vdi = disks(sim, vm)["xvda"]
    for offset, length in LAB_DATA:
        write_pattern(sim, vdi, offset, length)
    return vm
