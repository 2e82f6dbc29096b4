"""A replica's record in its own libvirt domain metadata (``<metadata>``, vmkeep's namespace): what
VM and repository it replicates, the point its disks hold and its state. Kept in the domain, the
record goes wherever the VM goes and outlives any catalog or proxy."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from typing import cast

import libvirt

from vmkeep.hypervisors.base import HypervisorError, ReplicaInfo, ReplicaState
from vmkeep.hypervisors.libvirt.domain_xml import disk_specs

log = logging.getLogger(__name__)

NS = "https://vmkeep.dev/xmlns/replica/1"
PREFIX = "vmkeep-replica"
OWN_NAMESPACES = "https://vmkeep.dev/"  # metadata of vmkeep's (the lab's, a replica's) a copy must not inherit
STATES = ("seeding", "updating", "standby", "failed-over", "diverged")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def element(info: ReplicaInfo, ns: str = "") -> ET.Element:
    """The record as an element (in namespace ``ns`` for a domain XML, bare for setMetadata)."""
    prefix = f"{{{ns}}}" if ns else ""
    root = ET.Element(f"{prefix}replica", source=info.source, repository=info.repository, point=info.point,
                      state=info.state, updated=info.updated or now())
    for disk, size in info.disks.items():
        ET.SubElement(root, f"{prefix}disk", name=disk, size=str(size))
    return root


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse(name: str, text: str) -> ReplicaInfo:
    root = ET.fromstring(text)
    state = root.get("state", "")
    if state not in STATES:
        raise HypervisorError(f"the replica metadata of {name} has an unknown state {state!r}: upgrade vmkeep")
    disks = {d.get("name", ""): int(d.get("size", "0")) for d in root if _local(d.tag) == "disk"}
    return ReplicaInfo(name=name, source=root.get("source", ""), repository=root.get("repository", ""),
                       point=root.get("point", ""), state=cast(ReplicaState, state), disks=disks,
                       updated=root.get("updated", ""))


def read(dom: libvirt.virDomain) -> ReplicaInfo | None:
    """The replica record of a domain (its persistent definition), None when it has none."""
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    except libvirt.libvirtError as exc:
        # no vmkeep metadata, a transient domain, or one that went since it was listed
        if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_NO_DOMAIN,
                                        libvirt.VIR_ERR_OPERATION_INVALID):
            log.warning("cannot read the metadata of %s: %s", dom.name(), exc.get_error_message())
        return None
    info = parse(dom.name(), text)
    info.running = bool(dom.isActive())
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    info.paths = {spec.target: spec.source for spec in disk_specs(xml) if spec.target in info.disks}
    return info


def write(dom: libvirt.virDomain, info: ReplicaInfo) -> None:
    """Replace the record in the persistent definition (and the running one, if it runs)."""
    info.updated = now()
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
    text = ET.tostring(element(info), encoding="unicode")
    log.debug("replica metadata of %s := %s", dom.name(), text)
    try:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, text, PREFIX, NS, flags)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot record the state of replica {dom.name()}: {exc.get_error_message()}") \
            from exc


def with_record(xml: str, info: ReplicaInfo) -> str:
    """A domain XML carrying ``info`` as its only vmkeep metadata (the original's lab or replica
    records are not the copy's)."""
    root = ET.fromstring(xml)
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(root, "metadata")
    for child in list(metadata):
        if child.tag.startswith("{" + OWN_NAMESPACES):
            metadata.remove(child)
    metadata.append(element(info, NS))
    ET.register_namespace(PREFIX, NS)
    return ET.tostring(root, encoding="unicode")
