"""Changed block tracking for the simulator, test-only: a SOAP shim in front of vcsim.

vcsim keeps no change tracking: its snapshots carry no ``changeId`` and it does not implement
``QueryChangedDiskAreas``. This shim passes every request through to vcsim and adds exactly
those two, in the format a real vSphere answers with:

- at ``CreateSnapshot_Task`` it keeps a copy of each disk of the VM (the state the snapshot
  freezes) and gives the snapshot's disks the changeId ``<epoch uuid>/<n>``;
- a ``RetrievePropertiesEx`` answer holding a snapshot's devices gets those changeIds in its
  disk backings;
- ``QueryChangedDiskAreas`` is answered from the copies: the 64 KiB blocks that differ between
  the snapshot's state and the state the given changeId names (``*``: blocks holding data),
  in stretches of 16 MiB per call as servers do; an unknown changeId gets a ``FileFault``;
- ``ReconfigVM_Task`` turning tracking off starts a new epoch (a reset, as on vSphere).
"""

from __future__ import annotations

import re
import secrets
import shutil
import ssl
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from pyVmomi import vim

from vmkeep.hypervisors.vmware.devices import split_datastore_path
from vmkeep.hypervisors.vmware.session import Session, Target
from vmkeep.lab.vcsim import Vcsim

BLOCK = 64 << 10
STRETCH = 16 << 20
ENVELOPE = ('<?xml version="1.0" encoding="UTF-8"?>\n<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap'
            '/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/'
            'XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>{}</soapenv:Body>'
            '</soapenv:Envelope>')


def _tag(body: str, name: str) -> str | None:
    m = re.search(rf"<{name}[^>]*>([^<]*)</{name}>", body)
    return m.group(1) if m else None


@dataclass
class Tracking:
    """One VM disk's change tracking: its epoch and the frozen copy of each snapshot's state."""

    epoch: str = field(default_factory=lambda: " ".join(f"{b:02x}" for b in uuid.uuid4().bytes))
    states: dict[int, Path] = field(default_factory=dict)  # change number → copy of the disk then

    def change_id(self, n: int) -> str:
        return f"{self.epoch}/{n}"


