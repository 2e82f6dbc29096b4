"""Repository statistics: logical vs stored bytes, dedup and compression ratios, per name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vmkeep.repository.repo import Repository


@dataclass
class NameStats:
    points: int = 0
    logical_bytes: int = 0  # disk sizes summed over points
    referenced_bytes: int = 0  # non-zero data summed over points (what a naive copy would keep)
    unique_stored: int = 0  # stored bytes of chunks only this name uses
    shared_stored: int = 0  # stored bytes of chunks this name shares with others


@dataclass
class RepoInfo:
    location: str
    repo_id: str
    encrypted: bool
    chunk_size: int
    compression: int
    immutable_days: int
    points: int = 0
    logical_bytes: int = 0
    referenced_bytes: int = 0
    unique_plain_bytes: int = 0
    stored_bytes: int = 0
    chunks: int = 0
    names: dict[str, NameStats] = field(default_factory=dict)

    @property
    def dedup_ratio(self) -> float:
        return self.referenced_bytes / self.unique_plain_bytes if self.unique_plain_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_plain_bytes / self.stored_bytes if self.stored_bytes else 1.0

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "names"}
        d["dedup_ratio"] = round(self.dedup_ratio, 3)
        d["compression_ratio"] = round(self.compression_ratio, 3)
        d["names"] = {n: dict(s.__dict__) for n, s in self.names.items()}
        return d


def repository_info(repo: Repository) -> RepoInfo:
    cfg = repo.config
    info = RepoInfo(repo.backend.url, cfg.repo_id, cfg.encrypted, cfg.chunk_size, cfg.compression,
                    cfg.immutable_days)
    stored = {o.key.rsplit("/", 1)[1]: o.size for o in repo.backend.list("chunks/")}
    plain: dict[str, int] = {}
    owners: dict[str, set[str]] = {}
    for m in repo.list_points():
        ns = info.names.setdefault(m.name, NameStats())
        ns.points += 1
        ns.logical_bytes += m.logical_size
        info.points += 1
        info.logical_bytes += m.logical_size
        for disk in m.disks:
            index = repo.load_index(m, disk)
            for slot, cid in index.nonzero():
                h = cid.hex()
                n = index.slot_length(slot)
                plain[h] = n
                owners.setdefault(h, set()).add(m.name)
                ns.referenced_bytes += n
                info.referenced_bytes += n
    info.unique_plain_bytes = sum(plain.values())
    info.stored_bytes = sum(stored.get(h, 0) for h in plain)
    info.chunks = len(plain)
    for h, owner_names in owners.items():
        size = stored.get(h, 0)
        for owner in owner_names:
            if len(owner_names) == 1:
                info.names[owner].unique_stored += size
            else:
                info.names[owner].shared_stored += size
    return info
