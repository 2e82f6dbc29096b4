"""session, pool, host, SR and network methods, and the initial world of the simulated pool.

The world is fixed (docs/xen.md: two hosts, dom0 each, one template, three SRs, two networks) so tests
and the connector can name things; SR free space is the state directory's file system.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

from vmkeep.lab.xapi.api import MASTER_ADDRESS, MEMBER_ADDRESS, api
from vmkeep.lab.xapi.model import XapiError, new_ref

if TYPE_CHECKING:
    from vmkeep.lab.xapi.api import Sim

POOL_NAME = "vmkeep-lab-pool"
USER = "root"
NBD_PURPOSES = ("nbd", "insecure_nbd")


def build_world(sim: Sim) -> None:
    """The pool as a freshly installed two-host XenServer with the lab's storage and networks."""
    st, refs = sim.store, sim.refs
    total = shutil.disk_usage(sim.state).total if sim.state.exists() else 1 << 40
    for name, address in (("xen1", MASTER_ADDRESS), ("xen2", MEMBER_ADDRESS)):
        host = refs[name] = st.create("host", name_label=name, hostname=name, address=address,
                                      name_description="Default install")
        dom0 = refs[f"dom0-{name}"] = st.create(
            "VM", name_label=f"Control domain on host: {name}", is_control_domain=True, power_state="Running",
            resident_on=host, affinity=host, domain_type="pv", HVM_boot_policy="", HVM_boot_params={},
            memory_static_max="4294967296", memory_dynamic_max="4294967296", memory_dynamic_min="4294967296",
            VCPUs_max="2", VCPUs_at_startup="2", domid="0")
        st.get("host", host)["control_domain"] = dom0
        st.link("host", host, "resident_VMs", dom0)
    refs["template"] = st.create(
        "VM", name_label="Debian Bookworm 12", name_description="Template for Debian 12 (lab)", is_a_template=True,
        is_default_template=True, platform={"viridian": "false", "device-model": "qemu-upstream-compat"},
        other_config={"install-methods": "cdrom,nfs,http,ftp", "linux_template": "true"})
    for name, kind, content, shared, desc in (
            ("Local storage", "ext", "user", False, "Local storage on xen1 (lab: a directory)"),
            ("Shared NFS", "nfs", "user", True, "NFS SR (lab: a directory)"),
            ("ISO library", "iso", "iso", True, "ISO images")):
        refs[name] = st.create("SR", name_label=name, name_description=desc, type=kind, content_type=content,
                               shared=shared, physical_size=str(total),
                               allowed_operations=["vdi_create", "vdi_destroy", "scan"] if kind != "iso" else [])
        if kind != "iso":
            sim.sr_dir(refs[name])
    for name, bridge, purpose in (("Pool-wide network associated with eth0", "xenbr0", ["nbd"]),
                                  ("Lab network 1", "xenbr1", [])):
        refs[name] = st.create("network", name_label=name, bridge=bridge, purpose=purpose, MTU="1500")
    refs["pool"] = st.create("pool", name_label=POOL_NAME, master=refs["xen1"], default_SR=refs["Shared NFS"])


# --- session ---------------------------------------------------------------------------------
@api("session.login_with_password", session=False)
def login_with_password(sim: Sim, user: str, password: str, version: str, originator: str) -> str:
    if user != USER or password != sim.password:
        raise XapiError("SESSION_AUTHENTICATION_FAILED", user, "Authentication failure")
    ref = new_ref()
    sim.sessions[ref] = user
    return ref


@api("session.logout", session=False)
def logout(sim: Sim, session: str) -> str:
    """End the session and the NBD exports handed out under it (their exportname names it)."""
    sim.check_session(session)
    del sim.sessions[session]
    sim.nbd.drop_session(session)
    return ""


@api("session.get_this_host")
def get_this_host(sim: Sim, session: str) -> str:
    sim.check_session(session)
    return sim.refs["xen1"]


# --- pool / host -------------------------------------------------------------------------
@api("pool.set_default_SR")
def set_default_sr(sim: Sim, pool: str, sr: str) -> str:
    sim.store.get("SR", sr)
    sim.store.get("pool", pool)["default_SR"] = sr
    return ""


@api("host.get_servertime")
def get_servertime(sim: Sim, host: str) -> Any:
    from vmkeep.lab.xapi.model import now

    sim.store.get("host", host)
    return now()


# --- SR ----------------------------------------------------------------------------------
@api("SR.scan")
def sr_scan(sim: Sim, sr: str) -> str:
    sim.store.get("SR", sr)
    return ""


def refresh_sr(sim: Sim, sr: str) -> None:
    """SR usage as XAPI reports it: virtual_allocation = sum of its VDIs' sizes."""
    rec = sim.store.get("SR", sr)
    vdis = [sim.store.get("VDI", v) for v in rec["VDIs"]]
    rec["virtual_allocation"] = str(sum(int(v["virtual_size"]) for v in vdis))
    rec["physical_utilisation"] = str(sum(int(v["physical_utilisation"]) for v in vdis))


# --- network -------------------------------------------------------------------------------
@api("network.add_purpose")
def add_purpose(sim: Sim, network: str, purpose: str) -> str:
    """XAPI: only nbd / insecure_nbd, and a pool's NBD networks are all secure or all insecure."""
    rec = sim.store.get("network", network)
    if purpose not in NBD_PURPOSES:
        raise XapiError("INVALID_VALUE", "purpose", purpose)
    other = NBD_PURPOSES[1 - NBD_PURPOSES.index(purpose)]
    if any(other in n["purpose"] for n in sim.store.objects["network"].values()):
        raise XapiError("NETWORK_INCOMPATIBLE_PURPOSES", purpose, other)
    if purpose not in rec["purpose"]:
        rec["purpose"].append(purpose)
    return ""


@api("network.remove_purpose")
def remove_purpose(sim: Sim, network: str, purpose: str) -> str:
    rec = sim.store.get("network", network)
    if purpose not in NBD_PURPOSES:
        raise XapiError("INVALID_VALUE", "purpose", purpose)
    if purpose in rec["purpose"]:
        rec["purpose"].remove(purpose)
    return ""
