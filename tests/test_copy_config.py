"""A VM point copied between repositories keeps its sealed VM configuration readable in the target
(re-sealed with the target's key when the keys differ, kept as is when shared), and the source of
a copy is never written."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from vmkeep.engine.copy import RAW, REENCRYPT, copy_points
from vmkeep.engine.vm import config_context, vm_config
from vmkeep.errors import BackendError
from vmkeep.repository.backends import FilesystemBackend
from vmkeep.repository.backends.readonly import ReadOnlyBackend
from vmkeep.repository.config import Credentials
from vmkeep.repository.index import DiskIndex
from vmkeep.repository.points import DiskEntry, Manifest, index_key, manifest_key, new_point_id
from vmkeep.repository.repo import Repository

MiB = 1 << 20
CONFIG = {"kind": "libvirt", "domain_xml": "<domain><name>web</name><secret>s3cr3t</secret></domain>"}


def _vm_point(repo: Repository) -> Manifest:
    """A VM point written through the repository's own API: two chunks, one zero slot, the
    configuration sealed the way a backup seals it."""
    index = DiskIndex.empty(3 * MiB, MiB)
    for slot, byte in ((0, 0x61), (2, 0x62)):
        data = bytes([byte]) * MiB
        cid = repo.keys.chunk_id(data)
        repo.store_chunk(cid, data)
        index.put(slot, cid)
    point_id = new_point_id()
    key = index_key("web", point_id, "vda")
    entry = DiskEntry(3 * MiB, key, repo.write_index(key, index))
    manifest = Manifest("web", point_id, datetime.now(UTC).isoformat(), None, {"vda": entry}, MiB,
                        meta={"kind": "vm", "config_sealed": repo.seal_record(CONFIG, config_context("web"))})
    repo.commit_point(manifest)
    return manifest


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("shared", [True, False])
def test_the_vm_configuration_survives_the_copy(tmp_path: Path, shared: bool) -> None:
    source = Repository.init(FilesystemBackend(tmp_path / "src"), chunk_size=MiB, compression=1, encrypt=True,
                             credentials=Credentials(b"source pass"))
    point = _vm_point(source)
    target_backend = FilesystemBackend(tmp_path / "dst")
    if shared:
        target = Repository.init_like(target_backend, source, credentials=Credentials(b"target pass"))
    else:
        target = Repository.init(target_backend, chunk_size=MiB, compression=1, encrypt=True,
                                 credentials=Credentials(b"target pass"))
    before = _files(tmp_path / "src")
    reader = Repository.open(ReadOnlyBackend(FilesystemBackend(tmp_path / "src")), Credentials(b"source pass"))
    report = copy_points(reader, target, [point])

    assert report.mode == (RAW if shared else REENCRYPT)
    assert report.points_copied == [f"web@{point.point_id}"] and report.chunks_sent == 2
    assert _files(tmp_path / "src") == before  # nothing of the source was written, touched or added
    reopened = Repository.open(FilesystemBackend(tmp_path / "dst"), Credentials(b"target pass"))
    copied = reopened.find_point("web")
    assert vm_config(reopened, copied) == CONFIG
    index = reopened.load_index(copied, "vda")
    assert [reopened.load_chunk(cid, MiB)[:1] for _slot, cid in index.nonzero()] == [b"a", b"b"]
    same_manifest = (tmp_path / "src" / manifest_key("web", point.point_id)).read_bytes() == \
        (tmp_path / "dst" / manifest_key("web", point.point_id)).read_bytes()
    assert same_manifest == shared  # as stored with shared keys; sealed and signed anew otherwise
    chunk_names = {p.name for p in (tmp_path / "src" / "chunks").rglob("*") if p.is_file()}
    assert ({p.name for p in (tmp_path / "dst" / "chunks").rglob("*") if p.is_file()} == chunk_names) == shared


def test_a_read_only_source_refuses_every_write(tmp_path: Path) -> None:
    Repository.init(FilesystemBackend(tmp_path / "src"), chunk_size=MiB, compression=1, encrypt=False,
                    credentials=Credentials())
    backend = ReadOnlyBackend(FilesystemBackend(tmp_path / "src"))
    before = _files(tmp_path / "src")
    for attempt in (lambda: backend.put("points/x/y.json", b"{}"), lambda: backend.touch("config.json"),
                    lambda: backend.delete("config.json"), lambda: backend.delete_if_older("config.json", 2e9),
                    backend.now):
        with pytest.raises(BackendError, match="read-only"):
            attempt()
    assert _files(tmp_path / "src") == before
    assert os.path.exists(tmp_path / "src" / "config.json")
