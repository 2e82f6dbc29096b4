"""One entry for every hypervisor address: ``qemu…://`` goes to libvirt, ``vsphere://`` to vSphere."""

from __future__ import annotations

from vmkeep.hypervisors.base import Connector, NbdTls

KINDS = ("libvirt", "vsphere")


def kind_of(uri: str) -> str:
    return "vsphere" if uri.startswith("vsphere://") else "libvirt"


def open_connector(uri: str, *, nbd_tls: NbdTls = "auto", credentials: tuple[str, str] | None = None,
                   insecure: bool = False) -> Connector:
    """A live connection to the hypervisor at ``uri`` (credentials: user and password, when the
    caller has them; vSphere otherwise reads VMKEEP_HOST_PASSWORD)."""
    if kind_of(uri) == "vsphere":
        from vmkeep.hypervisors.vmware.connector import VsphereConnector

        return VsphereConnector(uri, insecure=insecure, credentials=credentials)
    from vmkeep.hypervisors.libvirt.connector import LibvirtConnector

    return LibvirtConnector(uri, nbd_tls=nbd_tls, credentials=credentials)
