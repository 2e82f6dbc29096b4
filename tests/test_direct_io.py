"""Chunks reach the disk with O_DIRECT (no page-cache copy, no writeback on the CPU), byte-exact,
and the backend falls back to buffered writes where the filesystem refuses O_DIRECT."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from vmkeep.fsutil import in_memory
from vmkeep.repository.backends import FilesystemBackend, direct_io
from vmkeep.repository.backends.direct_io import ALIGN, MIN_SIZE, DirectUnsupported, write_file

SHM = Path("/dev/shm")


def cached_bytes(path: Path) -> int:
    """Bytes of the file resident in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def odd_parts() -> list[bytes | bytearray | memoryview]:
    """Parts of every kind the encoder hands over, none a multiple of the alignment."""
    payload = os.urandom(3 * 1024 * 1024 + 17)
    return [b"HDR-24-bytes-of-header!!", bytearray(os.urandom(12)), memoryview(payload),
            memoryview(bytes(os.urandom(1000)))]


@pytest.fixture
def disk_dir(tmp_path: Path) -> Path:
    """A directory on a disk filesystem (the suite's temporary directories are on the root ext4)."""
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], check=True, capture_output=True,
                            text=True).stdout.strip()
    assert fstype != "tmpfs", "these tests need a disk filesystem under pytest's temporary directory"
    return tmp_path


def test_direct_write_is_exact_and_bypasses_the_page_cache(disk_dir: Path) -> None:
    parts = odd_parts()
    target = disk_dir / "object"
    size = write_file(str(target), parts)
    expected = b"".join(bytes(p) for p in parts)
    assert size == len(expected) == target.stat().st_size
    assert cached_bytes(target) <= ALIGN, "a direct write left the data in the page cache"
    assert target.read_bytes() == expected


def test_an_object_encoded_in_the_staging_buffer_is_written_as_is(disk_dir: Path) -> None:
    payload = os.urandom(MIN_SIZE + 123)
    staging = direct_io.staging(len(payload))
    staging[:] = payload
    target = disk_dir / "staged"
    assert write_file(str(target), [staging]) == len(payload)
    assert cached_bytes(target) <= ALIGN  # only the last partial block
    assert target.read_bytes() == payload


def test_backend_writes_chunks_direct_and_reads_them_back(disk_dir: Path) -> None:
    backend = FilesystemBackend(disk_dir / "repo")
    parts = odd_parts()
    assert backend.put("chunks/ab/abcdef", parts, if_absent=True)
    stored = disk_dir / "repo" / "chunks/ab/abcdef"
    assert cached_bytes(stored) <= ALIGN
    assert backend.get("chunks/ab/abcdef") == b"".join(bytes(p) for p in parts)
    assert not backend.put("chunks/ab/abcdef", parts, if_absent=True)  # dedup: first writer wins
    assert [p.name for p in stored.parent.iterdir()] == ["abcdef"]  # no temporary left behind


def test_prefetch_brings_direct_written_chunks_into_the_page_cache(disk_dir: Path) -> None:
    """An incremental patches a partly written chunk from its parent, which O_DIRECT left out
    of the page cache: the prefetch hint starts reading it while the job is still being set up."""
    backend = FilesystemBackend(disk_dir / "repo")
    payload = os.urandom(4 << 20)
    assert backend.put("chunks/cd/cdef01", [payload], if_absent=True)
    stored = disk_dir / "repo" / "chunks/cd/cdef01"
    assert cached_bytes(stored) <= ALIGN
    backend.prefetch(["chunks/cd/cdef01", "chunks/00/missing"])  # a missing key is no error here
    deadline = time.monotonic() + 10
    while cached_bytes(stored) < len(payload) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cached_bytes(stored) == len(payload)
    assert backend.get("chunks/cd/cdef01") == payload


def test_small_and_durable_objects_stay_buffered(disk_dir: Path) -> None:
    backend = FilesystemBackend(disk_dir / "repo")
    backend.put("points/small", b"x" * (MIN_SIZE - 1))
    backend.put("points/manifest", b"y" * MIN_SIZE, durable=True)
    assert cached_bytes(disk_dir / "repo/points/small") > 0
    assert cached_bytes(disk_dir / "repo/points/manifest") > 0


def test_tmpfs_is_written_buffered() -> None:
    """On tmpfs the page cache is the storage: a direct write would only add a copy."""
    assert in_memory(str(SHM))
    root = SHM / f"vmkeep-direct-{os.getpid()}"
    try:
        backend = FilesystemBackend(root)
        parts = odd_parts()
        assert backend.put("chunks/cd/cdef", parts, if_absent=True)
        assert backend.get("chunks/cd/cdef") == b"".join(bytes(p) for p in parts)
        assert backend._direct is False  # noqa: SLF001 - the choice is the behaviour under test
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)


def test_a_filesystem_refusing_o_direct_gets_buffered_writes(disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some filesystems (FUSE, older tmpfs) answer O_DIRECT with EINVAL: the backend goes on buffered."""
    assert not in_memory(str(disk_dir))

    def refuse(path: str, parts: object) -> int:
        raise DirectUnsupported("EINVAL")

    monkeypatch.setattr(direct_io, "write_file", refuse)
    backend = FilesystemBackend(disk_dir / "repo")
    parts = odd_parts()
    assert backend.put("chunks/ef/ef01", parts, if_absent=True)
    assert backend.put("chunks/ef/ef02", parts, if_absent=True)
    assert backend.get("chunks/ef/ef02") == b"".join(bytes(p) for p in parts)
    assert backend._direct is False  # noqa: SLF001
