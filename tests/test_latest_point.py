"""Finding a VM's newest point reads the manifests of the newest second only, and agrees with
reading them all."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from vmkeep.errors import ObjectCorrupt
from vmkeep.repository.backends import FilesystemBackend
from vmkeep.repository.backends.base import ObjectInfo
from vmkeep.repository.config import Credentials
from vmkeep.repository.points import Manifest, manifest_key, new_point_id
from vmkeep.repository.repo import Repository

MiB = 1 << 20
START = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)


class CountingBackend(FilesystemBackend):
    """Counts the manifests read; may list keys whose objects are already gone (a prune racing)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.manifest_reads: list[str] = []
        self.phantoms: list[str] = []

    def get(self, key: str) -> bytes:
        if key.startswith("points/"):
            self.manifest_reads.append(key)
        return super().get(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        yield from super().list(prefix)
        for key in self.phantoms:
            if key.startswith(prefix):
                yield ObjectInfo(key, 0, 0.0)


def _repo(tmp_path: Path) -> tuple[Repository, CountingBackend]:
    backend = CountingBackend(tmp_path / "repo")
    repo = Repository.init(backend, chunk_size=MiB, compression=1, encrypt=False, credentials=Credentials())
    return repo, backend


def _commit(repo: Repository, point_id: str, created: datetime, name: str = "vm") -> Manifest:
    m = Manifest(name, point_id, created.isoformat(timespec="microseconds"), None, {}, MiB)
    repo.commit_point(m)
    return m


def test_the_newest_point_is_found_reading_only_the_newest_second(tmp_path: Path) -> None:
    repo, backend = _repo(tmp_path)
    for day in range(40):  # forty nightly points, each committed some minutes after it began
        began = START + timedelta(days=day)
        _commit(repo, new_point_id(began), began + timedelta(minutes=7))
    _commit(repo, new_point_id(START), START, name="other-vm")  # another VM's point is not looked at
    # two points that began in the same second: the one committed later is the newest, whatever
    # their random tails say
    began = START + timedelta(days=41)
    early, late = sorted(new_point_id(began) for _ in range(2))
    newest = _commit(repo, early, began + timedelta(seconds=9))
    _commit(repo, late, began + timedelta(seconds=3))

    backend.manifest_reads.clear()
    assert repo.latest_point("vm") == newest
    assert sorted(backend.manifest_reads) == sorted(manifest_key("vm", i) for i in (early, late))
    assert repo.find_point("vm", "latest") == newest
    assert repo.list_points("vm")[-1] == newest  # the same answer as reading every manifest
    assert len(repo.point_ids("vm")) == 42
    assert repo.latest_point("no-such-vm") is None


def test_a_point_pruned_meanwhile_is_passed_over(tmp_path: Path) -> None:
    repo, backend = _repo(tmp_path)
    older = _commit(repo, new_point_id(START), START)
    backend.phantoms.append(manifest_key("vm", new_point_id(START + timedelta(hours=1))))
    assert repo.latest_point("vm") == older


def test_only_a_damaged_newest_manifest_stops_the_search(tmp_path: Path) -> None:
    repo, backend = _repo(tmp_path)
    first = _commit(repo, new_point_id(START), START)
    second = _commit(repo, new_point_id(START + timedelta(days=1)), START + timedelta(days=1))
    (tmp_path / "repo" / manifest_key("vm", first.point_id)).write_bytes(b"{damaged")
    assert repo.latest_point("vm") == second  # an old damaged manifest does not block the next backup
    (tmp_path / "repo" / manifest_key("vm", second.point_id)).write_bytes(b"{damaged")
    with pytest.raises(ObjectCorrupt, match="repo verify"):
        repo.latest_point("vm")


def test_ids_without_a_stamp_are_read_in_full(tmp_path: Path) -> None:
    repo, backend = _repo(tmp_path)
    _commit(repo, "zz-imported", START)
    newest = _commit(repo, new_point_id(START - timedelta(days=1)), START + timedelta(hours=1))
    backend.manifest_reads.clear()
    assert repo.latest_point("vm") == newest  # by commit time, not by id
    assert len(backend.manifest_reads) == 2
