"""VDI methods: create/destroy, snapshots, CBT (enable, disable, list_changed_blocks,
data_destroy), NBD info, resize and copy, with XAPI's rules and errors.

The data lives in ``Images`` (qcow2 files, internal snapshots, persistent dirty bitmaps); this
module keeps the records in step and enforces who may touch what, so a connector that reads an
attached disk's changed blocks or starts a VM on CBT metadata fails as on a real pool.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from vmkeep.lab.xapi.api import api
from vmkeep.lab.xapi.api_pool import refresh_sr
from vmkeep.lab.xapi.api_vm import wire_fields
from vmkeep.lab.xapi.images import NoCbtMetadata
from vmkeep.lab.xapi.model import NULL, XapiError, now

if TYPE_CHECKING:
    from xmlrpc.client import DateTime

    from vmkeep.lab.xapi.api import Sim

VDI_REQUIRED = ("name_label", "SR", "virtual_size", "type", "sharable", "read_only", "other_config")
META = "cbt_metadata"
NBD_ADDRESS = "127.0.0.1"  # every host's NBD relay listens here (nbd.py); the port tells the hosts apart


def _vdi(sim: Sim, vdi: str) -> dict[str, Any]:
    return sim.store.get("VDI", vdi)


def _with_data(sim: Sim, vdi: str) -> dict[str, Any]:
    """A VDI whose data can be read: not CBT metadata."""
    rec = _vdi(sim, vdi)
    if rec["type"] == META:
        raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, META)
    return rec


def _not_in_use(sim: Sim, vdi: str, op: str, *, running_only: bool = False) -> None:
    if sim.in_use(vdi, running_only=running_only):
        raise XapiError("VDI_IN_USE", vdi, op)


def _refresh(sim: Sim, vdi: str) -> None:
    rec = _vdi(sim, vdi)
    rec["physical_utilisation"] = str(sim.images.allocated(rec["uuid"]))
    rec["virtual_size"] = str(sim.images.size(rec["uuid"]))
    refresh_sr(sim, rec["SR"])


def _add(sim: Sim, **fields: Any) -> str:
    """A VDI record linked into its SR (and its source's snapshots)."""
    ref = sim.store.create("VDI", **fields)
    sim.store.link("SR", fields["SR"], "VDIs", ref)
    if fields.get("snapshot_of", NULL) != NULL:
        sim.store.link("VDI", fields["snapshot_of"], "snapshots", ref)
    return ref


def snapshot_vdi(sim: Sim, vdi: str, when: DateTime) -> str:
    """A snapshot VDI of ``vdi``: an internal qcow2 snapshot (CBT bitmaps rotate in Images)."""
    src = _with_data(sim, vdi)
    if src["is_a_snapshot"]:
        raise XapiError("OPERATION_NOT_ALLOWED", "VDI is a snapshot")
    keep = {k: src[k] for k in ("name_label", "name_description", "SR", "virtual_size", "type", "sharable",
                                "read_only", "cbt_enabled", "sm_config", "on_boot")}
    snap = _add(sim, **keep, is_a_snapshot=True, snapshot_of=vdi, snapshot_time=when,
                allowed_operations=["clone", "copy", "destroy", "data_destroy", "list_changed_blocks"])
    try:
        sim.images.snapshot(src["uuid"], _vdi(sim, snap)["uuid"])
    except BaseException:
        _forget(sim, snap)
        raise
    _refresh(sim, snap)
    return snap


def _forget(sim: Sim, vdi: str) -> None:
    rec = sim.store.delete("VDI", vdi)
    sim.store.unlink("SR", rec["SR"], "VDIs", vdi)
    sim.store.unlink("VDI", rec["snapshot_of"], "snapshots", vdi)
    for vbd in rec["VBDs"]:  # XAPI destroys the VBDs that pointed at it
        if sim.store.exists("VBD", vbd):
            b = sim.store.delete("VBD", vbd)
            sim.store.unlink("VM", b["VM"], "VBDs", vbd)


@api("VDI.create")
def vdi_create(sim: Sim, record: dict[str, Any]) -> str:
    for name in VDI_REQUIRED:
        if name not in record:
            raise XapiError("FIELD_TYPE_ERROR", name)
    try:
        size = int(record["virtual_size"])
    except (TypeError, ValueError):
        raise XapiError("FIELD_TYPE_ERROR", "virtual_size") from None
    if size < 0:
        raise XapiError("INVALID_VALUE", "virtual_size", size)
    sr = record["SR"]
    if sim.store.get("SR", sr)["content_type"] == "iso":
        raise XapiError("SR_OPERATION_NOT_SUPPORTED", sr)
    fields = {k: v for k, v in wire_fields(record).items() if k in (
        *VDI_REQUIRED, "name_description", "sm_config", "xenstore_data", "tags", "on_boot")}
    ref = _add(sim, **fields, allowed_operations=["clone", "copy", "destroy", "resize", "snapshot", "enable_cbt"])
    sim.images.create(sim.sr_dir(sr), _vdi(sim, ref)["uuid"], size)
    _refresh(sim, ref)
    return ref


@api("VDI.destroy")
def vdi_destroy(sim: Sim, vdi: str) -> str:
    """Refused while attached; its CBT metadata and NBD exports go with it."""
    rec = _vdi(sim, vdi)
    _not_in_use(sim, vdi, "destroy", running_only=True)
    sim.nbd.drop(rec["uuid"])
    if rec["uuid"] in sim.images:
        sim.images.destroy(rec["uuid"])
    _forget(sim, vdi)
    refresh_sr(sim, rec["SR"])
    return ""


@api("VDI.snapshot")
def vdi_snapshot(sim: Sim, vdi: str, driver_params: dict[str, str]) -> str:
    return snapshot_vdi(sim, vdi, now())


@api("VDI.enable_cbt")
def enable_cbt(sim: Sim, vdi: str) -> str:
    rec = _live(sim, vdi)
    if not rec["cbt_enabled"]:
        sim.images.enable_cbt(rec["uuid"])
        rec["cbt_enabled"] = True
    return ""


@api("VDI.disable_cbt")
def disable_cbt(sim: Sim, vdi: str) -> str:
    """Drops the change log: earlier snapshots no longer link to later ones."""
    rec = _live(sim, vdi)
    if rec["cbt_enabled"]:
        sim.images.disable_cbt(rec["uuid"])
        rec["cbt_enabled"] = False
    return ""


def _live(sim: Sim, vdi: str) -> dict[str, Any]:
    rec = _vdi(sim, vdi)
    if rec["is_a_snapshot"]:
        raise XapiError("OPERATION_NOT_ALLOWED", "VDI is a snapshot")
    return _with_data(sim, vdi)


@api("VDI.list_changed_blocks")
def list_changed_blocks(sim: Sim, vdi_from: str, vdi_to: str) -> str:
    """Base64 of the bitmap (one bit per 64 KiB of vdi_to, MSB first) from the image's bitmaps."""
    frm, to = _vdi(sim, vdi_from), _with_data(sim, vdi_to)
    for ref in (vdi_from, vdi_to):
        _not_in_use(sim, ref, "list_changed_blocks")
    if not (frm["is_a_snapshot"] and to["is_a_snapshot"] and frm["snapshot_of"] == to["snapshot_of"]
            and frm["cbt_enabled"] and to["cbt_enabled"]):
        raise XapiError("VDI_NO_CBT_METADATA", vdi_from)
    try:
        bits = sim.images.changed_blocks(frm["uuid"], to["uuid"])
    except NoCbtMetadata as exc:
        raise XapiError("VDI_NO_CBT_METADATA", vdi_from) from exc
    return base64.b64encode(bits).decode("ascii")


@api("VDI.data_destroy")
def data_destroy(sim: Sim, vdi: str) -> str:
    """Keep a snapshot's CBT metadata, drop its data (type becomes cbt_metadata)."""
    rec = _vdi(sim, vdi)
    if not (rec["is_a_snapshot"] and rec["cbt_enabled"]):
        raise XapiError("OPERATION_NOT_ALLOWED", "VDI is not a snapshot with CBT enabled")
    if rec["type"] == META:
        return ""
    if rec["uuid"] in sim.attached_uuids():
        raise XapiError("VDI_IN_USE", vdi, "data_destroy")
    sim.nbd.drop(rec["uuid"])
    sim.images.data_destroy(rec["uuid"])
    rec.update(type=META, physical_utilisation="0",
               allowed_operations=["destroy", "list_changed_blocks"])
    refresh_sr(sim, rec["SR"])
    return ""


@api("VDI.get_nbd_info")
def get_nbd_info(sim: Sim, vdi: str) -> list[dict[str, Any]]:
    """One connection per host with an NBD network; [] when no network allows NBD."""
    uuid = _with_data(sim, vdi)["uuid"]
    purposes = {p for n in sim.store.objects["network"].values() for p in n["purpose"]}
    exportname = f"/{uuid}?session_id={sim.session}"
    out, ports = [], set()
    for host in sim.store.objects["host"].values():
        for purpose, tls in (("nbd", True), ("insecure_nbd", False)):
            if purpose not in purposes:
                continue
            port = sim.nbd.export(uuid, exportname, host["name_label"], tls=tls)
            if port in ports:  # NbdServers keeps one server per (VDI, exportname): another host's
                continue  # entry would name this host's certificate for that server's port
            ports.add(port)
            out.append({"exportname": exportname, "address": NBD_ADDRESS, "port": port,
                        "cert": sim.nbd.host_cert(host["name_label"]) if tls else "",
                        "subject": host["hostname"] if tls else ""})
    return out


@api("VDI.resize")
def vdi_resize(sim: Sim, vdi: str, size: Any) -> str:
    rec = _live(sim, vdi)
    if int(size) < int(rec["virtual_size"]):
        raise XapiError("VDI_TOO_SMALL", vdi, size)  # XAPI never shrinks a disk
    sim.images.resize(rec["uuid"], int(size))
    _refresh(sim, vdi)
    return ""


@api("VDI.copy")
def vdi_copy(sim: Sim, vdi: str, sr: str) -> str:
    """The disk moved to another SR: a new live VDI, CBT off (pool_migrate is not simulated)."""
    rec = _with_data(sim, vdi)
    if sim.store.get("SR", sr)["content_type"] == "iso":
        raise XapiError("SR_OPERATION_NOT_SUPPORTED", sr)
    keep = {k: rec[k] for k in ("name_label", "name_description", "virtual_size", "sharable", "read_only",
                                "other_config", "sm_config", "on_boot")}
    ref = _add(sim, **keep, SR=sr, type="user" if rec["type"] == META else rec["type"],
               allowed_operations=["clone", "copy", "destroy", "resize", "snapshot", "enable_cbt"])
    try:
        sim.images.copy(rec["uuid"], sim.sr_dir(sr), _vdi(sim, ref)["uuid"])
    except BaseException:
        _forget(sim, ref)
        raise
    _refresh(sim, ref)
    return ref
