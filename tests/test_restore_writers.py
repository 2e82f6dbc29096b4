"""The restore side of the connector protocol, seen from the writer: only data chunks are sent,
the zero runs are named instead, a sequential writer gets everything in offset order, and a
failing writer fails the restore with the cause."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from vmkeep.engine.backup import DiskJob, backup_point
from vmkeep.engine.restore import restore_disk, zero_runs
from vmkeep.errors import ImageError
from vmkeep.lab.images import Segment
from vmkeep.repository.backends.fs import FilesystemBackend
from vmkeep.repository.config import Credentials
from vmkeep.repository.repo import Repository
from vmkeep.transport.nbd_client import open_export
from vmkeep.transport.qemu_nbd import probe_image, serve_image

MiB = 1 << 20
SIZE = 13 * MiB + 4096  # the last chunk is short


class RecordingWriter:
    """A writer that keeps what it is given, as a connector's upload stream would send it."""

    def __init__(self, sequential: bool, fail_at: int | None = None) -> None:
        self.sequential = sequential
        self.fail_at = fail_at
        self.calls: list[tuple[str, int, int]] = []
        self.image = bytearray(SIZE)
        self.encoded_on: set[str] = set()
        self.lock = threading.Lock()

    def encode(self, data: bytes, offset: int) -> bytes:
        self.encoded_on.add(threading.current_thread().name)
        return data[::-1]  # some work only the writer knows how to undo

    def write(self, encoded: bytes, offset: int) -> None:
        if offset == self.fail_at:
            raise OSError(28, "No space left on device")
        with self.lock:
            self.calls.append(("write", offset, len(encoded)))
            self.image[offset:offset + len(encoded)] = encoded[::-1]

    def zero(self, offset: int, length: int) -> None:
        with self.lock:
            self.calls.append(("zero", offset, length))


@pytest.fixture
def point(tmp_path: Path, make_disk: Callable[..., Path]) -> tuple[Repository, Path]:
    image = make_disk(SIZE, [Segment(0, 2 * MiB, "random"), Segment(5 * MiB, 3 * MiB, "text"),
                             Segment(12 * MiB, MiB + 4096, "random")])
    repo = Repository.init(FilesystemBackend(tmp_path / "repo"), chunk_size=MiB, compression=1, encrypt=True,
                           credentials=Credentials(passphrase=b"pw"))
    with serve_image(probe_image(image)) as uri, open_export(uri) as export:
        backup_point(repo, "disk", [DiskJob("vda", export)], workers=2)
    return repo, image


def _source_bytes(image: Path) -> bytes:
    with serve_image(probe_image(image)) as uri, open_export(uri) as export:
        return export.pread(SIZE, 0)


@pytest.mark.parametrize("sequential", [False, True])
def test_only_data_travels_and_zeros_are_named(point: tuple[Repository, Path], sequential: bool) -> None:
    repo, image = point
    manifest = repo.find_point("disk", None)
    index = repo.load_index(manifest, "vda")
    writer = RecordingWriter(sequential)
    stats = restore_disk(repo, index, writer, workers=3)
    writes = [(o, n) for kind, o, n in writer.calls if kind == "write"]
    zeros = [(o, n) for kind, o, n in writer.calls if kind == "zero"]
    assert zeros == zero_runs(index) == [(2 * MiB, 3 * MiB), (8 * MiB, 4 * MiB)]
    assert sum(n for _o, n in writes) == stats.bytes_written == 6 * MiB + 4096  # no hole was sent
    covered = sorted(writes + zeros)
    assert [o for o, _n in covered] == [sum(n for _o, n in covered[:i]) for i in range(len(covered))]
    assert sum(n for _o, n in covered) == SIZE  # every byte once, written or named zero
    if sequential:
        offsets = [o for _kind, o, _n in writer.calls]
        assert offsets == sorted(offsets)  # a stream gets data and zeros in order
    assert all(name.startswith("vmkeep") for name in writer.encoded_on)  # encoded on the workers
    assert bytes(writer.image) == _source_bytes(image)


@pytest.mark.parametrize("sequential", [False, True])
def test_a_writer_that_fails_fails_the_restore_with_its_cause(point: tuple[Repository, Path],
                                                              sequential: bool) -> None:
    repo, _image = point
    index = repo.load_index(repo.find_point("disk", None), "vda")
    with pytest.raises(ImageError, match="No space left") as caught:
        restore_disk(repo, index, RecordingWriter(sequential, fail_at=6 * MiB), workers=2)
    assert isinstance(caught.value.__cause__, OSError)
