"""NBD client side built on libnbd: connections per thread and extent maps.

libnbd's Python binding releases the GIL while a request is in flight, so one handle per
worker thread gives parallel reads without per-byte Python work.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, unquote

import nbd

from vmkeep.errors import ImageError
from vmkeep.transport.extents import Extent, merge

log = logging.getLogger(__name__)

DEFAULT_TLS_DIR = Path("/etc/pki/vmkeep")
STATE_HOLE = 1
STATE_ZERO = 2
ALLOCATION = "base:allocation"
# NBD's request length is 32 bits: a 8 GiB disk's map takes 2 round trips instead of 8
MAX_STATUS_REQUEST = (1 << 32) - (1 << 20)


def client_tls_dir() -> Path | None:
    """Where this proxy keeps its NBD client certificates (ca-cert.pem, client-cert.pem,
    client-key.pem; ``VMKEEP_NBD_TLS_DIR`` overrides), or None when it has none."""
    from vmkeep.settings import settings

    directory = settings().nbd_tls_dir or DEFAULT_TLS_DIR
    needed = ("ca-cert.pem", "client-cert.pem", "client-key.pem")
    return directory if all((directory / n).is_file() for n in needed) else None


def unix_uri(socket: str | Path, export: str = "") -> str:
    """The NBD URI of an export on a unix socket, its path percent-encoded (libnbd decodes it): a
    path with ``&``, ``#`` or ``%`` in it would otherwise end or change the query."""
    return f"nbd+unix:///{quote(export, safe='')}?socket={quote(str(socket), safe='/')}"


def unix_socket_of(uri: str) -> str:
    """The socket path of a :func:`unix_uri`."""
    return unquote(uri.split("socket=", 1)[1])


class NbdExport:
    """One NBD export (``nbd+unix:///?socket=…`` or ``nbd://host:port/name``), shared by threads."""

    def __init__(self, uri: str, dirty_context: str | None = None,
                 on_reconnect: Callable[[], None] | None = None) -> None:
        self.uri = uri
        self.on_reconnect = on_reconnect  # called after a read that succeeded only on a new connection
        self.dirty_context = dirty_context
        self._local = threading.local()
        self._handles: list[nbd.NBD] = []
        self._lock = threading.Lock()
        probe = self.handle()
        self.size: int = probe.get_size()
        self.can_zero_map = probe.can_meta_context(ALLOCATION)
        if dirty_context is not None and not probe.can_meta_context(dirty_context):
            raise ImageError(f"the NBD export {uri} does not offer {dirty_context}; the bitmap is missing")

    def _connect(self) -> nbd.NBD:
        h = nbd.NBD()
        if log.isEnabledFor(logging.DEBUG):  # --debug: libnbd's own trace into vmkeep's log
            h.set_debug_callback(lambda context, message: log.debug("libnbd %s: %s", context, message))
            h.set_debug(True)
        # The server fills every byte of a successful read: zero-filling the buffer first is waste.
        h.set_pread_initialize(False)
        # Connectors name the client certificates in the URI (tls-certificates=DIR); the URIs are
        # ours, never a user's, so reading that local directory is safe.
        h.set_uri_allow_local_file(True)
        h.add_meta_context(ALLOCATION)
        if self.dirty_context:
            h.add_meta_context(self.dirty_context)
        try:
            h.connect_uri(self.uri)
        except nbd.Error as exc:
            raise ImageError(f"cannot connect to the NBD export {self.uri}: {exc}") from exc
        log.debug("connected to %s (%s)", self.uri, h.get_protocol())
        return h

    def handle(self) -> nbd.NBD:
        """This thread's connection (opened on first use)."""
        h = getattr(self._local, "handle", None)
        if h is None:
            h = self._local.handle = self._connect()
            with self._lock:
                self._handles.append(h)
        return h

    def pread(self, length: int, offset: int) -> bytes:
        """Read a range; a connection that dropped is opened again once and the read retried (reads
        are idempotent), so a passing network fault does not fail a long backup."""
        failure: Exception
        try:
            return self.handle().pread(length, offset)
        except (nbd.Error, ImageError) as exc:  # also a connection cut while it was being opened
            failure = exc
        log.warning("reading %d bytes at %d from %s failed (%s): connecting again to retry once", length, offset,
                    self.uri, failure)
        try:
            data: bytes = self._reconnect().pread(length, offset)
        except (nbd.Error, ImageError) as exc:
            raise ImageError(f"reading {length} bytes at {offset} from {self.uri} failed: {failure}; "
                             f"connecting again did not help: {exc}") from exc
        log.info("the read at %d from %s succeeded on a new connection", offset, self.uri)
        if self.on_reconnect is not None:
            self.on_reconnect()
        return data

    def _reconnect(self) -> nbd.NBD:
        """This thread's connection, replaced by a new one."""
        old = getattr(self._local, "handle", None)
        self._local.handle = None
        with self._lock:
            if old is not None and old in self._handles:
                self._handles.remove(old)
        return self.handle()

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        try:
            self.handle().pwrite(data, offset)
        except nbd.Error as exc:
            raise ImageError(f"writing {len(data)} bytes at {offset} to {self.uri} failed: {exc}") from exc

    def flush(self) -> None:
        with self._lock:
            handles = list(self._handles)
        for h in handles:
            if h.can_flush():
                try:
                    h.flush()
                except nbd.Error as exc:
                    raise ImageError(f"flushing the writes to {self.uri} failed: {exc}") from exc

    def _status(self, context: str) -> Iterator[tuple[int, int, int]]:
        """(offset, length, flags) over the whole export for one metadata context."""
        h = self.handle()
        pos = 0
        while pos < self.size:
            found: list[tuple[int, int, int]] = []

            def callback(meta: str, offset: int, entries: list[int], err: int, found: list = found) -> int:
                if meta == context:
                    at = offset
                    for i in range(0, len(entries), 2):
                        found.append((at, entries[i], entries[i + 1]))
                        at += entries[i]
                return 0

            h.block_status(min(MAX_STATUS_REQUEST, self.size - pos), pos, callback)
            if not found:
                raise ImageError(f"{self.uri} returned no block status for {context} at offset {pos}")
            for offset, length, flags in found:
                length = min(length, self.size - offset)
                if length > 0:
                    yield offset, length, flags
            pos = found[-1][0] + found[-1][1]

    def data_extents(self) -> list[Extent]:
        """Ranges that may hold non-zero data; holes and known-zero ranges are never read."""
        if not self.can_zero_map:
            return [Extent(0, self.size)]
        return merge(Extent(o, n) for o, n, f in self._status(ALLOCATION) if not f & STATE_ZERO)

    def dirty_extents(self) -> list[Extent]:
        """Ranges the dirty bitmap marks as written since it was started."""
        assert self.dirty_context is not None
        return merge(Extent(o, n) for o, n, f in self._status(self.dirty_context) if f & 1)

    def close(self) -> None:
        with self._lock:
            handles, self._handles = self._handles, []
        for h in handles:
            try:
                h.shutdown()
            except nbd.Error as exc:  # the server went first (dropped, or stopped): nothing left to close
                log.debug("NBD shutdown: %s", exc)
            del h


@contextmanager
def open_export(uri: str, dirty_context: str | None = None) -> Iterator[NbdExport]:
    export = NbdExport(uri, dirty_context)
    try:
        yield export
    finally:
        export.close()
