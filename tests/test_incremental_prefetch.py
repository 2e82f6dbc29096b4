"""An incremental patches each partly written chunk from its parent point: the engine asks the
repository to start reading those parent chunks before the job's reads begin."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vmkeep.engine.backup import PREFETCH_CHUNKS, DiskJob, _patch_bases, backup_point
from vmkeep.lab.images import Segment
from vmkeep.repository.backends.fs import FilesystemBackend
from vmkeep.repository.config import Credentials
from vmkeep.repository.index import ZERO_ID, DiskIndex
from vmkeep.repository.repo import Repository, chunk_key
from vmkeep.transport.extents import Extent
from vmkeep.transport.nbd_client import open_export
from vmkeep.transport.qemu_nbd import probe_image, serve_image

MiB = 1 << 20


class RecordingBackend(FilesystemBackend):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.prefetched: list[str] = []

    def prefetch(self, keys: list[str]) -> None:
        self.prefetched += keys
        super().prefetch(keys)


def test_parent_chunks_of_partly_written_slots_are_prefetched(tmp_path: Path,
                                                              make_disk: Callable[..., Path]) -> None:
    image = make_disk(8 * MiB, [Segment(0, 4 * MiB, "random")])  # slots 0-3 data, 4-7 zero
    backend = RecordingBackend(tmp_path / "repo")
    repo = Repository.init(backend, chunk_size=MiB, compression=1, encrypt=True,
                           credentials=Credentials(passphrase=b"pw"))
    with serve_image(probe_image(image)) as uri:
        with open_export(uri) as export:
            full = backup_point(repo, "disk", [DiskJob("vda", export)])
        parent = repo.load_index(full, "vda")
        changed = [Extent(0, 4096),            # slot 0: partly written, its chunk holds data
                   Extent(2 * MiB, MiB),       # slot 2: written whole, the parent's chunk is not needed
                   Extent(5 * MiB, 4096)]      # slot 5: partly written, but zero in the parent
        backend.prefetched.clear()
        with open_export(uri) as export:
            incr = backup_point(repo, "disk", [DiskJob("vda", export, changed)], parent=full)
    assert backend.prefetched == [chunk_key(parent.get(0))]
    # (slot 5 holds no data in the image, so nothing of it is read)
    assert incr.disks["vda"].stats["bytes_read"] == 4096 + MiB


def test_prefetch_is_bounded() -> None:
    index = DiskIndex.empty(200 * MiB, MiB)
    for slot in range(200):
        index.put(slot, bytes([slot % 255 + 1]) * 32)
    index.put(3, ZERO_ID)
    bases = _patch_bases([Extent(s * MiB, 512) for s in range(200)], index, MiB)
    assert len(bases) == PREFETCH_CHUNKS and index.get(3) not in bases
    assert bases[:3] == [index.get(0), index.get(1), index.get(2)]
