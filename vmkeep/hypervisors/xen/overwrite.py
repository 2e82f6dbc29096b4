"""A restore over the original VM: it must be halted and still have every disk of the point at the
point's size; each disk's VDI is then rewritten in place through ``PUT /import_raw_vdi``, the
point's zeros included (the disk may hold data there). CBT is turned off and on again first:
its log would not know this rewrite, so the next backup reads everything.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from vmkeep.hypervisors.base import HypervisorError
from vmkeep.hypervisors.xen.inventory import NULL, disk_name, vms_named
from vmkeep.hypervisors.xen.upload import ChunkedImport, import_vdi

if TYPE_CHECKING:
    from vmkeep.hypervisors.xen.connector import XenConnector

log = logging.getLogger(__name__)


class Original:
    """The original (halted) VM getting its disks back: each VDI rewritten whole, zeros included."""

    def __init__(self, connector: XenConnector, name: str, ref: str, current: dict[str, dict[str, Any]]) -> None:
        self.connector = connector
        self.session = connector.session
        self.name = name
        self.ref = ref
        self.current = current  # disk -> {"vdi": ref, "record": VDI record, "sr": SR name}
        self.written: list[str] = []

    @contextmanager
    def disk(self, name: str, size: int) -> Iterator[ChunkedImport]:
        target = _check_disk(self.current, self.name, name, size)
        record = target["record"]
        if record.get("cbt_enabled"):  # the change log would not know this rewrite: the next backup is full
            log.info("disk %s of %s: CBT turned off and on again (its log is void after the restore)", name, self.name)
            self.session.call("VDI.disable_cbt", target["vdi"])
            self.session.call("VDI.enable_cbt", target["vdi"])
        try:
            with import_vdi(self.session, str(record["uuid"]), size, zeros=True,
                            label=f"disk {name} of {self.name}") as writer:
                yield writer
                if writer.at < size:  # a point's tail the engine named no zeros for
                    writer.zero(writer.at, size - writer.at)
        except Exception as exc:
            raise HypervisorError(f"disk {name} of {self.name} is incomplete now ({exc}): run the restore again "
                                  "before starting the VM") from exc
        self.written.append(name)

    def finish(self, *, start: bool) -> dict[str, str]:
        if start:
            self.session.call("VM.start", self.ref, False, False)
        return {d: f"{self.current[d]['sr']}/{self.current[d]['record']['uuid']}" for d in self.written}


def _check_disk(current: dict[str, dict[str, Any]], vm: str, name: str, size: int) -> dict[str, Any]:
    target = current.get(name)
    if target is None:
        raise HypervisorError(f"VM {vm} has no disk {name} any more: restore --as NEW")
    now = int(target["record"].get("virtual_size") or 0)
    if now != size:
        raise HypervisorError(f"disk {name} of {vm} is {now} bytes now, the point's is {size}: restore --as NEW")
    return target


@contextmanager
def original_vm(connector: XenConnector, name: str, disks: dict[str, int]) -> Iterator[Original]:
    """The original VM, checked before anything is written: one VM of that name, halted, every
    disk of the point still there with its size."""
    session = connector.session
    found = vms_named(session, name)
    if not found:
        raise HypervisorError(f"no VM named {name!r} in the pool: restore --as NEW")
    if len(found) > 1:
        raise HypervisorError(f"{len(found)} VMs are named {name!r} in the pool: rename the others, or restore "
                              "--as NEW")
    ref, record = found[0]
    state = str(record.get("power_state"))
    if state != "Halted":
        raise HypervisorError(f"VM {name} is {state.lower()}: shut it down first (xe vm-shutdown vm={name}), then "
                              "restore over it")
    current: dict[str, dict[str, Any]] = {}
    for vbd_ref in record.get("VBDs") or []:
        vbd = dict(session.call("VBD.get_record", vbd_ref))
        vdi = str(vbd.get("VDI") or NULL)
        if vbd.get("type") != "Disk" or vdi == NULL:
            continue
        vdi_record = dict(session.call("VDI.get_record", vdi))
        sr = str(session.call("SR.get_name_label", vdi_record["SR"]))
        current[disk_name(str(vbd.get("userdevice")))] = {"vdi": vdi, "record": vdi_record, "sr": sr}
    for disk, size in disks.items():
        _check_disk(current, name, disk, size)
    log.info("restoring over VM %s (%s): disks %s", name, record.get("uuid"), ", ".join(sorted(disks)))
    yield Original(connector, name, ref, current)
