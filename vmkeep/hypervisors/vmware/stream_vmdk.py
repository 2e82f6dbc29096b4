"""A streamOptimized VMDK writer: the disk format vSphere's NFC import takes as one HTTP stream.

VMware's "Virtual Disk Format 1.1" sparse extent with compressed grains and markers: a header
saying the grain directory comes at the end (GD_AT_END), the embedded descriptor, then each
non-zero 64 KiB grain as a marker (its LBA and compressed size) and its deflate data, padded to
a sector; each grain table follows the grains of its 32 MiB once the stream has passed them;
the grain directory, a footer (the header again, now with the directory's offset) and the
end-of-stream marker close it. Zero grains never travel: a missing table entry reads as zeros.

The work is split for a restore's pipeline: :meth:`StreamVmdk.encode` compresses one chunk and
is pure, so worker threads run it in parallel (zlib releases the GIL); :meth:`StreamVmdk.append`
takes the encoded chunks in ascending order on one thread, hands back the bytes to send and
records where each grain landed; :meth:`StreamVmdk.trailer` gives the tables and footer.
"""

from __future__ import annotations

import secrets
import struct
import zlib
from dataclasses import dataclass, field

SECTOR = 512
GRAIN = 64 << 10  # bytes; the grain size of every streamOptimized disk vSphere writes
GRAIN_SECTORS = GRAIN // SECTOR
GTES = 512  # entries per grain table: one table covers 32 MiB
GT_BYTES = GTES * 4
MAGIC = 0x564D444B  # "KDMV" on disk
VERSION = 3
FLAGS = 0x1 | 0x10000 | 0x20000  # newline test valid, compressed grains, markers
GD_AT_END = 0xFFFFFFFFFFFFFFFF
DEFLATE = 1
OVERHEAD_SECTORS = 128  # header and descriptor, padded to one grain as VMware's writers do
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
_HEADER = struct.Struct("<IIIQQQQIQQQB4sH")
_GRAIN_MARKER = struct.Struct("<QI")
PROBE = 4096  # bytes of a grain compressed first, to see whether the rest is worth it
_ZERO_GRAIN = bytes(GRAIN)


def _pad(data: bytes) -> bytes:
    """``data`` with zeros up to the next sector boundary."""
    return data + bytes(-len(data) % SECTOR)


def _marker(sectors: int, kind: int) -> bytes:
    """A metadata marker: how many sectors of metadata follow, and which."""
    return _pad(struct.pack("<QII", sectors, 0, kind))


@dataclass(frozen=True)
class Encoded:
    """One chunk's non-zero grains: (grain number, compressed data), ascending."""

    offset: int
    length: int  # of the chunk
    grains: list[tuple[int, bytes]]


