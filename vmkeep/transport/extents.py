"""Extent arithmetic: which byte ranges of which chunk slots must be read."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def merge(extents: Iterable[Extent]) -> list[Extent]:
    """Sort and coalesce touching or overlapping extents."""
    out: list[Extent] = []
    for e in sorted(extents, key=lambda x: x.offset):
        if e.length <= 0:
            continue
        if out and e.offset <= out[-1].end:
            last = out[-1]
            out[-1] = Extent(last.offset, max(last.end, e.end) - last.offset)
        else:
            out.append(e)
    return out


def ranges_by_slot(extents: Iterable[Extent], chunk_size: int) -> dict[int, list[Extent]]:
    """Split extents at chunk boundaries: slot → the parts of extents inside that slot."""
    slots: dict[int, list[Extent]] = {}
    for e in merge(extents):
        pos = e.offset
        while pos < e.end:
            slot = pos // chunk_size
            stop = min(e.end, (slot + 1) * chunk_size)
            slots.setdefault(slot, []).append(Extent(pos, stop - pos))
            pos = stop
    return slots


def intersect(a: Iterable[Extent], b: Iterable[Extent]) -> list[Extent]:
    """The ranges in both ``a`` and ``b``."""
    left, right, out = merge(a), merge(b), []
    i = j = 0
    while i < len(left) and j < len(right):
        start, end = max(left[i].offset, right[j].offset), min(left[i].end, right[j].end)
        if start < end:
            out.append(Extent(start, end - start))
        if left[i].end < right[j].end:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Iterable[Extent], b: Iterable[Extent]) -> list[Extent]:
    """The ranges of ``a`` outside ``b``."""
    out: list[Extent] = []
    holes = merge(b)
    for e in merge(a):
        pos = e.offset
        for h in holes:
            if h.end <= pos or h.offset >= e.end:
                continue
            if h.offset > pos:
                out.append(Extent(pos, h.offset - pos))
            pos = max(pos, h.end)
        if pos < e.end:
            out.append(Extent(pos, e.end - pos))
    return out


def touched_slots(extents: Iterable[Extent], chunk_size: int) -> set[int]:
    """Every chunk slot that at least one extent overlaps."""
    slots: set[int] = set()
    for e in merge(extents):
        slots.update(range(e.offset // chunk_size, (e.end - 1) // chunk_size + 1))
    return slots


def parse_extent_file(text: str, where: str) -> list[Extent]:
    """Lines of ``offset length`` (decimal or 0x-hex); '#' starts a comment."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        try:
            if len(parts) != 2:
                raise ValueError
            offset, length = (int(p, 0) for p in parts)
            if offset < 0 or length < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"{where} line {lineno}: expected 'OFFSET LENGTH', got {line!r}") from None
        out.append(Extent(offset, length))
    return merge(out)


class KnownExtents:
    """A disk source whose data extents the hypervisor reported (changed block tracking with
    ``*``): the export itself cannot tell (an HTTPS file reads as all data)."""

    def __init__(self, source: Any, extents: list[Extent]) -> None:
        self.source, self.extents = source, merge(extents)
        self.size: int = source.size

    def pread(self, length: int, offset: int) -> bytes:
        data: bytes = self.source.pread(length, offset)
        return data

    def data_extents(self) -> list[Extent]:
        return self.extents
