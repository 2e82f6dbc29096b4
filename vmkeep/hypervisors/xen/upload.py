"""A restored disk streamed into a VDI through XAPI's ``PUT /import_raw_vdi`` in its "chunked"
sparse format: each piece of data travels as ``[offset: u64 LE][length: u32 LE][data]`` and a
header of length 0 ends the body, so the holes of a new (all-zero) VDI are never sent.

Over an existing disk the zeros of the point must land too (the disk may hold data there): they
go as data chunks, one header per zero run (split only where a run outgrows the u32 length).

The body is written to the socket as the restore produces it (a sequential
:class:`~vmkeep.transport.targets.DiskWriter`), so nothing is held in memory whole. XAPI answers
once the data is on disk; a failure is a 500 with the error code in the body, or XAPI's known
quirk of a ``200`` whose body is an ``HTTP/1.1 500`` page.
"""

from __future__ import annotations

import http.client
import logging
import re
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from vmkeep.hypervisors.base import HypervisorError

if TYPE_CHECKING:
    from vmkeep.hypervisors.xen.session import XapiSession

log = logging.getLogger(__name__)

HEADER = struct.Struct("<QI")  # offset, length
MAX_PIECE = 1 << 31  # longest data chunk one header announces (the field is a u32; keep well inside it)
BLOCK = 64 << 10  # zero blocks inside a chunk of data are left out of a new disk's body
ZERO_BLOCK = bytes(BLOCK)
ZERO_PIECE = bytes(1 << 20)  # what a zero run is sent from, a MiB at a time
TIMEOUT = 600.0  # s without progress on the socket (XAPI flushes the VDI before it answers)
REPLY_LIMIT = 64 << 10  # bytes of a reply body read to find the error code
ERROR_CODE = re.compile(r"\b([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)\b")


