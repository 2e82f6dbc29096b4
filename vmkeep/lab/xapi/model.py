"""The simulator's object store: XAPI records by class and ref, and XAPI's generic methods.

Records hold values already in XAPI's wire form (ints as strings, times as xmlrpc DateTime, refs
as ``OpaqueRef:…``) so what a client reads is exactly what real XAPI marshals; the API modules
convert with ``int()`` where they compute. One re-entrant lock guards everything: the API holds
it for a whole call, so every call is atomic, as XAPI's per-object locking looks from outside.
"""

from __future__ import annotations

import copy
import datetime
import re
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterator
from typing import Any
from xmlrpc.client import DateTime

NULL = "OpaqueRef:NULL"
CLASSES = ("pool", "host", "SR", "network", "VM", "VBD", "VDI", "VIF")
NAMED = {"pool", "host", "SR", "network", "VM", "VDI"}  # classes with name_label
EPOCH = DateTime("19700101T00:00:00Z")


class XapiError(Exception):
    """An XAPI failure: ``ErrorDescription`` = [code, *args], every arg a string."""

    def __init__(self, code: str, *args: object) -> None:
        super().__init__(code, *args)
        self.code = code
        self.details = [code, *(str(a) for a in args)]


def now() -> DateTime:
    return DateTime(datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H:%M:%SZ"))


def new_ref() -> str:
    return f"OpaqueRef:{uuidlib.uuid4()}"


_COMMON: dict[str, Any] = {"uuid": "", "other_config": {}}
_NAMED: dict[str, Any] = {"name_label": "", "name_description": ""}
_QOS: dict[str, Any] = {"qos_algorithm_type": "", "qos_algorithm_params": {}}

DEFAULTS: dict[str, dict[str, Any]] = {
    "pool": {**_NAMED, "master": NULL, "default_SR": NULL, "suspend_image_SR": NULL, "crash_dump_SR": NULL,
             "tags": []},
    "host": {**_NAMED, "hostname": "", "address": "", "enabled": True, "resident_VMs": [],
             "API_version_major": "2", "API_version_minor": "21", "API_version_vendor": "XenServer",
             "software_version": {"product_brand": "XenServer", "product_version": "8.4.0", "xapi": "24.0"},
             "control_domain": NULL, "PIFs": [], "PBDs": [], "memory_overhead": "0", "tags": []},
    "SR": {**_NAMED, "type": "ext", "content_type": "user", "shared": False, "physical_size": "0",
           "physical_utilisation": "0", "virtual_allocation": "0", "VDIs": [], "PBDs": [], "sm_config": {},
           "allowed_operations": [], "tags": []},
    "network": {**_NAMED, "bridge": "", "MTU": "1500", "purpose": [], "VIFs": [], "PIFs": [], "tags": [],
                "managed": True, "allowed_operations": []},
    "VM": {**_NAMED, "power_state": "Halted", "is_a_template": False, "is_default_template": False,
           "is_control_domain": False, "is_a_snapshot": False, "snapshot_of": NULL, "snapshots": [],
           "snapshot_time": EPOCH, "parent": NULL, "children": [], "VBDs": [], "VIFs": [], "resident_on": NULL,
           "affinity": NULL, "memory_static_max": "268435456", "memory_static_min": "134217728",
           "memory_dynamic_max": "268435456", "memory_dynamic_min": "268435456", "memory_target": "0",
           "VCPUs_max": "1", "VCPUs_at_startup": "1", "VCPUs_params": {}, "domain_type": "hvm",
           "HVM_boot_policy": "BIOS order", "HVM_boot_params": {"order": "cd"}, "HVM_shadow_multiplier": 1.0,
           "PV_bootloader": "", "PV_kernel": "", "PV_ramdisk": "", "PV_args": "", "PV_bootloader_args": "",
           "PV_legacy_args": "", "platform": {}, "actions_after_shutdown": "destroy",
           "actions_after_reboot": "restart", "actions_after_crash": "restart", "tags": [],
           "allowed_operations": [], "guest_metrics": NULL, "metrics": NULL, "user_version": "1", "domid": "-1",
           "blocked_operations": {}, "xenstore_data": {}, "ha_restart_priority": "", "recommendations": "",
           "has_vendor_device": False, "hardware_platform_version": "0", "transportable_snapshot_id": ""},
    "VBD": {"VM": NULL, "VDI": NULL, "device": "", "userdevice": "0", "bootable": False, "mode": "RW",
            "type": "Disk", "empty": False, "currently_attached": False, "unpluggable": True, **_QOS,
            "allowed_operations": [], "status_code": "0", "status_detail": "", "storage_lock": False},
    "VDI": {**_NAMED, "SR": NULL, "VBDs": [], "virtual_size": "0", "physical_utilisation": "0", "type": "user",
            "sharable": False, "read_only": False, "is_a_snapshot": False, "snapshot_of": NULL,
            "snapshots": [], "snapshot_time": EPOCH, "cbt_enabled": False, "managed": True, "missing": False,
            "allowed_operations": [], "sm_config": {}, "xenstore_data": {}, "on_boot": "persist",
            "allow_caching": False, "metadata_of_pool": NULL, "location": "", "storage_lock": False,
            "tags": [], "is_tools_iso": False, "parent": NULL, "crash_dumps": []},
    "VIF": {"VM": NULL, "network": NULL, "device": "0", "MAC": "", "MTU": "1500", "currently_attached": False,
            **_QOS, "locking_mode": "network_default", "MAC_autogenerated": False, "allowed_operations": [],
            "ipv4_allowed": [], "ipv6_allowed": []},
}


class Store:
    """Every object of the simulated pool. Call everything with ``lock`` held."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.objects: dict[str, dict[str, dict[str, Any]]] = {c: {} for c in CLASSES}

    def create(self, cls: str, **fields: Any) -> str:
        """A new object: defaults, then ``fields``; a new uuid unless given."""
        rec = copy.deepcopy(_COMMON) | copy.deepcopy(DEFAULTS[cls])
        rec.update(fields)
        rec["uuid"] = rec["uuid"] or str(uuidlib.uuid4())
        ref = new_ref()
        self.objects[cls][ref] = rec
        return ref

    def get(self, cls: str, ref: str) -> dict[str, Any]:
        """The live record (mutable); HANDLE_INVALID for an unknown ref, as XAPI's DB layer."""
        try:
            return self.objects[cls][ref]
        except (KeyError, TypeError):
            raise XapiError("HANDLE_INVALID", cls, ref) from None

    def exists(self, cls: str, ref: str) -> bool:
        return ref in self.objects[cls]

    def delete(self, cls: str, ref: str) -> dict[str, Any]:
        self.get(cls, ref)
        return self.objects[cls].pop(ref)

    def by_uuid(self, cls: str, uuid: str) -> str:
        for ref, rec in self.objects[cls].items():
            if rec["uuid"] == uuid:
                return ref
        raise XapiError("UUID_INVALID", cls, uuid)

    def where(self, cls: str, pred: Callable[[dict[str, Any]], bool]) -> Iterator[tuple[str, dict[str, Any]]]:
        return ((r, rec) for r, rec in list(self.objects[cls].items()) if pred(rec))

    def link(self, cls: str, ref: str, field: str, other: str) -> None:
        """Add ``other`` to a set-valued field (VM.VBDs, SR.VDIs…): XAPI keeps both ends."""
        if self.exists(cls, ref) and other not in self.objects[cls][ref][field]:
            self.objects[cls][ref][field].append(other)

    def unlink(self, cls: str, ref: str, field: str, other: str) -> None:
        if self.exists(cls, ref) and other in self.objects[cls][ref][field]:
            self.objects[cls][ref][field].remove(other)


def _copy(rec: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(rec)


_TERM = re.compile(r'\s*field\s*"(?P<name>[^"]*)"\s*=\s*"(?P<value>(?:[^"\\]|\\.)*)"\s*')


def parse_where(expr: str) -> list[tuple[str, str]]:
    """The subset of XAPI's query language a client needs: ``field "NAME"="VALUE"`` terms joined by
    ``and`` (``name__label`` names name_label, as in XAPI's database); else XAPI's parse failure."""
    terms, rest = [], expr
    while True:
        match = _TERM.match(rest)
        if match is None:
            raise XapiError("INTERNAL_ERROR", f"cannot parse the expression {expr!r} (the lab's simulator knows "
                            'field "NAME"="VALUE" joined by and)')
        terms.append((match["name"].replace("__", "_"), re.sub(r"\\(.)", r"\1", match["value"])))
        rest = rest[match.end():]
        if not rest:
            return terms
        if not rest.startswith("and ") and not rest.startswith("and\t"):
            raise XapiError("INTERNAL_ERROR", f"cannot parse the expression {expr!r} at {rest!r}")
        rest = rest[3:]


def _db_text(value: Any) -> str:
    """A field as XAPI's database holds it (what a query compares): bools true/false, times as text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, DateTime):
        return str(value.value)
    return str(value)


def matches(terms: list[tuple[str, str]], rec: dict[str, Any]) -> bool:
    return all(name in rec and _db_text(rec[name]) == value for name, value in terms)


def generic(store: Store, cls: str, name: str) -> Callable[..., Any] | None:
    """XAPI's generated per-class methods (``get_all``, ``get_<field>``, ``add_to_other_config``…)
    as a callable taking the arguments after the session ref; None when ``name`` is not one."""
    if cls not in CLASSES:
        return None
    objs = store.objects[cls]
    if name == "get_all":
        return lambda: list(objs)
    if name == "get_all_records":
        return lambda: {r: _copy(rec) for r, rec in objs.items()}
    if name == "get_all_records_where":
        return lambda expr: {r: _copy(rec) for r, rec in objs.items() if matches(parse_where(str(expr)), rec)}
    if name == "get_record":
        return lambda ref: _copy(store.get(cls, ref))
    if name == "get_by_uuid":
        return lambda uuid: store.by_uuid(cls, uuid)
    if name == "get_by_name_label" and cls in NAMED:
        return lambda label: [r for r, rec in objs.items() if rec["name_label"] == label]
    fields = set(DEFAULTS[cls]) | set(_COMMON)
    if name.startswith("get_") and name[4:] in fields:
        return lambda ref: _copy(store.get(cls, ref)[name[4:]])
    if name in ("set_name_label", "set_name_description") and cls in NAMED:
        def setter(ref: str, value: str) -> str:
            store.get(cls, ref)[name[4:]] = str(value)
            return ""
        return setter
    if name in ("set_other_config", "set_tags"):
        def set_all(ref: str, value: Any) -> str:
            store.get(cls, ref)[name[4:]] = copy.deepcopy(value)
            return ""
        return set_all
    if name == "add_to_other_config":
        def add(ref: str, key: str, value: str) -> str:
            oc = store.get(cls, ref)["other_config"]
            if key in oc:
                raise XapiError("MAP_DUPLICATE_KEY", cls, "other_config", ref, key)
            oc[key] = str(value)
            return ""
        return add
    if name == "remove_from_other_config":
        def remove(ref: str, key: str) -> str:
            store.get(cls, ref)["other_config"].pop(key, None)
            return ""
        return remove
    if name in ("add_tags", "remove_tags") and "tags" in fields:
        def tags(ref: str, value: str) -> str:
            tl = store.get(cls, ref)["tags"]
            if name == "add_tags" and value not in tl:
                tl.append(value)
            if name == "remove_tags" and value in tl:
                tl.remove(value)
            return ""
        return tags
    return None
