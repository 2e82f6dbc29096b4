"""A replica's record in its own libvirt domain metadata (``<metadata>``, vmkeep's namespace): what
VM and repository it replicates, the point its disks hold and its state. Kept in the domain, the
record goes wherever the VM goes and outlives any catalog or proxy.

A ``standby`` record also holds each disk's stamp (size, mtime, ctime) as it was left: a replica
started or written outside vmkeep keeps its record, but not its stamps."""

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


def element(info: ReplicaInfo, ns: str = "", stamps: dict[str, str] | None = None) -> ET.Element:
    """The record as an element (in namespace ``ns`` for a domain XML, bare for setMetadata)."""
    prefix = f"{{{ns}}}" if ns else ""
    root = ET.Element(f"{prefix}replica", source=info.source, repository=info.repository, point=info.point,
                      state=info.state, updated=info.updated or now())
    for disk, size in info.disks.items():
        el = ET.SubElement(root, f"{prefix}disk", name=disk, size=str(size))
        if stamps and disk in stamps:
            el.set("stamp", stamps[disk])
    return root


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse(name: str, text: str) -> ReplicaInfo:
    return parse_record(name, text)[0]


def parse_record(name: str, text: str) -> tuple[ReplicaInfo, dict[str, str]]:
    """The record and the disks' stamps it holds (none but for a ``standby`` one)."""
    root = ET.fromstring(text)
    state = root.get("state", "")
    if state not in STATES:
        raise HypervisorError(f"the replica metadata of {name} has an unknown state {state!r}: upgrade vmkeep")
    elements = [d for d in root if _local(d.tag) == "disk"]
    disks = {d.get("name", ""): int(d.get("size", "0")) for d in elements}
    stamps = {d.get("name", ""): d.get("stamp", "") for d in elements if d.get("stamp")}
    return ReplicaInfo(name=name, source=root.get("source", ""), repository=root.get("repository", ""),
                       point=root.get("point", ""), state=cast(ReplicaState, state), disks=disks,
                       updated=root.get("updated", "")), stamps


def read(dom: libvirt.virDomain) -> ReplicaInfo | None:
    """The replica record of a domain (its persistent definition), None when it has none."""
    found = read_record(dom)
    return None if found is None else found[0]


def read_record(dom: libvirt.virDomain) -> tuple[ReplicaInfo, dict[str, str]] | None:
    """``read``, and the disks' stamps the record holds."""
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    except libvirt.libvirtError as exc:
        # no vmkeep metadata, a transient domain, or one that went since it was listed
        if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_NO_DOMAIN,
                                        libvirt.VIR_ERR_OPERATION_INVALID):
            log.warning("cannot read the metadata of %s: %s", dom.name(), exc.get_error_message())
        return None
    info, stamps = parse_record(dom.name(), text)
    info.running = bool(dom.isActive())
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    info.paths = {spec.target: spec.source for spec in disk_specs(xml) if spec.target in info.disks}
    return info, stamps


def write(dom: libvirt.virDomain, info: ReplicaInfo, stamps: dict[str, str] | None = None) -> None:
    """Replace the record in the persistent definition (and the running one, if it runs)."""
    info.updated = now()
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
    text = ET.tostring(element(info, stamps=stamps), encoding="unicode")
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