class ImportFailed(HypervisorError):
    """XAPI refused or failed the import; ``code`` is its error code when it gave one."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Sent:
    """What one import put on the wire: body bytes, data bytes (zeros sent as data included),
    chunk headers."""

    body: int = 0
    data: int = 0
    chunks: int = 0


def data_pieces(data: bytes, offset: int) -> list[tuple[int, memoryview]]:
    """The non-zero stretches of ``data`` (at ``offset``), in 64 KiB blocks: a chunk of the
    repository may still hold zero blocks, which a new VDI has already."""
    pieces: list[tuple[int, memoryview]] = []
    view = memoryview(data)
    start = -1
    for at in range(0, len(data), BLOCK):
        block = data[at:at + BLOCK]  # a copy, but comparing bytes beats scanning a memoryview
        if block == ZERO_BLOCK[:len(block)]:
            if start >= 0:
                pieces.append((offset + start, view[start:at]))
                start = -1
        elif start < 0:
            start = at
    if start >= 0:
        pieces.append((offset + start, view[start:]))
    return pieces


class ChunkedImport:
    """The sequential disk writer of one ``import_raw_vdi`` body. ``zeros``: the point's zero
    runs are written too (over an existing disk); else they stay holes (a new, empty VDI)."""

    sequential = True

    def __init__(self, conn: http.client.HTTPConnection, size: int, *, zeros: bool, label: str) -> None:
        self.conn = conn
        self.size = size
        self.zeros = zeros
        self.label = label
        self.sent = Sent()
        self.at = 0  # where the next write may start (the body is in ascending offsets)

    def encode(self, data: bytes, offset: int) -> list[tuple[int, memoryview]]:
        """Runs on the restore's workers: a new disk's zero blocks are dropped here."""
        if self.zeros:
            return [(offset, memoryview(data))]
        return data_pieces(data, offset)

    def write(self, encoded: list[tuple[int, memoryview]], offset: int) -> None:
        for at, piece in encoded:
            self._chunk(at, len(piece), (piece,))

    def zero(self, offset: int, length: int) -> None:
        """A new VDI reads as zeros already; an existing disk gets the zeros as data."""
        if not self.zeros or not length:
            return
        end = offset + length
        while offset < end:
            n = min(MAX_PIECE, end - offset)
            self._chunk(offset, n, _zeros(n))
            offset += n

    def _chunk(self, offset: int, length: int, parts: Iterable[memoryview | bytes]) -> None:
        if offset < self.at:
            raise ValueError(f"{self.label}: data at {offset} comes after {self.at}: an import body is in ascending "
                             "offsets")
        if offset + length > self.size:
            raise ValueError(f"{self.label}: {length} bytes at {offset} run past the disk's {self.size} bytes")
        self._send(HEADER.pack(offset, length))
        for part in parts:
            self._send(part)
        self.sent.data += length
        self.sent.chunks += 1
        self.at = offset + length

    def _send(self, data: bytes | memoryview) -> None:
        try:
            self.conn.send(data)
        except OSError as exc:  # XAPI may have answered and hung up: its answer says why
            _raise_reply(self.conn, self.label, exc)
            raise HypervisorError(f"sending {self.label} to XAPI failed after {self.sent.body} bytes: {exc}") from exc
        self.sent.body += len(data)

    def end(self) -> None:
        """The header of length 0 that ends the body."""
        self._send(HEADER.pack(0, 0))


def _zeros(length: int) -> Iterator[bytes]:
    while length > 0:
        n = min(length, len(ZERO_PIECE))
        yield ZERO_PIECE if n == len(ZERO_PIECE) else ZERO_PIECE[:n]
        length -= n


def _code(body: bytes) -> str:
    found = ERROR_CODE.search(body.decode("utf-8", "replace"))
    return found.group(1) if found else ""


def check_reply(status: int, body: bytes, label: str) -> None:
    """Raise :class:`ImportFailed` unless XAPI took the data: status 200 with no error page in
    the body (XAPI may send a 500 page after its 200)."""
    inner = b"HTTP/1.1 500" in body[:REPLY_LIMIT] or b"HTTP/1.0 500" in body[:REPLY_LIMIT]
    if status == 200 and not inner:
        return
    code = _code(body.split(b"HTTP/1.1 500", 1)[-1] if inner else body)
    text = body[:300].decode("utf-8", "replace").strip().replace("\r\n", " ")
    raise ImportFailed(f"XAPI did not take {label}: {code or f'HTTP {status}'}"
                       f"{f' ({text})' if text and not code else ''}", code)


@contextmanager
def import_vdi(session: XapiSession, vdi_uuid: str, size: int, *, zeros: bool, label: str) -> Iterator[ChunkedImport]:
    """A ``PUT /import_raw_vdi`` of VDI ``vdi_uuid`` (``size`` bytes) written through the yielded
    writer; the body ends and XAPI's answer is checked when the context ends without an error.
    On an error the connection is dropped (XAPI keeps what arrived: the caller removes or
    rewrites the VDI)."""
    url = session.http_url("import_raw_vdi", vdi=vdi_uuid, format="raw", chunked="true")
    parts = urlsplit(url)
    path = f"{parts.path}?{parts.query}"
    conn = http.client.HTTPSConnection(parts.hostname or session.host, parts.port or session.port,
                                       context=session.ssl_context(), timeout=TIMEOUT)
    log.debug("PUT /import_raw_vdi of VDI %s (%s, %d bytes, %s) at %s:%s", vdi_uuid, label, size,
              "zeros written" if zeros else "holes left", session.host, session.port)
    try:
        try:
            conn.putrequest("PUT", path, skip_accept_encoding=True)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Connection", "close")  # the body's end is its header of length 0
            conn.endheaders()
        except (OSError, http.client.HTTPException) as exc:
            raise HypervisorError(f"cannot send {label} to XAPI at {session.host}:{session.port}: {exc}") from exc
        writer = ChunkedImport(conn, size, zeros=zeros, label=label)
        yield writer
        writer.end()
        _raise_reply(conn, label, None)
        log.info("%s: imported %d data bytes in %d chunks (%d body bytes) into VDI %s", label, writer.sent.data,
                 writer.sent.chunks, writer.sent.body, vdi_uuid)
    finally:
        conn.close()


def _raise_reply(conn: http.client.HTTPConnection, label: str, cause: OSError | None) -> None:
    """Read XAPI's answer and raise if it is a failure; after a send error (``cause``) an answer
    that cannot be read is no news (the caller reports the send error)."""
    try:
        reply = conn.getresponse()
        body = reply.read(REPLY_LIMIT)
    except (OSError, http.client.HTTPException) as exc:
        if cause is not None:
            return
        raise HypervisorError(f"XAPI gave no answer to {label}: {exc}") from exc
    log.debug("import_raw_vdi (%s): HTTP %d, %d body bytes", label, reply.status, len(body))
    if cause is not None and reply.status == 200 and not body:
        return
    try:
        check_reply(reply.status, body, label)
    except ImportFailed as failed:
        if cause is not None:
            raise failed from cause
        raise
