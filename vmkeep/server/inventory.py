"""Discovery: what VMs each registered hypervisor runs, refreshed into the catalog."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import Hypervisor, VirtualMachine
from vmkeep.errors import VmkeepError
from vmkeep.hypervisors.address import Allowance
from vmkeep.hypervisors.base import Connector, HypervisorError, NbdTls
from vmkeep.hypervisors.connect import KINDS, kind_of, open_connector
from vmkeep.server.keys import open_secret


@dataclass
class DiscoveryReport:
    hypervisor: str
    vms: int = 0
    new: int = 0
    gone: int = 0


def secret_context(name: str) -> str:
    return f"hypervisor {name}"


class HypervisorAccess(Protocol):
    """What connecting to a registered hypervisor takes: its catalog row, or a proxy's work order."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def uri(self) -> str: ...
    @property
    def username(self) -> str | None: ...
    @property
    def secret_sealed(self) -> bytes | None: ...
    @property
    def allow_plain_tcp(self) -> bool: ...
    @property
    def allow_unsafe_options(self) -> bool: ...


def connector_for(h: HypervisorAccess, nbd_tls: NbdTls = "require") -> Connector:
    """A live connection to the hypervisor with its stored credentials, on the address terms an
    administrator registered it with (checked again here: a row may predate the check)."""
    if h.kind not in KINDS or kind_of(h.uri) != h.kind:
        raise HypervisorError(f"hypervisor {h.name}: kind {h.kind!r} with address {h.uri} has no connector (have: "
                              f"{', '.join(KINDS)}; vsphere addresses start vsphere://)")
    credentials = None
    if h.secret_sealed and (h.username or h.kind == "vsphere"):  # vSphere's user is in its address
        credentials = (h.username or "", open_secret(h.secret_sealed, secret_context(h.name)))
    return open_connector(h.uri, credentials=credentials, nbd_tls=nbd_tls,
                          allowance=Allowance(plain_tcp=h.allow_plain_tcp, unsafe_options=h.allow_unsafe_options))


def discover(session: Session, h: Hypervisor) -> DiscoveryReport:
    """Refresh the VMs of ``h``: new ones added, known ones updated, missing ones marked gone."""
    report = DiscoveryReport(h.name)
    try:
        connector = connector_for(h)
        try:
            found = connector.inventory()
        finally:
            connector.close()
    except VmkeepError as exc:
        h.discovery_error = str(exc)
        session.commit()
        raise
    # one discovery of a hypervisor at a time (the schedule and an API call may meet here)
    session.execute(select(Hypervisor.id).where(Hypervisor.id == h.id).with_for_update())
    now = datetime.now(UTC)
    known = {vm.uuid: vm for vm in session.scalars(select(VirtualMachine).where(VirtualMachine.hypervisor_id == h.id))}
    for info in found:
        disks = [asdict(d) for d in info.disks]
        vm = known.pop(info.uuid, None)
        if vm is None:
            session.add(VirtualMachine(hypervisor_id=h.id, name=info.name, uuid=info.uuid, host=info.host,
                                       state=info.state, disks=disks, tags=[], folder=info.folder, present=True,
                                       last_seen=now))
            report.new += 1
        else:
            vm.name, vm.host, vm.state, vm.disks, vm.folder, vm.present, vm.last_seen = (
                info.name, info.host, info.state, disks, info.folder, True, now)
    for vm in known.values():
        if vm.present:
            vm.present = False
            report.gone += 1
    report.vms = len(found)
    h.discovered_at, h.discovery_error = now, None
    session.commit()
    return report
