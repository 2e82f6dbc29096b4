"""Which repository a restore reads its point from: its own, else a copy of the point in another
repository (migration 0019's ``proxy_restore_sources``), the first that opens and holds the point.

A repository deleted, unreachable, replaced, missing the point's manifest or holding a damaged
one, or an index of its disks missing or damaged (MAC checked) fails here, before anything is
written to the hypervisor; the next one is tried. Only that point is read (its manifest by its id,
not a listing of the VM's points): another point's damage does not pass a repository over. A later step of an instant
recovery prefers the repository its start used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vmkeep.errors import PointNotFound, VmkeepError
from vmkeep.jobs.registered import open_registered
from vmkeep.proxy.work import RepositoryOrder, RestoreOrder
from vmkeep.repository.points import Manifest
from vmkeep.repository.repo import Repository

log = logging.getLogger(__name__)


class NoSource(VmkeepError):
    """No repository holding the point could be read."""


@dataclass
class Source:
    repo: Repository
    record: RepositoryOrder
    passed_over: list[str]  # the repositories tried first, each with why it could not be used


def open_source(order: RestoreOrder, vm: str, point_id: str, prefer: str | None = None,
                disk: str | None = None) -> Source:
    """The first healthy repository of ``order.sources`` (the restore's own first; ``prefer``
    before all) that holds ``vm@point_id`` (its disk ``disk`` only, for a restore of one disk:
    another disk's damage does not stop it)."""
    candidates = sorted(order.sources or (order.repository,), key=lambda c: c.name != prefer)
    passed_over: list[str] = []
    for candidate in candidates:
        repo = None
        try:
            repo = open_registered(candidate)
            readable_point(repo, vm, point_id, disk)
        except Exception as exc:  # noqa: BLE001 - any failure of this one: the next copy is tried
            if repo is not None:
                repo.close()
            log.warning("restore of %s@%s: repository %s (%s) cannot be used: %s", vm, point_id, candidate.name,
                        candidate.location, exc)
            passed_over.append(f"{candidate.name}: {exc}")
            continue
        log.info("restore of %s@%s reads repository %s", vm, point_id, candidate.name)
        return Source(repo, candidate, passed_over)
    raise NoSource(f"no repository holding {vm}@{point_id} can be read ({'; '.join(passed_over)}): make one of "
                   "them reachable again (or register a copy of it and rebuild its catalog), or restore another "
                   "point")


def readable_point(repo: Repository, vm: str, point_id: str, disk: str | None = None) -> Manifest:
    """The point's manifest, once it and the indexes of its disks (or of ``disk`` alone) have been
    read and checked (PointNotFound when the repository does not hold it)."""
    manifest = repo.load_point(vm, point_id)
    if manifest is None:
        raise PointNotFound(f"it holds no point {vm}@{point_id}")
    for name in manifest.disks if disk is None else [disk]:
        repo.load_index(manifest, name)
    return manifest