@dataclass
class StreamVmdk:
    """The stream of one disk of ``size`` bytes (rounded up to a whole sector)."""

    size: int
    name: str = "disk.vmdk"  # the extent's file name in the descriptor
    level: int = 1  # zlib level: 1 keeps up with the restore; the data is mostly compressed already
    adapter: str = "lsilogic"
    position: int = 0  # bytes handed out so far
    _table: int = -1  # the grain table being filled (its index), or -1
    _entries: list[int] = field(default_factory=list)
    _directory: dict[int, int] = field(default_factory=dict)  # table index → its sector
    _last_grain: int = -1
    _descriptor_sectors: int = 0

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"a disk of {self.size} bytes cannot be a VMDK: vSphere disks hold at least one sector")

    @property
    def sectors(self) -> int:
        return -(-self.size // SECTOR)

    @property
    def grains(self) -> int:
        return -(-self.sectors // GRAIN_SECTORS)

    @property
    def tables(self) -> int:
        return -(-self.grains // GTES)

    def descriptor(self) -> bytes:
        cylinders = min(max(self.sectors // (255 * 63), 1), 65535)
        return "\n".join([
            "# Disk DescriptorFile", "version=1", 'encoding="UTF-8"', f"CID={secrets.token_hex(4)}",
            "parentCID=ffffffff", 'createType="streamOptimized"', "",
            "# Extent description", f'RW {self.sectors} SPARSE "{self.name}"', "",
            "# The Disk Data Base", "#DDB", "",
            f'ddb.adapterType = "{self.adapter}"', f'ddb.geometry.cylinders = "{cylinders}"',
            'ddb.geometry.heads = "255"', 'ddb.geometry.sectors = "63"', 'ddb.virtualHWVersion = "4"',
            f'ddb.longContentID = "{secrets.token_hex(16)}"', "",
        ]).encode()

    def _header(self, gd_offset: int, descriptor_sectors: int) -> bytes:
        return _pad(_HEADER.pack(MAGIC, VERSION, FLAGS, self.sectors, GRAIN_SECTORS, 1 if descriptor_sectors else 0,
                                 descriptor_sectors, GTES, 0, gd_offset, OVERHEAD_SECTORS, 0, b"\n \r\n", DEFLATE))

    def header(self) -> bytes:
        """The stream's first bytes: header and descriptor, up to where grains start."""
        if self.position:
            raise ValueError("the header starts the stream: it was sent already")
        descriptor = _pad(self.descriptor())
        if 1 + len(descriptor) // SECTOR > OVERHEAD_SECTORS:
            raise ValueError("the VMDK descriptor does not fit before the first grain")
        self._descriptor_sectors = len(descriptor) // SECTOR
        head = self._header(GD_AT_END, self._descriptor_sectors) + descriptor
        return self._out(head + bytes(OVERHEAD_SECTORS * SECTOR - len(head)))

    def encode(self, data: bytes, offset: int) -> Encoded:
        """Compress each non-zero grain of the chunk at ``offset`` (a multiple of the grain).
        Pure and thread-safe: run it on as many workers as there are."""
        if offset % GRAIN:
            raise ValueError(f"chunk at {offset} does not start on a 64 KiB grain: the repository's chunk "
                             "sizes are whole grains, so this stream cannot take it")
        if offset + len(data) > self.sectors * SECTOR:
            raise ValueError(f"chunk at {offset} ({len(data)} bytes) runs past the disk's {self.size} bytes")
        data = bytes(data)
        grains = []
        for at in range(0, len(data), GRAIN):
            piece = data[at:at + GRAIN]  # a copy, but comparing bytes is ~20× faster than a memoryview
            if piece == _ZERO_GRAIN[:len(piece)]:
                continue
            if len(piece) < GRAIN:  # the disk's last grain: whole, as readers expect
                piece += bytes(GRAIN - len(piece))
            grains.append(((offset + at) // GRAIN, self._deflate(piece)))
        return Encoded(offset, len(data), grains)

    def _deflate(self, grain: bytes) -> bytes:
        """The grain as a zlib stream: compressed when a probe of its start shrinks, else stored
        (level 0 runs ~8× faster, and compressing encrypted or compressed data gains nothing)."""
        if len(zlib.compress(grain[:PROBE], self.level)) > PROBE * 0.9:
            return zlib.compress(grain, 0)
        return zlib.compress(grain, self.level)

    def append(self, encoded: Encoded) -> bytes:
        """The bytes of an encoded chunk (and of the grain tables the stream has passed), in
        ascending order only."""
        if not self.position:
            raise ValueError("send the header first")
        out: list[bytes] = []
        at = self.position
        for grain, data in encoded.grains:
            if grain <= self._last_grain:
                raise ValueError(f"grain {grain} comes after grain {self._last_grain}: chunks must be appended in "
                                 "ascending offsets")
            table = grain // GTES
            if table != self._table:
                closed = self._close_table(at)
                out.append(closed)
                at += len(closed)
                self._table, self._entries = table, [0] * GTES
            self._entries[grain % GTES] = at // SECTOR
            marker = _GRAIN_MARKER.pack(grain * GRAIN_SECTORS, len(data))
            padding = bytes(-(len(marker) + len(data)) % SECTOR)
            out += (marker, data, padding)
            at += len(marker) + len(data) + len(padding)
            self._last_grain = grain
        return self._out(b"".join(out))

    def _close_table(self, at: int) -> bytes:
        """The grain table being filled, with its marker, to go at stream offset ``at``; b"" when
        there is none."""
        if self._table < 0:
            return b""
        self._directory[self._table] = at // SECTOR + 1  # after its marker
        table = struct.pack(f"<{GTES}I", *self._entries)
        self._table = -1
        return _marker(GT_BYTES // SECTOR, MARKER_GT) + table

    def trailer(self) -> bytes:
        """The end of the stream: the last grain table, the directory, the footer (a copy of the
        header that knows where the directory is), end of stream."""
        if not self.position:
            raise ValueError("send the header first")
        last = self._close_table(self.position)
        directory = _pad(struct.pack(f"<{self.tables}I", *(self._directory.get(t, 0) for t in range(self.tables))))
        gd_sector = (self.position + len(last)) // SECTOR + 1
        footer = self._header(gd_sector, self._descriptor_sectors)
        return self._out(last + _marker(len(directory) // SECTOR, MARKER_GD) + directory
                         + _marker(1, MARKER_FOOTER) + footer + _marker(0, MARKER_EOS))

    def _out(self, data: bytes) -> bytes:
        self.position += len(data)
        return data
