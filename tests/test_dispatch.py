"""Which proxy gets a VM, and when a run's limits hold a VM back (pure decisions, no database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from vmkeep.catalog.models import Policy, Proxy, VirtualMachine
from vmkeep.server.dispatch import choose_proxy
from vmkeep.server.limits import RunSlots


def proxy(name: str, transports: list[str], reaches: list[str], storage: list[str] | None = None,
          concurrency: int = 2, heartbeat: datetime | None = None) -> Proxy:
    return Proxy(name=name, transports=transports, reaches=reaches, storage=storage or [], concurrency=concurrency,
                 last_heartbeat=heartbeat or datetime.now(UTC))


def vm(name: str, host: str, store: str) -> VirtualMachine:
    return VirtualMachine(name=name, host=host, disks=[{"name": "vda", "datastore": store, "backup": True}])


def policy(transports: str = "san:hotadd:nbd", **limits: int) -> Policy:
    return Policy(name="p", transports=transports, selection={}, retention={}, **limits)


def test_transports_decide_who_can_take_a_vm() -> None:
    web = vm("web", "host-a", "host-a:pool/fast")
    on_host = proxy("on-host", ["hotadd"], ["host-a"])
    elsewhere_hotadd = proxy("elsewhere", ["hotadd"], ["host-b"])
    lan = proxy("lan", ["nbd"], ["*"])
    sees_storage = proxy("san", ["san"], ["host-b"], storage=["host-a:pool/fast"])
    assert choose_proxy([elsewhere_hotadd], {}, web, policy()) is None  # hotadd needs the VM's host
    assert choose_proxy([elsewhere_hotadd, on_host], {}, web, policy()) is on_host
    assert choose_proxy([lan], {}, web, policy()) is lan  # "*" reaches any host over nbd
    assert choose_proxy([lan], {}, web, policy("hotadd")) is None  # but the policy allows no nbd
    assert choose_proxy([sees_storage], {}, web, policy()) is sees_storage  # san: it sees the datastore
    assert choose_proxy([sees_storage], {}, vm("db", "host-a", "host-a:pool/slow"), policy()) is None


def test_least_work_per_slot_and_only_live_proxies() -> None:
    web = vm("web", "host-a", "s")
    big = proxy("big", ["nbd"], ["*"], concurrency=4)
    small = proxy("small", ["nbd"], ["*"], concurrency=1)
    assert choose_proxy([big, small], {"big": 2, "small": 1}, web, policy()) is big  # 2/4 < 1/1
    assert choose_proxy([big, small], {"big": 0, "small": 0}, web, policy(), exclude={"big"}) is small
    dead = proxy("dead", ["nbd"], ["*"], heartbeat=datetime.now(UTC) - timedelta(minutes=5))
    assert choose_proxy([dead], {}, web, policy()) is None


def test_run_limits_per_host_datastore_and_proxy() -> None:
    a1, a2 = vm("a1", "host-a", "shared"), vm("a2", "host-b", "shared")
    b1 = vm("b1", "host-a", "own")
    slots = RunSlots(policy(max_per_datastore=1, max_per_host=2, max_per_proxy=1))
    assert slots.waits_for(a1) is None
    slots.take(a1, "p1")
    assert "datastore shared" in (slots.waits_for(a2) or "")  # same datastore, other host
    assert slots.waits_for(b1) is None and slots.full_proxies() == {"p1"}
    slots.take(b1, "p2")
    assert "host host-a" in (slots.waits_for(vm("c1", "host-a", "third")) or "")
