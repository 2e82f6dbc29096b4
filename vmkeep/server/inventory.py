"""Discovery: what VMs each registered hypervisor runs, refreshed into the catalog."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import Hypervisor, VirtualMachine
from vmkeep.errors import VmkeepError
from vmkeep.jobs.registered import connector_for


@dataclass
class DiscoveryReport:
    hypervisor: str
    vms: int = 0
    new: int = 0
    gone: int = 0


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
                                       state=info.state, disks=disks, tags=list(info.tags), folder=info.folder,
                                       present=True, last_seen=now))
            report.new += 1
        else:
            vm.name, vm.host, vm.state, vm.disks, vm.folder, vm.present, vm.last_seen = (
                info.name, info.host, info.state, disks, info.folder, True, now)
            vm.tags = list(info.tags)  # the hypervisor's own tags (XenServer's): policies select by them
    for vm in known.values():
        if vm.present:
            vm.present = False
            report.gone += 1
    report.vms = len(found)
    h.discovered_at, h.discovery_error = now, None
    session.commit()
    return report