class CbtShim:
    """Serves on a loopback port (plain HTTP) and forwards to the simulator."""

    def __init__(self, sim: Vcsim) -> None:
        self.sim = sim
        self.session = Session(Target.parse(sim.address), sim.password, ca_file=sim.ca_file)
        self.upstream = httpx.Client(base_url=sim.url.removesuffix("/sdk"),
                                     verify=ssl.create_default_context(cafile=sim.ca_file), timeout=120)
        self.copies = Path(tempfile.mkdtemp(prefix="vmkeep-cbt-shim-"))
        self.lock = threading.Lock()
        self.tracking: dict[tuple[str, int], Tracking] = {}  # (vm moref, device key)
        self.snapshots: dict[str, tuple[str, int]] = {}  # snapshot moref → (vm moref, change number)
        self.counter = 0
        self.queries = 0  # QueryChangedDiskAreas calls answered
        shim = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                shim.forward(self, b"")

            def do_HEAD(self) -> None:  # noqa: N802
                shim.forward(self, b"")

            def do_PUT(self) -> None:  # noqa: N802
                shim.forward(self, self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                shim.soap(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        """The vSphere address to give vmkeep (plain HTTP to this shim)."""
        return f"vsphere://{Target.parse(self.sim.address).user}@127.0.0.1:{self.server.server_port}?http=1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.upstream.close()
        self.session.close()
        shutil.rmtree(self.copies, ignore_errors=True)

    # -- plumbing ---------------------------------------------------------------------------------
    def forward(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "content-length",
                                                                                 "accept-encoding")}
        reply = self.upstream.request(handler.command, handler.path, content=body or None, headers=headers)
        self.answer(handler, reply.status_code, reply.content, reply.headers)

    @staticmethod
    def answer(handler: BaseHTTPRequestHandler, status: int, content: bytes, headers: Any = None) -> None:
        handler.send_response(status)
        for k, v in (headers or {"Content-Type": "text/xml; charset=utf-8"}).items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                handler.send_header(k, v)
        length = headers.get("content-length") if handler.command == "HEAD" and headers else None
        handler.send_header("Content-Length", str(length if length is not None else len(content)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(content)

    def soap(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        text = body.decode()
        method = re.search(r"<soapenv:Body>\s*<(\w+)", text) or re.search(r"Body>\s*<(\w+)", text)
        name = method.group(1) if method else ""
        if name == "QueryChangedDiskAreas":
            self.answer(handler, *self.changed_areas(text))
            return
        if name == "ReconfigVM_Task" and "<changeTrackingEnabled>false</changeTrackingEnabled>" in text:
            vm = _tag(text, "_this") or ""
            with self.lock:
                for key in [k for k in self.tracking if k[0] == vm]:
                    self.tracking[key] = Tracking()  # tracking reset: a new epoch
        if name == "CreateSnapshot_Task":
            self.create_snapshot(handler, body, _tag(text, "_this") or "")
            return
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "content-length")}
        reply = self.upstream.post(handler.path, content=body, headers=headers)
        content = reply.content
        if name in ("RetrievePropertiesEx", "RetrieveProperties") and b"VirtualMachineSnapshot" in content:
            content = self.inject_change_ids(content.decode()).encode()
        self.answer(handler, reply.status_code, content, reply.headers)

    # -- change tracking --------------------------------------------------------------------------
    def _disks(self, vm_moref: str) -> list[tuple[int, Path]]:
        vm = vim.VirtualMachine(vm_moref, self.session.si._stub)
        devices = self.session.one(vm, ["config.hardware.device"]).get("config.hardware.device") or []
        store = self.sim.datastores[0]
        out = []
        for d in devices:
            if isinstance(d, vim.vm.device.VirtualDisk):
                rel = split_datastore_path(d.backing.fileName)[1].removesuffix(".vmdk") + "-flat.vmdk"
                out.append((d.key, Path(store) / rel))
        return out

    def create_snapshot(self, handler: BaseHTTPRequestHandler, body: bytes, vm: str) -> None:
        with self.lock:
            self.counter += 1
            n = self.counter
            for key, flat in self._disks(vm):
                track = self.tracking.setdefault((vm, key), Tracking())
                copy = self.copies / f"{vm}-{key}-{n}.img"
                shutil.copyfile(flat, copy)
                track.states[n] = copy
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "content-length")}
        reply = self.upstream.post(handler.path, content=body, headers=headers)
        task = re.search(r'<returnval type="Task">([^<]+)</returnval>', reply.text)
        if task:  # known before the client can ask for the snapshot's disks
            snapshot = self.session.wait(vim.Task(task.group(1), self.session.si._stub), "snapshot (shim)")
            with self.lock:
                self.snapshots[snapshot._moId] = (vm, n)
        self.answer(handler, reply.status_code, reply.content, reply.headers)

    def inject_change_ids(self, text: str) -> str:
        def objects(m: re.Match[str]) -> str:
            snapshot, rest = m.group(1), m.group(2)
            vm, n = self.snapshots.get(snapshot, ("", 0))

            def disk(d: re.Match[str]) -> str:
                key = int(d.group(2))
                track = self.tracking.get((vm, key))
                if track is None or n not in track.states:
                    return d.group(0)
                return d.group(0).replace("</backing>", f"<changeId>{track.change_id(n)}</changeId></backing>", 1)

            rest = re.sub(r'(<VirtualDevice [^>]*type="VirtualDisk"><key>(\d+)</key>.*?</backing>)', disk, rest,
                          flags=re.S)
            return f'<objects><obj type="VirtualMachineSnapshot">{snapshot}</obj>{rest}</objects>'

        return re.sub(r'<objects><obj type="VirtualMachineSnapshot">([^<]+)</obj>(.*?)</objects>', objects, text,
                      flags=re.S)

    def changed_areas(self, text: str) -> tuple[int, bytes]:
        vm = _tag(text, "_this") or ""
        snapshot = _tag(text, "snapshot") or ""
        key, start, change_id = int(_tag(text, "deviceKey") or 0), int(_tag(text, "startOffset") or 0), \
            _tag(text, "changeId") or ""
        with self.lock:
            self.queries += 1
            track = self.tracking.get((vm, key))
            _vm, n = self.snapshots.get(snapshot, ("", 0))
            if track is None or n not in track.states:
                return self.fault(f"no tracked state for disk {key} of {vm} in {snapshot}")
            now = track.states[n]
            before: Path | None = None
            if change_id != "*":
                epoch, _, number = change_id.rpartition("/")
                if epoch != track.epoch or not number.isdigit() or int(number) not in track.states:
                    return self.fault(f"changeId {change_id} is not valid for disk {key}")
                before = track.states[int(number)]
        size = now.stat().st_size
        length = min(STRETCH, size - start)
        areas = []
        with now.open("rb") as a, (before.open("rb") if before else open("/dev/null", "rb")) as b:
            a.seek(start)
            b.seek(start)
            for offset in range(start, start + length, BLOCK):
                new, old = a.read(BLOCK), (b.read(BLOCK) if before else None)
                differs = new.strip(b"\0") != b"" if before is None else new != old
                if differs:
                    if areas and areas[-1][0] + areas[-1][1] == offset:
                        areas[-1] = (areas[-1][0], areas[-1][1] + len(new))
                    else:
                        areas.append((offset, len(new)))
        xml = "".join(f"<changedArea><start>{o}</start><length>{n}</length></changedArea>" for o, n in areas)
        body = (f'<QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval><startOffset>{start}</startOffset>'
                f"<length>{length}</length>{xml}</returnval></QueryChangedDiskAreasResponse>")
        return 200, ENVELOPE.format(body).encode()

    @staticmethod
    def fault(message: str) -> tuple[int, bytes]:
        body = (f"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>{message}</faultstring><detail>"
                f'<FileFaultFault xmlns="urn:vim25" xsi:type="FileFault"><file>{secrets.token_hex(4)}</file>'
                "</FileFaultFault></detail></soapenv:Fault>")
        return 500, ENVELOPE.format(body).encode()
