"""The XAPI simulator's disk images: qcow2 files with internal snapshots and real CBT bitmaps.

A live VDI is a qcow2 v3 file (64 KiB clusters) in its SR's directory. A snapshot VDI is an
internal snapshot of that file named after the snapshot VDI's uuid, so taking one costs only
metadata however large the disk. Changed block tracking is done by QEMU itself with
persistent dirty bitmaps: each snapshot of a CBT-enabled disk freezes the enabled bitmap (it
then holds exactly the writes since the previous snapshot) and starts a new one. Each file
keeps the ordered list of (frozen bitmap, snapshot it ends at); the blocks changed between two
snapshots are the union of the frozen bitmaps between them, read back through qemu-nbd's
``qemu:dirty-bitmap:`` contexts, never from Python's own record of the writes.

Every other process that opens a file (the NBD servers, export streams) opens it read-only
without QEMU's file locks; every change is made under :attr:`Images.lock`, one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vmkeep.errors import ImageError
from vmkeep.transport.nbd_client import NbdExport
from vmkeep.transport.qemu_nbd import create_image, serve_on_socket

log = logging.getLogger(__name__)

BLOCK = 64 << 10  # CBT granularity and qcow2 cluster size, as XAPI's 64 KiB changed-block bitmaps
LIVE, SNAPSHOT, METADATA = "live", "snapshot", "metadata"
STATE_FILE = "images.json"


class NoCbtMetadata(Exception):
    """No change log links the two snapshots (CBT was off, or disabled between them)."""

    def __init__(self, vdi: str, reason: str = "") -> None:
        super().__init__(f"no CBT metadata links VDI {vdi} to the later snapshot{': ' + reason if reason else ''}")
        self.vdi = vdi


@dataclass
class _Link:
    bitmap: str  # frozen bitmap: the writes made before `snapshot` and after the previous link's
    snapshot: str


@dataclass
class _File:
    path: str
    live: str | None  # the live VDI's uuid; None once it was destroyed while snapshots remain
    members: list[str] = field(default_factory=list)  # snapshot and metadata VDIs in this file
    links: list[_Link] = field(default_factory=list)
    active: str | None = None  # the enabled bitmap while CBT is on
    counter: int = 0  # for bitmap names


@dataclass
class _Vdi:
    uuid: str
    file: str  # key of its _File (the path)
    kind: str  # LIVE, SNAPSHOT or METADATA
    size: int
    allocated: int | None = None  # cached; None = to be measured


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.debug("%s: exit %d %s", " ".join(cmd), proc.returncode, proc.stderr.strip())
    if proc.returncode != 0:
        raise ImageError(f"{cmd[0]} failed ({' '.join(cmd[1:])}): {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def image_opts(path: str | Path) -> str:
    """qemu's --image-opts for reading a file another process may change: no file locks (the
    simulator serializes changes itself)."""
    return f"driver=qcow2,file.driver=file,file.filename={str(path).replace(',', ',,')},file.locking=off"


class Images:
    """Every image operation of the simulator; thread-safe (one lock, see :attr:`lock`)."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.lock = threading.RLock()
        self._cond = threading.Condition(self.lock)
        self._vdis: dict[str, _Vdi] = {}
        self._files: dict[str, _File] = {}
        self._busy: set[str] = set()  # files a long write (an import) is using
        self._listeners: list[Callable[[str], None]] = []
        state.mkdir(parents=True, exist_ok=True)
        self._load()

    # ---- bookkeeping -------------------------------------------------------------------------

    def _load(self) -> None:
        saved = self.state / STATE_FILE
        if not saved.exists():
            return
        data = json.loads(saved.read_text())
        for f in data["files"]:
            links = [_Link(**link) for link in f.pop("links")]
            self._files[f["path"]] = _File(**f, links=links)
        for v in data["vdis"]:
            self._vdis[v["uuid"]] = _Vdi(**v)
        log.debug("loaded %d VDIs in %d image files from %s", len(self._vdis), len(self._files), saved)

    def _save(self) -> None:
        data = {"files": [dataclasses.asdict(f) for f in self._files.values()],
                "vdis": [dataclasses.asdict(v) for v in self._vdis.values()]}
        tmp = self.state / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.state / STATE_FILE)

    def add_listener(self, before_change: Callable[[str], None]) -> None:
        """``before_change(vdi_uuid)`` runs (under the lock) before a VDI's data is deleted or its
        file changes shape, so readers holding it open (NBD servers) can stop first."""
        self._listeners.append(before_change)

    def _notify(self, uuid: str) -> None:
        for listener in self._listeners:
            listener(uuid)

    def _vdi(self, uuid: str, *kinds: str) -> _Vdi:
        vdi = self._vdis.get(uuid)
        if vdi is None:
            raise ImageError(f"the simulator has no image for VDI {uuid}")
        if kinds and vdi.kind not in kinds:
            raise ImageError(f"VDI {uuid} is a {vdi.kind} VDI; this needs a {' or '.join(kinds)} one")
        return vdi

    def _file(self, uuid: str, *kinds: str) -> tuple[_Vdi, _File]:
        vdi = self._vdi(uuid, *kinds)
        f = self._files[vdi.file]
        while f.path in self._busy:  # an import is writing it: wait for it to end
            self._cond.wait()
        return vdi, f

    @contextmanager
    def writing(self, uuid: str) -> Iterator[Path]:
        """Hold a live VDI's file for a long write (an import) without holding the lock: other
        changes to that file wait, other files go on."""
        with self.lock:
            vdi, f = self._file(uuid, LIVE)
            self._busy.add(f.path)
        try:
            yield Path(f.path)
        finally:
            with self.lock:
                self._busy.discard(f.path)
                vdi.allocated = None
                self._cond.notify_all()

    def __contains__(self, uuid: object) -> bool:
        return uuid in self._vdis

    # ---- reading -----------------------------------------------------------------------------

    def size(self, uuid: str) -> int:
        return self._vdi(uuid).size

    def allocated(self, uuid: str) -> int:
        """Bytes holding data in this VDI's own view (the live disk, or the snapshot as taken);
        0 for a metadata-only VDI."""
        vdi = self._vdi(uuid)
        if vdi.allocated is None:
            with self.lock:
                if vdi.allocated is None:
                    vdi.allocated = self._measure(Path(vdi.file))
        return vdi.allocated

    def _measure(self, path: Path) -> int:
        out = _run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", str(path)])
        return sum(e["length"] for e in json.loads(out) if e.get("data"))

    def path(self, uuid: str) -> Path:
        return Path(self._vdi(uuid).file)

    def kind(self, uuid: str) -> str:
        """LIVE, SNAPSHOT or METADATA (a snapshot whose data was destroyed)."""
        return self._vdi(uuid).kind

    def snapshot_name(self, uuid: str) -> str | None:
        """The internal qcow2 snapshot holding a snapshot VDI's data (for ``qemu-img compare -l``)."""
        return uuid if self._vdi(uuid).kind == SNAPSHOT else None

    def source(self, uuid: str) -> tuple[Path, str | None]:
        """Where a VDI's data is read from: the file and the internal snapshot (None: the live
        disk). A metadata VDI has no data to read."""
        vdi = self._vdi(uuid, LIVE, SNAPSHOT)
        return Path(vdi.file), (uuid if vdi.kind == SNAPSHOT else None)

    def bitmaps(self, uuid: str) -> list[str]:
        """The persistent bitmaps in the VDI's file, as qemu-img reports them (for tests)."""
        out = _run(["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", self._vdi(uuid).file])
        return [b["name"] for b in json.loads(out).get("format-specific", {}).get("data", {}).get("bitmaps", [])]

    # ---- changing ----------------------------------------------------------------------------

    def create(self, sr_dir: Path, uuid: str, size: int) -> None:
        """A new empty sparse qcow2 v3 image (64 KiB clusters; qemu-img's defaults)."""
        size = -(-int(size) // 512) * 512
        path = sr_dir / f"{uuid}.qcow2"
        with self.lock:
            if uuid in self._vdis:
                raise ImageError(f"VDI {uuid} already has an image")
            sr_dir.mkdir(parents=True, exist_ok=True)
            create_image(path, "qcow2", size)
            self._files[str(path)] = _File(str(path), uuid)
            self._vdis[uuid] = _Vdi(uuid, str(path), LIVE, size, 0)
            self._save()
        log.info("created VDI image %s (%d bytes)", path, size)

    def write(self, uuid: str, offset: int, data: bytes) -> None:
        """A guest write into a live VDI, through qemu-io so the enabled bitmap records it."""
        with self.lock:
            vdi, f = self._file(uuid, LIVE)
            if offset < 0 or offset + len(data) > vdi.size:
                raise ImageError(f"a write of {len(data)} bytes at {offset} is outside VDI {uuid} "
                                 f"({vdi.size} bytes)")
            if not data:
                return
            with tempfile.NamedTemporaryFile(prefix="vmkeep-xapi-write-") as src:
                src.write(data)
                src.flush()
                _run(["qemu-io", "-f", "qcow2", "-c", f"write -q -s {src.name} {offset} {len(data)}", f.path])
            vdi.allocated = None
        log.debug("wrote %d bytes at %d into VDI %s", len(data), offset, uuid)

    def resize(self, uuid: str, size: int) -> None:
        """Grow a live VDI (qcow2 resizes its bitmaps with it; shrinking is refused)."""
        size = -(-int(size) // 512) * 512
        with self.lock:
            vdi, f = self._file(uuid, LIVE)
            if size < vdi.size:
                raise ImageError(f"VDI {uuid} is {vdi.size} bytes; the simulator only grows disks")
            if size == vdi.size:
                return
            self._notify(uuid)
            _run(["qemu-img", "resize", "-q", "-f", "qcow2", f.path, str(size)])
            vdi.size = size
            self._save()
        log.info("resized VDI %s to %d bytes", uuid, size)

    def _bitmap(self, f: _File, *args: str) -> None:
        _run(["qemu-img", "bitmap", "-f", "qcow2", *args[:-1], f.path, args[-1]])

    def _new_bitmap(self, f: _File) -> str:
        f.counter += 1
        name = f"cbt-{f.counter}"
        self._bitmap(f, "--add", "-g", str(BLOCK), name)
        return name

    def enable_cbt(self, uuid: str) -> None:
        with self.lock:
            _, f = self._file(uuid, LIVE)
            if f.active is None:
                f.active = self._new_bitmap(f)
                self._save()
                log.info("CBT on for VDI %s: bitmap %s", uuid, f.active)

    def disable_cbt(self, uuid: str) -> None:
        """Remove every bitmap of the file: no snapshot taken so far links to later ones."""
        with self.lock:
            _, f = self._file(uuid, LIVE)
            for name in [link.bitmap for link in f.links] + ([f.active] if f.active else []):
                self._bitmap(f, "--remove", name)
            f.links, f.active = [], None
            self._save()
        log.info("CBT off for VDI %s: its change log is gone", uuid)

    def snapshot(self, uuid: str, snap_uuid: str) -> None:
        """An internal snapshot named ``snap_uuid``; with CBT on, the enabled bitmap is frozen
        first and a new one started, so the frozen one holds exactly the writes up to here."""
        with self.lock:
            vdi, f = self._file(uuid, LIVE)
            if snap_uuid in self._vdis:
                raise ImageError(f"VDI {snap_uuid} already exists")
            allocated = self.allocated(uuid)
            if f.active is not None:
                frozen = f.active
                self._bitmap(f, "--disable", frozen)
                f.active = self._new_bitmap(f)
                f.links.append(_Link(frozen, snap_uuid))
            _run(["qemu-img", "snapshot", "-q", "-c", snap_uuid, f.path])
            f.members.append(snap_uuid)
            self._vdis[snap_uuid] = _Vdi(snap_uuid, f.path, SNAPSHOT, vdi.size, allocated)
            self._save()
        log.info("snapshot %s of VDI %s taken (CBT %s)", snap_uuid, uuid, "on" if f.active else "off")

    def changed_blocks(self, from_uuid: str, to_uuid: str) -> bytes:
        """One bit per 64 KiB block of ``to``'s size, most significant bit first, set where the
        disk was written between the two snapshots; from the file's own bitmaps."""
        with self.lock:
            to, f = self._file(to_uuid, SNAPSHOT, METADATA)
            frm = self._vdi(from_uuid, SNAPSHOT, METADATA)
            order = [link.snapshot for link in f.links]
            if frm.file != to.file or from_uuid not in order:
                raise NoCbtMetadata(from_uuid, "CBT was off when it was taken, or disabled since")
            if to_uuid not in order or order.index(to_uuid) < order.index(from_uuid):
                raise NoCbtMetadata(from_uuid, f"no change log from it up to {to_uuid}")
            names = [link.bitmap for link in f.links[order.index(from_uuid) + 1:order.index(to_uuid) + 1]]
            blocks = -(-to.size // BLOCK)
            out = bytearray(-(-blocks // 8))
            if names:
                self._read_bitmaps(Path(f.path), names, out, blocks)
        log.info("changed blocks %s -> %s: %d of %d blocks (bitmaps %s)", from_uuid, to_uuid,
                 sum(bin(b).count("1") for b in out), blocks, ", ".join(names) or "none")
        return bytes(out)

    def _read_bitmaps(self, path: Path, names: list[str], out: bytearray, blocks: int) -> None:
        """OR the named bitmaps into ``out``, as qemu-nbd reports them in block status."""
        def command(sock: Path) -> list[str]:
            return ["qemu-nbd", f"--socket={sock}", "--read-only", "--persistent", "--shared=0",
                    *[f"--bitmap={n}" for n in names], "--image-opts", image_opts(path)]

        def ready(uri: str) -> None:
            NbdExport(uri, f"qemu:dirty-bitmap:{names[0]}").close()

        with serve_on_socket(command, f"qemu-nbd reading bitmaps of {path}", ready) as uri:
            for name in names:
                export = NbdExport(uri, f"qemu:dirty-bitmap:{name}")
                try:
                    for extent in export.dirty_extents():
                        first = extent.offset // BLOCK
                        last = min((extent.offset + extent.length - 1) // BLOCK, blocks - 1)
                        for b in range(first, last + 1):
                            out[b >> 3] |= 0x80 >> (b & 7)
                finally:
                    export.close()

    def data_destroy(self, snap_uuid: str) -> None:
        """Delete a snapshot's data (its internal snapshot; clusters only it used are freed) and
        keep its place in the change log."""
        with self.lock:
            vdi, f = self._file(snap_uuid, SNAPSHOT)
            self._notify(snap_uuid)
            _run(["qemu-img", "snapshot", "-q", "-d", snap_uuid, f.path])
            vdi.kind, vdi.allocated = METADATA, 0
            self._save()
        log.info("data of snapshot VDI %s destroyed; its CBT metadata kept", snap_uuid)

    def destroy(self, uuid: str) -> None:
        """Forget a VDI. A file stays while another VDI (live, snapshot or metadata) still uses
        it; a snapshot's bitmap is merged into the next one so the log across it stays whole."""
        with self.lock:
            vdi, f = self._file(uuid)
            self._notify(uuid)
            if vdi.kind == LIVE:
                f.live = None
            else:
                f.members.remove(uuid)
            last = f.live is None and not f.members
            if vdi.kind == SNAPSHOT and not last:
                _run(["qemu-img", "snapshot", "-q", "-d", uuid, f.path])
            order = [link.snapshot for link in f.links]
            if uuid in order:
                k = order.index(uuid)
                gone = f.links.pop(k).bitmap
                if not last:
                    into = f.links[k].bitmap if k < len(f.links) else f.active
                    if into is not None:
                        self._bitmap(f, "--merge", gone, into)
                    self._bitmap(f, "--remove", gone)
            del self._vdis[uuid]
            if last:
                del self._files[f.path]
                Path(f.path).unlink(missing_ok=True)
                log.info("VDI %s destroyed; its image file %s removed", uuid, f.path)
            else:
                log.info("VDI %s destroyed; %s stays for %d other VDIs", uuid, f.path,
                         len(f.members) + (f.live is not None))
            self._save()

    def copy(self, uuid: str, sr_dir: Path, new_uuid: str) -> None:
        """A full copy of a live or snapshot VDI as a new live VDI on ``sr_dir``, without CBT."""
        with self.lock:
            vdi, f = self._file(uuid, LIVE, SNAPSHOT)
            if new_uuid in self._vdis:
                raise ImageError(f"VDI {new_uuid} already exists")
            sr_dir.mkdir(parents=True, exist_ok=True)
            dest = sr_dir / f"{new_uuid}.qcow2"
            snap = ["-l", f"snapshot.name={uuid}"] if vdi.kind == SNAPSHOT else []
            _run(["qemu-img", "convert", "-U", "-f", "qcow2", *snap, "-O", "qcow2",
                  "-o", f"cluster_size={BLOCK}", f.path, str(dest)])
            # a snapshot taken before a resize reads at the size it had
            _run(["qemu-img", "resize", "-q", "-f", "qcow2", "--shrink", str(dest), str(vdi.size)])
            self._files[str(dest)] = _File(str(dest), new_uuid)
            self._vdis[new_uuid] = _Vdi(new_uuid, str(dest), LIVE, vdi.size)
            self._save()
        log.info("copied VDI %s to %s as VDI %s", uuid, dest, new_uuid)

