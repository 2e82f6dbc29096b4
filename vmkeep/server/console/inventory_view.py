"""What the inventory page shows, read from the catalog one page at a time: the filtered VMs in
SQL (count and slice), and for that page's VMs only their protecting policies and newest points.

The protected / unprotected filter is every policy's selection rules as one SQL condition
(:func:`vmkeep.server.dispatch.selection_clause`); the policies named beside each VM are the same
rules evaluated in Python for the page's VMs only (:func:`vmkeep.server.dispatch.picks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby

from sqlalchemy import ColumnElement, Select, false, func, not_, or_, select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import Hypervisor, Policy, RestorePointRecord
from vmkeep.catalog.models import VirtualMachine as VM
from vmkeep.server.console.paging import Paging
from vmkeep.server.dispatch import glob_regex, picks, selection_clause

PROTECTION = ("", "protected", "unprotected")


@dataclass
class Filters:
    """The list's filters, kept in the page links so they survive paging."""

    q: str = ""  # a name: a part of it, or a glob with * ? [..]
    hypervisor: str = ""
    host: str = ""
    state: str = ""
    protection: str = ""  # "", protected, unprotected

    def as_dict(self) -> dict[str, str]:
        return {"q": self.q, "hypervisor": self.hypervisor, "host": self.host, "state": self.state,
                "protection": self.protection}

    @property
    def any(self) -> bool:
        return any(self.as_dict().values())


@dataclass
class VMRow:
    vm: VM
    policies: list[str]  # the policies whose rules pick it now
    newest: RestorePointRecord | None  # its newest restore point, by name, in any repository


@dataclass
class Folder:
    name: str | None
    vms: list[VMRow]


@dataclass
class Host:
    name: str
    folders: list[Folder]


@dataclass
class Branch:
    """A hypervisor's part of the page: its hosts, their folders and VMs."""

    hypervisor: str
    hosts: list[Host]


@dataclass
class HypervisorRow:
    h: Hypervisor
    vms: int  # present ones


@dataclass
class Inventory:
    hypervisors: list[HypervisorRow]
    tree: list[Branch]
    paging: Paging
    filters: Filters
    hosts: list[str] = field(default_factory=list)  # the filter's choices
    states: list[str] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)  # what "protect" offers


def name_clause(q: str) -> ColumnElement[bool]:
    """A glob when ``q`` holds ``*``, ``?`` or ``[``; otherwise a case-insensitive part of the name."""
    if any(c in q for c in "*?["):
        return VM.name.regexp_match(glob_regex(q))
    escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return VM.name.ilike(f"%{escaped}%", escape="\\")


def protected_clause(policies: list[Policy]) -> ColumnElement[bool]:
    """VMs some policy picks (on a query joined with Hypervisor); no policy: none."""
    return or_(false(), *[selection_clause(p.selection) for p in policies])


def filtered(filters: Filters, policies: list[Policy]) -> Select[VM, str]:
    query = select(VM, Hypervisor.name).join(Hypervisor).where(VM.present.is_(True))
    if filters.q:
        query = query.where(name_clause(filters.q))
    if filters.hypervisor:
        query = query.where(Hypervisor.name == filters.hypervisor)
    if filters.host:
        query = query.where(VM.host == filters.host)
    if filters.state:
        query = query.where(VM.state == filters.state)
    if filters.protection == "protected":
        query = query.where(protected_clause(policies))
    elif filters.protection == "unprotected":
        query = query.where(not_(protected_clause(policies)))
    return query


def newest_points(session: Session, names: list[str]) -> dict[str, RestorePointRecord]:
    """The newest point of each name, in one query (DISTINCT ON over the name-and-time index)."""
    if not names:
        return {}
    query = (select(RestorePointRecord).where(RestorePointRecord.name.in_(names))
             .order_by(RestorePointRecord.name, RestorePointRecord.created.desc())
             .distinct(RestorePointRecord.name))
    return {p.name: p for p in session.scalars(query)}


def protecting(policies: list[Policy], vm: VM, hypervisor: str) -> list[str]:
    return [p.name for p in policies if picks(p.selection, vm, hypervisor)]


def tree(rows: list[tuple[VM, str]], policies: list[Policy], newest: dict[str, RestorePointRecord]) -> list[Branch]:
    """The page's VMs (already in hypervisor, host, folder, name order) grouped into a tree."""
    branches = []
    for hypervisor, in_hypervisor in groupby(rows, key=lambda r: r[1]):
        hosts = []
        for host, on_host in groupby(in_hypervisor, key=lambda r: r[0].host):
            folders = [Folder(folder, [VMRow(vm, protecting(policies, vm, hypervisor), newest.get(vm.name))
                                       for vm, _ in in_folder])
                       for folder, in_folder in groupby(on_host, key=lambda r: r[0].folder)]
            hosts.append(Host(host, folders))
        branches.append(Branch(hypervisor, hosts))
    return branches


def inventory(session: Session, filters: Filters, paging: Paging) -> Inventory:
    policies = list(session.scalars(select(Policy).order_by(Policy.name)))
    query = filtered(filters, policies)
    paging.filters = filters.as_dict()
    paging.total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = list(session.execute(query.order_by(Hypervisor.name, VM.host, func.coalesce(VM.folder, ""), VM.name, VM.id)
                                .offset(paging.offset).limit(paging.per_page)).tuples())
    counts = dict(session.execute(select(VM.hypervisor_id, func.count()).where(VM.present.is_(True))
                                  .group_by(VM.hypervisor_id)).tuples().all())
    hypervisors = [HypervisorRow(h, counts.get(h.id, 0))
                   for h in session.scalars(select(Hypervisor).order_by(Hypervisor.name))]
    present = select(VM).where(VM.present.is_(True))
    return Inventory(
        hypervisors=hypervisors,
        tree=tree(rows, policies, newest_points(session, sorted({vm.name for vm, _ in rows}))),
        paging=paging, filters=filters,
        hosts=list(session.scalars(present.with_only_columns(VM.host).distinct().order_by(VM.host))),
        states=list(session.scalars(present.with_only_columns(VM.state).distinct().order_by(VM.state))),
        policies=[p.name for p in policies])
