"""The XenServer / XCP-ng connector: VMs of a XAPI pool as points in time the data mover reads.

A point in time is a XAPI snapshot (quiesced through the guest's VSS when asked and possible),
read over the NBD server XAPI runs on each host (TLS on networks with the purpose ``nbd``);
changed block tracking gives an incremental's changed blocks (see backup.py). Restores write
through XAPI's import handler (restore.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from vmkeep.hypervisors.base import NbdTls, PointInTimeInfo, Quiesce, VMInfo, VMRestore
from vmkeep.hypervisors.xen import inventory
from vmkeep.hypervisors.xen.backup import XenPoint
from vmkeep.hypervisors.xen.session import XapiSession

log = logging.getLogger(__name__)


class XenConnector:
    kind = "xen"
    is_local = False  # the proxy reads over the network: XAPI's NBD server

    def __init__(self, uri: str, *, credentials: tuple[str, str] | None = None, insecure: bool = False,
                 nbd_tls: NbdTls = "auto", password: str | None = None, ca_file: str | None = None) -> None:
        """``nbd_tls``: ``require`` reads only over TLS (networks with the purpose nbd); ``auto``
        also reads plain NBD (purpose insecure_nbd) where an administrator allowed it for the
        address (``insecure``, a command line's --insecure); ``off`` reads either way.
        ``insecure`` also turns certificate checks of XAPI off."""
        self.uri = uri
        self.nbd_tls = nbd_tls
        self.insecure = insecure
        self.session = XapiSession(uri, credentials[1] if credentials else password, insecure=insecure,
                                   ca_file=ca_file)
        self.host = self.session.host

    def close(self) -> None:
        self.session.close()

    # -- inventory -------------------------------------------------------------------------------
    def inventory(self) -> list[VMInfo]:
        return inventory.list_vms(self.session)

    def exists(self, name: str) -> bool:
        return any(inventory.is_guest(self.session.call("VM.get_record", r))
                   for r in self.session.call("VM.get_by_name_label", name))

    def vm_ref(self, name: str) -> str:
        """The ref of guest VM ``name``; HypervisorError if none or several carry that name."""
        return inventory.find_vm(self.session, name)

    def topology(self) -> dict[str, Any]:
        return inventory.topology(self.session)

    # -- point in time ---------------------------------------------------------------------------
    @contextmanager
    def point_in_time(self, vm: str, *, since: dict[str, Any] | None, previous_disks: dict[str, int] | None,
                      transports: list[str], quiesce: Quiesce) -> Iterator[PointInTimeInfo]:
        point = XenPoint(session=self.session, vm=vm, since=since, previous_disks=previous_disks,
                         transports=transports, quiesce=quiesce, nbd_tls=self.nbd_tls, plain_allowed=self.insecure)
        with point.taken() as info:
            yield info

    # -- restore (restore.py) --------------------------------------------------------------------
    def restore_vm(self, config: dict[str, Any], *, name: str, disks: dict[str, int], as_new: bool,
                   storage: str | None = None, place: dict[str, str] | None = None,
                   retry: bool = False) -> AbstractContextManager[VMRestore]:
        from vmkeep.hypervisors.xen import restore

        return restore.restore_vm(self, config, name=name, disks=disks, as_new=as_new, storage=storage, place=place,
                                  retry=retry)

    def restore_choices(self) -> dict[str, list[str]]:
        from vmkeep.hypervisors.xen import restore

        return restore.choices(self)

    def remove_restored(self, name: str) -> bool:
        from vmkeep.hypervisors.xen import restore

        return restore.remove_restored(self, name)
