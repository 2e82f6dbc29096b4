"""One entry for every hypervisor address: ``qemu…://`` goes to libvirt, ``vsphere://`` to vSphere,
``xapi://`` to Citrix XenServer / XCP-ng."""

from __future__ import annotations

from vmkeep.hypervisors.address import Allowance, check_address
from vmkeep.hypervisors.base import Connector, NbdTls

KINDS = ("libvirt", "vsphere", "xen")
SCHEME_KINDS = {"vsphere://": "vsphere", "xapi://": "xen"}  # every other address is libvirt's


def kind_of(uri: str) -> str:
    lowered = uri.lower()
    return next((kind for prefix, kind in SCHEME_KINDS.items() if lowered.startswith(prefix)), "libvirt")


def uses_stored_password(uri: str, username: str | None) -> bool:
    """Whether a registered hypervisor's sealed password goes to its connector: vSphere and XAPI name
    their user in the address, libvirt's SASL login needs the registered user name."""
    return bool(username) or kind_of(uri) in ("vsphere", "xen")


def restores_need_the_host(uri: str) -> bool:
    """Whether a restore to this hypervisor writes its host's storage, so that only a proxy running
    on one of its hosts takes it (libvirt); vSphere and XenServer take the disks through their API
    from any proxy that reaches them over the network."""
    return kind_of(uri) == "libvirt"


def open_connector(uri: str, *, nbd_tls: NbdTls = "auto", credentials: tuple[str, str] | None = None,
                   insecure: bool = False, allowance: Allowance | None = None) -> Connector:
    """A live connection to the hypervisor at ``uri`` (credentials: user and password, when the
    caller has them; vSphere and XAPI otherwise read VMKEEP_HOST_PASSWORD). The address is checked first
    (vmkeep.hypervisors.address): ``allowance`` is what an administrator allowed for it; without
    one, a command line's ``--insecure`` allows plain TCP and options that weaken checks."""
    check_address(uri, allowance if allowance is not None else Allowance(plain_tcp=insecure, unsafe_options=insecure))
    kind = kind_of(uri)
    if kind == "vsphere":
        from vmkeep.hypervisors.vmware.connector import VsphereConnector

        return VsphereConnector(uri, insecure=insecure, credentials=credentials, nbd_tls=nbd_tls)
    if kind == "xen":
        from vmkeep.hypervisors.xen.connector import XenConnector

        return XenConnector(uri, credentials=credentials, insecure=insecure, nbd_tls=nbd_tls)
    from vmkeep.hypervisors.libvirt.connector import LibvirtConnector

    return LibvirtConnector(uri, nbd_tls=nbd_tls, credentials=credentials)
