"""The heartbeat of a sandboxed libvirt VM, for boot checks (vmkeep.engine.boot_check): its guest
agent answers a ping, or its serial console log shows a marker the guest prints once it is up."""

from __future__ import annotations

import json
import logging
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import libvirt
import libvirt_qemu

if TYPE_CHECKING:
    from vmkeep.hypervisors.libvirt.connector import LibvirtConnector

log = logging.getLogger(__name__)


def _agent_answers(dom: libvirt.virDomain) -> bool:
    try:
        libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": "guest-ping"}), 5, 0)
        return True
    except libvirt.libvirtError as exc:  # expected until the guest agent is up
        log.debug("guest agent of %s not answering yet (%s)", dom.name(), exc.get_error_message())
        return False


def _console_shows(dom: libvirt.virDomain, marker: str) -> bool:
    log_file = ET.fromstring(dom.XMLDesc(0)).find("./devices/serial/log")
    path = Path(log_file.get("file", "")) if log_file is not None else None
    if path is None or not path.is_file():
        return False
    return marker in path.read_text(errors="replace")


def wait_heartbeat(connector: LibvirtConnector, name: str, *, timeout: float, marker: str | None = None) -> bool:
    """Whether ``name`` shows its heartbeat within ``timeout`` s (False as soon as it stops)."""
    dom = connector.domain(name)
    log.info("libvirt: waiting up to %.0f s for %s on %s to show %s", timeout, name, connector.uri,
             f"console marker {marker!r}" if marker else "a guest agent ping")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and dom.isActive():
        if _console_shows(dom, marker) if marker else _agent_answers(dom):
            return True
        time.sleep(1)
    return False
