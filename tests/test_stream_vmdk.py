"""The streamOptimized VMDK writer against qemu-img: every stream decodes to the raw source."""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vmkeep.hypervisors.vmware.stream_vmdk import GRAIN, SECTOR, StreamVmdk

MiB = 1 << 20
CHUNK = 4 * MiB


def write_stream(source: bytes, out: Path, *, chunk: int = CHUNK, size: int | None = None) -> int:
    """``source`` as a stream (chunks encoded in parallel, appended in order); its length."""
    stream = StreamVmdk(size if size is not None else len(source), name=out.name)
    offsets = range(0, len(source), chunk)
    with ThreadPoolExecutor(4) as pool:
        encoded = list(pool.map(lambda o: stream.encode(source[o:o + chunk], o), offsets))
    with out.open("wb") as f:
        f.write(stream.header())
        for e in encoded:
            f.write(stream.append(e))
        f.write(stream.trailer())
    assert stream.position == out.stat().st_size
    return stream.position


def same(vmdk: Path, raw: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "vmdk", "-F", "raw", str(vmdk), str(raw)]
                          ).returncode == 0


def info(vmdk: Path) -> dict:
    return dict(json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(vmdk)], capture_output=True,
                                          text=True, check=True).stdout))


def mixed(size: int) -> bytes:
    """Random data, zeros, text and a short run near the end."""
    data = bytearray(size)
    data[: 3 * MiB] = os.urandom(3 * MiB)
    text = b"the quick brown fox jumps over the lazy dog\n" * 40_000
    data[9 * MiB: 9 * MiB + len(text)] = text
    data[size - 7000: size - 100] = os.urandom(6900)
    data[5 * MiB + 100] = 1  # a single byte in an otherwise zero grain
    return bytes(data)


@pytest.mark.parametrize("size", [
    40 * MiB,  # two grain tables, whole chunks
    37 * MiB + 12 * 1024,  # neither a whole grain nor a whole chunk
    33 * MiB - 3 * SECTOR,  # ends inside the last grain of the second table
])
def test_streams_decode_to_the_source(tmp_path: Path, size: int) -> None:
    raw, vmdk = tmp_path / "disk.raw", tmp_path / "disk.vmdk"
    source = mixed(size)
    raw.write_bytes(source)
    length = write_stream(source, vmdk)
    assert same(vmdk, raw)
    found = info(vmdk)
    assert found["virtual-size"] == size and found["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert found["format-specific"]["data"]["extents"][0]["compressed"]
    assert length < 3 * MiB + 2 * MiB  # random data nearly as is, the text compressed, zeros left out


def test_zeros_and_an_empty_disk_send_almost_nothing(tmp_path: Path) -> None:
    raw, vmdk = tmp_path / "zeros.raw", tmp_path / "zeros.vmdk"
    source = bytes(64 * MiB)
    raw.write_bytes(source)
    assert write_stream(source, vmdk) < 80 * 1024  # header, descriptor, directory, footer
    assert same(vmdk, raw)
    # an empty disk: the restore sends no chunk at all
    empty_raw, empty = tmp_path / "empty.raw", tmp_path / "empty.vmdk"
    empty_raw.write_bytes(bytes(16 * MiB))
    write_stream(b"", empty, size=16 * MiB)
    assert same(empty, empty_raw) and info(empty)["virtual-size"] == 16 * MiB
    with pytest.raises(ValueError, match="0 bytes"):
        StreamVmdk(0)
    # a disk of which only the start is sent (the restore skips the zeros at the end)
    sized = tmp_path / "sized.vmdk"
    write_stream(b"\x07" * GRAIN, sized, size=48 * MiB)
    raw48 = tmp_path / "sized.raw"
    raw48.write_bytes(b"\x07" * GRAIN + bytes(48 * MiB - GRAIN))
    assert same(sized, raw48)


def test_random_data_at_scattered_places_and_small_chunks(tmp_path: Path) -> None:
    raw, vmdk = tmp_path / "s.raw", tmp_path / "s.vmdk"
    data = bytearray(100 * MiB)
    for at in (0, 31 * MiB + GRAIN, 32 * MiB, 70 * MiB + 5 * GRAIN, 100 * MiB - GRAIN):
        data[at: at + GRAIN] = os.urandom(GRAIN)
    raw.write_bytes(data)
    write_stream(bytes(data), vmdk, chunk=MiB)
    assert same(vmdk, raw)


def test_order_and_alignment_are_enforced() -> None:
    stream = StreamVmdk(8 * MiB)
    with pytest.raises(ValueError, match="header first"):
        stream.append(stream.encode(b"\x01" * GRAIN, 0))
    stream.header()
    later, earlier = stream.encode(b"\x01" * GRAIN, 4 * MiB), stream.encode(b"\x01" * GRAIN, 0)
    stream.append(later)
    with pytest.raises(ValueError, match="ascending"):
        stream.append(earlier)
    with pytest.raises(ValueError, match="64 KiB grain"):
        stream.encode(b"\x01" * 512, 512)
    with pytest.raises(ValueError, match="runs past"):
        stream.encode(b"\x01" * GRAIN, 8 * MiB)
