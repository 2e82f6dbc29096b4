"""A full backup reads its disk at several places at once, so cheap and expensive regions overlap;
whatever the order, the point restores byte for byte."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.conftest import qemu_img_compare
from vmkeep.engine.backup import READ_STRETCHES, DiskJob, backup_point
from vmkeep.engine.image import restore_image
from vmkeep.lab.images import Segment
from vmkeep.pipeline import interleaved
from vmkeep.repository.backends.fs import FilesystemBackend
from vmkeep.repository.config import Credentials
from vmkeep.repository.repo import Repository
from vmkeep.transport.extents import Extent
from vmkeep.transport.nbd_client import NbdExport, open_export
from vmkeep.transport.qemu_nbd import probe_image, serve_image

MiB = 1 << 20


def test_interleaved_takes_each_stretch_in_turn() -> None:
    assert interleaved(list(range(10)), 3) == [0, 4, 8, 1, 5, 9, 2, 6, 3, 7]
    assert interleaved(list(range(8)), 4) == [0, 2, 4, 6, 1, 3, 5, 7]
    assert interleaved([1, 2], 4) == [1, 2]
    assert interleaved(list(range(7)), 1) == list(range(7))
    for n in range(0, 40):
        assert sorted(interleaved(list(range(n)), 4)) == list(range(n))  # nothing lost, nothing twice


class RecordingSource:
    """A real NBD export that notes the offsets the engine asks for, in order."""

    def __init__(self, export: NbdExport) -> None:
        self.export = export
        self.size = export.size
        self.offsets: list[int] = []

    def pread(self, length: int, offset: int) -> bytes:
        self.offsets.append(offset)
        return self.export.pread(length, offset)

    def data_extents(self) -> list[Extent]:
        return self.export.data_extents()


def test_full_backup_reads_stretches_in_turn(tmp_path: Path, make_disk: Callable[..., Path]) -> None:
    assert READ_STRETCHES > 1
    size = 32 * MiB
    image = make_disk(size, [Segment(0, 16 * MiB, "random"), Segment(16 * MiB, 16 * MiB, "text")])
    repo = Repository.init(FilesystemBackend(tmp_path / "repo"), chunk_size=MiB, compression=1, encrypt=True,
                           credentials=Credentials(passphrase=b"pw"))
    with serve_image(probe_image(image)) as uri, open_export(uri) as export:
        source = RecordingSource(export)
        backup_point(repo, "disk", [DiskJob("vda", source)], workers=1)
    stretch = size // READ_STRETCHES
    first_round = [i * stretch for i in range(READ_STRETCHES)]
    assert source.offsets[:READ_STRETCHES + 1] == [*first_round, MiB]
    assert sorted(source.offsets) == list(range(0, size, MiB))
    out = tmp_path / "restored.qcow2"
    restore_image(repo, "disk", None, out, fmt="qcow2")
    assert qemu_img_compare(image, out)
