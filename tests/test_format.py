"""The stored formats: chunks, keys, indexes and manifests reject what is not theirs."""

from __future__ import annotations

import os

import pytest

from vmkeep.errors import ObjectCorrupt
from vmkeep.repository.chunks import (
    FLAG_AESGCM,
    FLAG_ZSTD,
    HEADER,
    decode_chunk,
    encode_chunk,
    encode_chunk_into,
    max_stored_size,
)
from vmkeep.repository.crypto import RepositoryKeys, new_secret
from vmkeep.repository.index import ZERO_ID, DiskIndex
from vmkeep.repository.points import DiskEntry, Manifest, decode_manifest, encode_manifest
from vmkeep.transport.extents import Extent, intersect, parse_extent_file, ranges_by_slot, subtract, touched_slots

MiB = 1 << 20


@pytest.mark.parametrize("encrypted", [False, True])
def test_chunk_round_trip_and_flags(encrypted: bool) -> None:
    keys = RepositoryKeys.derive(new_secret(), encrypted)
    text = b"vmkeep " * (MiB // 7)
    noise = os.urandom(MiB)
    for data, compressed in ((text, True), (noise, False)):
        cid = keys.chunk_id(data)
        stored = encode_chunk(keys, cid, data, level=1)
        flags = HEADER.unpack_from(stored)[2]
        assert bool(flags & FLAG_ZSTD) == compressed  # incompressible data is kept raw
        assert bool(flags & FLAG_AESGCM) == encrypted
        assert (data in stored) == (not encrypted and not compressed)
        assert decode_chunk(keys, cid, stored, len(data)) == data


@pytest.mark.parametrize("encrypted", [False, True])
def test_chunk_encoded_in_place_has_the_same_format(encrypted: bool) -> None:
    """The in-place encoder (used for direct writes) and the parts encoder store the same thing."""
    keys = RepositoryKeys.derive(new_secret(), encrypted)
    for data in (b"vmkeep " * (MiB // 7), os.urandom(MiB + 3)):
        cid = keys.chunk_id(data)
        out = memoryview(bytearray(max_stored_size(len(data)) + 100))
        n = encode_chunk_into(keys, cid, data, 1, out)
        stored = bytes(out[:n])
        reference = encode_chunk(keys, cid, data, 1)
        assert HEADER.unpack_from(stored)[2] == HEADER.unpack_from(reference)[2]  # same flags
        assert len(stored) == len(reference)
        if not encrypted:
            assert stored == reference
        assert decode_chunk(keys, cid, stored, len(data)) == data


def test_chunk_cannot_be_swapped_or_altered() -> None:
    keys = RepositoryKeys.derive(new_secret(), True)
    a, b = os.urandom(4096), os.urandom(4096)
    ida, idb = keys.chunk_id(a), keys.chunk_id(b)
    stored_a = encode_chunk(keys, ida, a, 1)
    with pytest.raises(ObjectCorrupt):  # served under another id: GCM's associated data catches it
        decode_chunk(keys, idb, stored_a, 4096)
    other_repo = RepositoryKeys.derive(new_secret(), True)
    with pytest.raises(ObjectCorrupt):
        decode_chunk(other_repo, ida, stored_a, 4096)
    assert other_repo.chunk_id(a) != ida  # ids are keyed: they reveal nothing across repositories


def test_index_round_trip_and_truncation() -> None:
    index = DiskIndex.empty(10 * MiB + 512, 4 * MiB)
    assert index.slots == 3 and index.slot_length(2) == 2 * MiB + 512
    index.put(1, b"\x01" * 32)
    data = index.encode()
    again = DiskIndex.decode(data, "idx")
    assert again.get(0) == ZERO_ID and again.get(1) == b"\x01" * 32 and list(again.nonzero()) == [(1, b"\x01" * 32)]
    with pytest.raises(ObjectCorrupt):
        DiskIndex.decode(data[:-3], "idx")


def test_manifest_mac() -> None:
    keys = RepositoryKeys.derive(new_secret(), False)
    m = Manifest("vm", "20260101T000000Z-abcdef", "2026-01-01T00:00:00+00:00", None,
                 {"vda": DiskEntry(MiB, "indexes/vm/x/vda.idx", "00")}, 4 * MiB)
    data = encode_manifest(m, keys.mac)
    assert decode_manifest(data, keys.mac, "m").disks["vda"].size == MiB
    with pytest.raises(ObjectCorrupt):
        decode_manifest(data.replace(b'"size": 1048576', b'"size": 2097152'), keys.mac, "m")
    with pytest.raises(ObjectCorrupt):
        decode_manifest(data, RepositoryKeys.derive(new_secret(), False).mac, "m")


def test_extent_arithmetic() -> None:
    extents = [Extent(0, 100), Extent(4 * MiB - 10, 20), Extent(50, 100)]
    slots = ranges_by_slot(extents, 4 * MiB)
    assert slots[0] == [Extent(0, 150), Extent(4 * MiB - 10, 10)] and slots[1] == [Extent(4 * MiB, 10)]
    assert touched_slots([Extent(4 * MiB, 1)], 4 * MiB) == {1}
    assert parse_extent_file("# changes\n0x1000 512\n8192, 4096\n", "f") == [Extent(4096, 512), Extent(8192, 4096)]
    with pytest.raises(ValueError, match="line 1"):
        parse_extent_file("12\n", "f")


def test_extent_intersection_and_difference() -> None:
    a = [Extent(0, 10), Extent(20, 10)]
    b = [Extent(5, 20)]
    assert intersect(a, b) == [Extent(5, 5), Extent(20, 5)]
    assert subtract(a, b) == [Extent(0, 5), Extent(25, 5)]
    assert subtract(b, a) == [Extent(10, 10)]
    assert intersect(a, []) == [] and subtract(a, []) == a
