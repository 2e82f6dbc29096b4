"""A policy run's concurrency limits: how many of its backups may run at once on one host, one
datastore, one proxy. A VM over a limit waits; the dispatcher sends it on as a slot frees."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import Job, JobVM, Policy, VirtualMachine
from vmkeep.jobs.status import ACTIVE


def datastores(vm: VirtualMachine) -> set[str]:
    """The storage the VM's backed-up disks live on (discovery records it per disk)."""
    return {d["datastore"] for d in vm.disks if d.get("datastore") and d.get("backup", True)}


@dataclass
class RunSlots:
    """What one run has in flight, counted per host, datastore and proxy."""

    policy: Policy
    hosts: Counter[str] = field(default_factory=Counter)
    stores: Counter[str] = field(default_factory=Counter)
    proxies: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of_job(cls, session: Session, job: Job) -> RunSlots:
        slots = cls(job.running_policy)
        rows = session.execute(select(VirtualMachine, JobVM.proxy).join(JobVM, JobVM.vm_id == VirtualMachine.id)
                               .where(JobVM.job_id == job.id, JobVM.status.in_(ACTIVE))).tuples()
        for vm, proxy in rows:
            slots.take(vm, proxy)
        return slots

    def waits_for(self, vm: VirtualMachine) -> str | None:
        """Why ``vm`` cannot start now (a host or datastore limit is reached), or None."""
        p = self.policy
        if p.max_per_host and self.hosts[vm.host] >= p.max_per_host:
            return f"host {vm.host} has {p.max_per_host} backups of this run going"
        if p.max_per_datastore:
            for store in sorted(datastores(vm)):
                if self.stores[store] >= p.max_per_datastore:
                    return f"datastore {store} has {p.max_per_datastore} backups of this run going"
        return None

    def full_proxies(self) -> set[str]:
        """Proxies already running as many of this run's backups as the policy lets one proxy."""
        limit = self.policy.max_per_proxy
        return {name for name, n in self.proxies.items() if limit and n >= limit}

    def take(self, vm: VirtualMachine, proxy: str | None) -> None:
        self.hosts[vm.host] += 1
        for store in datastores(vm):
            self.stores[store] += 1
        if proxy:
            self.proxies[proxy] += 1
