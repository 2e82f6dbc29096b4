"""XML-RPC dispatch of the simulator: method table, argument counts, sessions, fault injection.

The order of checks is XAPI's (unknown method, then argument count, then session), so a client
that gets one wrong sees the same error as against a real pool. Handlers live in the api_*
modules and register with ``@api("Class.method")``; XAPI's generic per-class methods come from
``model.generic``. Every call runs under the store's lock, so each is atomic.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmkeep.lab.xapi.model import NULL, Store, XapiError, generic

if TYPE_CHECKING:
    from vmkeep.lab.xapi.images import Images
    from vmkeep.lab.xapi.nbd import NbdServers

log = logging.getLogger(__name__)

MASTER_ADDRESS = "127.0.0.1"
MEMBER_ADDRESS = "127.0.0.2"
Handler = Callable[..., Any]
METHODS: dict[str, tuple[Handler, bool]] = {}  # "VM.snapshot" -> (handler(sim, *args), takes a session ref)


def api(name: str, *, session: bool = True) -> Callable[[Handler], Handler]:
    """Register a handler ``fn(sim, *args)``; its arity (after ``sim``) is the method's."""
    def register(fn: Handler) -> Handler:
        METHODS[name] = (fn, session)
        return fn
    return register


def _arity(fn: Handler) -> int:
    return len(inspect.signature(fn).parameters)


@dataclass
class Fault:
    code: str
    times: int


