"""The connection to libvirtd: opening it (answering SASL with the credentials given), getting it
back after libvirtd restarts, and looking VMs up by name with errors that say what to do.

libvirt's default error handler prints every failure on stderr besides raising it; it is replaced
once here, so errors arrive only as exceptions.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any
from urllib.parse import urlparse

import libvirt

from vmkeep.hypervisors.base import HypervisorError

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 30  # libvirtd restarting takes a few seconds; a backup waits this long for it

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions, not on stderr


def is_own_address(hostname: str | None) -> bool:
    """Whether ``hostname`` names this machine (in this network namespace): one of its addresses
    can be bound here only if it is assigned to an interface here."""
    if not hostname:
        return False
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(hostname, None, proto=socket.IPPROTO_UDP)}
    except OSError:
        return False
    for address in addresses:
        family = socket.AF_INET6 if ":" in str(address) else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((address, 0))
                return True
            except OSError:
                continue
    return False


class Connection:
    """One libvirt connection and where it leads: ``host``, and ``is_local`` when that is this
    machine (hotadd, offline reads and host paths need it). ``conn`` is replaced when libvirtd
    restarts under a backup (``alive``), so hold this object, not ``conn``."""

    def __init__(self, uri: str, credentials: tuple[str, str] | None = None) -> None:
        self.uri = uri
        self.credentials = credentials
        parsed = urlparse(uri)
        self.host = parsed.hostname or socket.gethostname()
        self.is_local = parsed.hostname in (None, "", "localhost", "127.0.0.1", socket.gethostname()) \
            or is_own_address(parsed.hostname)
        try:
            self.conn = self._open()
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot connect to libvirt at {uri}: {exc.get_error_message()}; is libvirtd "
                                  "running and the URI right?") from exc

    def _open(self) -> libvirt.virConnect:
        log.debug("opening libvirt connection %s (%s)", self.uri,
                  "with credentials" if self.credentials else "without credentials")
        if self.credentials is None:
            return libvirt.open(self.uri)
        user, password = self.credentials

        def answer(creds: list[list[Any]], _data: object) -> int:
            for cred in creds:
                if cred[0] == libvirt.VIR_CRED_AUTHNAME:
                    cred[4] = user
                elif cred[0] == libvirt.VIR_CRED_PASSPHRASE:
                    cred[4] = password
            return 0

        return libvirt.openAuth(self.uri, [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], answer, None], 0)

    def _reconnect(self, dom: libvirt.virDomain) -> libvirt.virDomain:
        """A fresh connection and domain handle after libvirtd restarted (waits up to 30 s)."""
        uuid = dom.UUIDString()
        deadline = time.monotonic() + RECONNECT_SECONDS
        while True:
            try:
                self.conn = self._open()
                fresh = self.conn.lookupByUUIDString(uuid)
                log.info("reconnected to %s; VM %s found again", self.uri, fresh.name())
                return fresh
            except libvirt.libvirtError as exc:
                if time.monotonic() > deadline:
                    log.warning("libvirtd at %s did not come back within %d s: %s", self.uri, RECONNECT_SECONDS,
                                exc.get_error_message())
                    raise
                log.debug("reconnecting to %s: %s", self.uri, exc.get_error_message())
                time.sleep(0.5)

    def alive(self, dom: libvirt.virDomain) -> libvirt.virDomain:
        """``dom``, or a new handle to it if the connection to libvirtd was lost."""
        try:
            dom.isActive()  # a real round trip to libvirtd (dom.ID() is answered from a local cache)
            return dom
        except libvirt.libvirtError as exc:
            log.warning("lost the connection to %s (%s); reconnecting", self.uri, exc.get_error_message())
            return self._reconnect(dom)

    def domain(self, name: str) -> libvirt.virDomain:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"no VM named {name!r} on {self.uri}; see `vmkeep inventory --host {self.uri}`") \
                from exc

    def exists(self, name: str) -> bool:
        try:
            self.conn.lookupByName(name)
            return True
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                log.warning("cannot look up VM %s on %s (%s): taken as absent", name, self.uri,
                            exc.get_error_message())
            return False

    def close(self) -> None:
        try:
            self.conn.close()
        except libvirt.libvirtError as exc:
            log.warning("closing the connection to %s failed: %s", self.uri, exc.get_error_message())
