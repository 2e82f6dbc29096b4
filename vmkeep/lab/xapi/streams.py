"""The bodies of XAPI's /import_raw_vdi and /export_raw_vdi, against the simulator's images.

An import writes through a writable qemu-nbd of the live image, so the enabled CBT bitmap
records it like a guest write. XAPI's sparse "chunked" format is a series of
``[offset: u64 LE][length: u32 LE][data]`` ended by a header with length 0: only the ranges
sent are written. Without it the body is the whole disk, exactly virtual_size bytes.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import nbd

from vmkeep.errors import ImageError
from vmkeep.lab.xapi.images import Images, image_opts
from vmkeep.transport.nbd_client import NbdExport
from vmkeep.transport.qemu_nbd import ImageInfo, serve_image, serve_on_socket

log = logging.getLogger(__name__)

PIECE = 4 << 20  # bytes per NBD request and per yielded piece
HEADER = struct.Struct("<QI")
_ZEROS = bytes(PIECE)


class StreamError(Exception):
    """An import or export failed the way XAPI reports it: ``code`` is XAPI's error code."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class _Body:
    """The request body, read exactly, never past ``length`` when it is known."""

    def __init__(self, body: BinaryIO, length: int | None) -> None:
        self.body = body
        self.left = length

    def read(self, n: int, *, eof_ok: bool = False) -> bytes:
        if self.left is not None:
            if n > self.left:
                if eof_ok and self.left == 0:
                    return b""
                raise StreamError("VDI_IO_ERROR", f"the body ends {self.left} bytes in where {n} more were due")
            self.left -= n
        parts, got = [], 0
        while got < n:
            part = self.body.read(n - got)
            if not part:
                if eof_ok and got == 0:
                    return b""
                raise StreamError("VDI_IO_ERROR", f"the body ended {n - got} bytes short")
            parts.append(part)
            got += len(part)
        return b"".join(parts)


def import_stream(images: Images, uuid: str, body: BinaryIO, length: int | None, *, chunked: bool) -> None:
    """Write a request body into a live VDI and flush it; raises :class:`StreamError`."""
    try:
        size = images.size(uuid)
        with images.writing(uuid) as path, \
                serve_image(ImageInfo(path, "qcow2", size, probed=False), readonly=False, connections=1) as uri:
            dst = NbdExport(uri)
            try:
                src = _Body(body, length)
                written = _chunked(src, dst, size) if chunked else _raw(src, dst, size)
                dst.flush()
            finally:
                dst.close()
    except ImageError as exc:
        raise StreamError("VDI_IO_ERROR", str(exc)) from exc
    log.info("imported %d bytes into VDI %s (%s)", written, uuid, "chunked" if chunked else "raw")


def _chunked(src: _Body, dst: NbdExport, size: int) -> int:
    written = 0
    while True:
        header = src.read(HEADER.size)
        offset, length = HEADER.unpack(header)
        if length == 0:
            return written
        if offset + length > size:
            raise StreamError("VDI_IO_ERROR", f"a chunk of {length} bytes at {offset} is beyond the disk's "
                                              f"{size} bytes")
        end = offset + length
        while offset < end:
            n = min(PIECE, end - offset)
            dst.pwrite(src.read(n), offset)
            offset += n
            written += n


def _raw(src: _Body, dst: NbdExport, size: int) -> int:
    """The whole disk: zero pieces become NBD zero requests, so the image stays sparse."""
    if src.left is not None and src.left != size:
        raise StreamError("VDI_IO_ERROR", f"the body has {src.left} bytes; the disk has {size}")
    h = dst.handle()
    offset = 0
    while offset < size:
        n = min(PIECE, size - offset)
        data = src.read(n)
        try:
            if data == _ZEROS[:n]:
                h.zero(n, offset)
            else:
                h.pwrite(data, offset)
        except nbd.Error as exc:
            raise StreamError("VDI_IO_ERROR", f"writing {n} bytes at {offset} failed: {exc}") from exc
        offset += n
    if src.read(1, eof_ok=True):
        raise StreamError("VDI_IO_ERROR", f"the body is longer than the disk's {size} bytes")
    return size


def export_stream(images: Images, uuid: str) -> Iterator[bytes]:
    """The VDI's whole virtual disk, raw, in pieces (a snapshot VDI: its internal snapshot).
    A VDI without data fails here, before any piece; holes are yielded as zeros, not read."""
    try:
        path, snapshot = images.source(uuid)
    except ImageError as exc:
        raise StreamError("VDI_INCOMPATIBLE_TYPE", str(exc)) from exc
    return _export(images, path, snapshot, images.size(uuid))


def _export(images: Images, path: Path, snapshot: str | None, size: int) -> Iterator[bytes]:
    load = ["--load-snapshot", f"snapshot.name={snapshot}"] if snapshot else []

    def command(sock: Path) -> list[str]:
        return ["qemu-nbd", f"--socket={sock}", "--read-only", "--persistent", "--shared=0", *load,
                "--image-opts", image_opts(path)]

    with ExitStack() as stack:
        with images.lock:  # opened while nothing changes the file
            uri = stack.enter_context(serve_on_socket(command, f"qemu-nbd exporting {path} over HTTP",
                                                      lambda uri: NbdExport(uri).close()))
        src = NbdExport(uri)
        stack.callback(src.close)
        pos = 0
        for extent in src.data_extents():
            if extent.offset >= size:
                break
            yield from _zeros(extent.offset - pos)
            end = min(extent.offset + extent.length, size)
            pos = extent.offset
            while pos < end:
                n = min(PIECE, end - pos)
                yield src.pread(n, pos)
                pos += n
        yield from _zeros(size - pos)
    log.info("exported %s%s (%d bytes)", path, f" snapshot {snapshot}" if snapshot else "", size)


def _zeros(n: int) -> Iterator[bytes]:
    while n > 0:
        yield _ZEROS[:min(n, PIECE)]
        n -= PIECE