@dataclass
class Sim:
    """The simulated pool: objects, images, NBD servers and the lab's knobs."""

    state: Path
    password: str
    images: Images
    nbd: NbdServers
    store: Store = field(default_factory=Store)
    sessions: dict[str, str] = field(default_factory=dict)  # session ref -> user
    faults: dict[str, Fault] = field(default_factory=dict)
    nbd_vbds: dict[str, str] = field(default_factory=dict)  # VDI uuid -> dom0 VBD while NBD-attached
    refs: dict[str, str] = field(default_factory=dict)  # well-known objects: "xen1", "dom0-xen1", "Local storage"…
    session: str = NULL  # the session of the call running now (get_nbd_info names it in the exportname)

    def __post_init__(self) -> None:
        from vmkeep.lab.xapi import api_lab, api_pool, api_vdi, api_vm  # noqa: F401  (they register handlers)

        api_pool.build_world(self)

    # --- the wire ---------------------------------------------------------------------------
    def call(self, method: str, params: tuple[Any, ...], *, member: bool = False) -> dict[str, Any]:
        """One XML-RPC call -> XAPI's reply struct (never raises)."""
        try:
            value = self._call(method, params, member)
        except XapiError as exc:
            log.info("%s -> %s", method, exc.details)
            return {"Status": "Failure", "ErrorDescription": exc.details}
        except Exception as exc:  # a bug or a failed qemu-img: XAPI answers INTERNAL_ERROR
            log.exception("%s failed", method)
            return {"Status": "Failure", "ErrorDescription": ["INTERNAL_ERROR", f"{type(exc).__name__}: {exc}"]}
        log.debug("%s -> ok", method)
        return {"Status": "Success", "Value": "" if value is None else value}

    def _call(self, method: str, params: tuple[Any, ...], member: bool) -> Any:
        entry = METHODS.get(method)
        with self.store.lock:
            if entry is not None:
                fn, takes_session = entry
                expected = _arity(fn) - 1 + (1 if takes_session else 0)
            else:
                cls, _, name = method.partition(".")
                gen = generic(self.store, cls, name)
                if gen is None:
                    raise XapiError("MESSAGE_METHOD_UNKNOWN", method)
                fn, takes_session = (lambda _sim, *a: gen(*a)), True
                expected = _arity(gen) + 1
            if len(params) != expected:
                raise XapiError("MESSAGE_PARAMETER_COUNT_MISMATCH", method, expected, len(params))
            if method == "session.login_with_password" and member:
                raise XapiError("HOST_IS_SLAVE", MASTER_ADDRESS)
            args = params
            if takes_session:
                self.check_session(params[0])
                self.session, args = params[0], params[1:]
            self.sync_nbd_vbds()
            self.inject(method, args)
            log.info("%s%s", method, tuple("***" if a == self.password else a[:60] if isinstance(a, str) else a
                                           for a in args))
            if entry is None:
                return fn(self, *args)  # generic methods change at most one field, before failing
            before = copy.deepcopy(self.store.objects)
            try:
                return fn(self, *args)
            except BaseException:
                self.store.objects = before  # a call that fails changes no object, as in XAPI's DB
                raise

    def check_session(self, ref: Any) -> None:
        if not isinstance(ref, str) or ref not in self.sessions:
            raise XapiError("SESSION_INVALID", ref)

    def inject(self, method: str, args: tuple[Any, ...]) -> None:
        """Fail this call if ``lab.fault`` armed a fault for ``method`` (a transient error)."""
        fault = self.faults.get(method)
        if fault is None or fault.times <= 0:
            return
        fault.times -= 1
        if fault.times <= 0:
            del self.faults[method]
        cls, _, op = method.partition(".")
        obj = str(args[0]) if args else NULL
        if fault.code == "OTHER_OPERATION_IN_PROGRESS":
            raise XapiError(fault.code, cls, obj, op)
        if fault.code == "VDI_IN_USE":
            raise XapiError(fault.code, obj, op)
        raise XapiError(fault.code, obj)

    # --- helpers for the handlers ----------------------------------------------------------
    def attached_uuids(self) -> set[str]:
        return set(self.nbd.attached())

    def in_use(self, vdi: str, *, running_only: bool = False) -> bool:
        """A VDI is attached: an open NBD connection, or a VBD currently_attached (``running_only``:
        only VBDs of Running VMs count, XAPI's rule for destroy and import)."""
        rec = self.store.get("VDI", vdi)
        if rec["uuid"] in self.attached_uuids():
            return True
        for vbd in rec["VBDs"]:
            b = self.store.get("VBD", vbd)
            if not b["currently_attached"]:
                continue
            if not running_only or self.store.get("VM", b["VM"])["power_state"] == "Running":
                return True
        return False

    def sync_nbd_vbds(self) -> None:
        """XAPI plugs a dom0 VBD for every VDI served over NBD: mirror the forwarders' open
        connections as such VBDs (created on connect, gone on close)."""
        attached = self.attached_uuids()
        for uuid in list(self.nbd_vbds):
            if uuid not in attached:
                vbd = self.nbd_vbds.pop(uuid)
                if self.store.exists("VBD", vbd):
                    rec = self.store.delete("VBD", vbd)
                    self.store.unlink("VM", rec["VM"], "VBDs", vbd)
                    self.store.unlink("VDI", rec["VDI"], "VBDs", vbd)
        for uuid in attached - set(self.nbd_vbds):
            try:
                vdi = self.store.by_uuid("VDI", uuid)
            except XapiError:
                continue
            dom0 = self.refs["dom0-xen1"]
            used = {self.store.get("VBD", b)["userdevice"] for b in self.store.get("VM", dom0)["VBDs"]}
            n = next(i for i in range(1, 1000) if str(i) not in used)
            vbd = self.store.create("VBD", VM=dom0, VDI=vdi, userdevice=str(n), device=f"xvd{chr(97 + n % 26)}",
                                    mode="RO", type="Disk", currently_attached=True, unpluggable=True)
            self.store.link("VM", dom0, "VBDs", vbd)
            self.store.link("VDI", vdi, "VBDs", vbd)
            self.nbd_vbds[uuid] = vbd

    def sr_dir(self, sr: str) -> Path:
        path = self.state / "sr" / self.store.get("SR", sr)["uuid"]
        path.mkdir(parents=True, exist_ok=True)
        return path

    def lab_secret(self, secret: str) -> None:
        if secret != self.password:
            raise XapiError("SESSION_AUTHENTICATION_FAILED", "lab", "Authentication failure")
