"""The san transport for libvirt: the proxy reads the frozen base images itself, not through QEMU.

With the guest paused for a moment (after an fsfreeze when asked), an external disk-only
snapshot sends the VM's writes into a scratch overlay per disk and the new checkpoint is made on
top, so no write falls between the two. The base images are then the point in time: the proxy
serves them with its own qemu-nbd, exporting the previous checkpoint's bitmap, which QEMU wrote
into the base when it turned read-only. Afterwards each overlay is committed back and the VM
pivoted to its base; libvirt merges the overlay's bitmaps into the base, so the checkpoints still
cover every write.

An overlay the VM still uses holds the guest's newest writes: it is never deleted. A VM that
stopped meanwhile has its overlays committed offline; that path cannot carry the bitmaps, so the
caller drops the checkpoints and the next backup is full.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import libvirt

from vmkeep.errors import ImageError
from vmkeep.hypervisors.base import Consistency, DiskExport, HypervisorError
from vmkeep.hypervisors.early_release import EarlyRelease
from vmkeep.hypervisors.libvirt.domain_xml import DiskSpec, disk_elements, disk_specs, point_disk_at, source_path
from vmkeep.hypervisors.libvirt.job_xml import snapshot_xml as job_snapshot_xml
from vmkeep.hypervisors.libvirt.scratch import explain_full_scratch
from vmkeep.hypervisors.libvirt.scratch_watch import ScratchWatch
from vmkeep.polling import Backoff
from vmkeep.transport.qemu_nbd import UNLIMITED, ImageInfo, probe_image, serve_image

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "vmkeep-"
OVERLAY_SUFFIX = ".vmkeep-overlay.qcow2"
COMMIT_TIMEOUT_SECONDS = 600
Overlay = tuple[Path, str, str]  # the overlay, its base image and the base's format
SNAPSHOT_FLAGS = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                  | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
COMMIT_FLAGS = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW


def unreadable_disks(eligible: list[DiskSpec]) -> list[str]:
    """Disks whose image this proxy cannot open itself (no access to the VM's storage)."""
    return [s.target for s in eligible if not os.access(s.source, os.R_OK)]


def serve_images(stack: ExitStack, vm: str, eligible: list[DiskSpec], bitmap: str | None,
                 sizes: dict[str, int] | None = None) -> dict[str, DiskExport]:
    """qemu-nbd on each image file, exporting ``bitmap`` (a checkpoint's) where the disk has one.

    With the disks' ``sizes`` known (from libvirt), the images are not probed first: a handshake
    with qemu-nbd confirms the bitmap instead, and its absence raises an ImageError as the probe's
    would.
    """
    disks = {}
    for s in eligible:
        if not os.path.exists(s.source):
            raise HypervisorError(f"disk {s.target} of {vm} ({s.source}) cannot be read here")
        disk_bitmap = bitmap if s.bitmaps else None
        image = (probe_image(Path(s.source), s.format) if sizes is None
                 else ImageInfo(Path(s.source), s.format, sizes[s.target], probed=False))
        # as many connections as the engine opens (one per worker thread and disk, --workers up to 64)
        uri = stack.enter_context(serve_image(image, connections=UNLIMITED, bitmap=disk_bitmap))
        dirty = f"qemu:dirty-bitmap:{disk_bitmap}" if disk_bitmap else None
        disks[s.target] = DiskExport(s.target, uri, image.virtual_size, dirty)
    return disks


def snapshot_xml(domain_xml: str, overlays: dict[str, Path]) -> str:
    """Every disk named: an overlay for those backed up, none for the rest (CD-ROMs, shared disks)."""
    return job_snapshot_xml([name for name, _disk in disk_elements(ET.fromstring(domain_xml))], overlays)


def _current_source(dom: libvirt.virDomain, target: str, flags: int = 0) -> str:
    for name, disk in disk_elements(ET.fromstring(dom.XMLDesc(flags))):
        if name == target:
            return source_path(disk)
    return ""


def _commit_live(dom: libvirt.virDomain, target: str, overlay: Path) -> None:
    """Merge the overlay into its base while the VM runs, then switch the VM back to the base.

    A commit already under way (left by a run that died) is taken over rather than started again.
    """
    if not dom.blockJobInfo(target, 0):
        log.debug("%s: blockCommit of %s (%s) into its base", dom.name(), target, overlay)
        dom.blockCommit(target, None, None, 0, COMMIT_FLAGS)
    else:
        log.info("%s: taking over the commit of %s already under way", dom.name(), target)
    deadline, backoff = time.monotonic() + COMMIT_TIMEOUT_SECONDS, Backoff()
    while True:
        if not dom.blockJobInfo(target, 0):
            raise HypervisorError(f"the commit of {overlay} into the base of {target} ended without finishing")
        try:
            # Pivoting is refused until the job is ready (every block copied, mirroring new writes),
            # which comes a moment after the progress reaches the end.
            dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            log.debug("%s: %s pivoted back to its base", dom.name(), target)
            break
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_BLOCK_COPY_ACTIVE:
                raise
        if time.monotonic() > deadline:
            dom.blockJobAbort(target, 0)
            raise HypervisorError(f"the commit of {overlay} into the base of {target} did not finish in "
                                  f"{COMMIT_TIMEOUT_SECONDS} s")
        backoff.sleep()
    deadline, backoff = time.monotonic() + 30, Backoff()
    while _current_source(dom, target) == str(overlay):
        if time.monotonic() > deadline:
            raise HypervisorError(f"the VM did not pivot {target} back from {overlay}")
        backoff.sleep()


def _commit_offline(dom: libvirt.virDomain, target: str, overlay: Path, base: str, base_format: str) -> None:
    """The VM stopped while on the overlay: merge it with qemu-img and point the definition back."""
    log.info("%s is off: committing %s into %s with qemu-img (its checkpoints' bitmaps cannot follow)",
             dom.name(), overlay, base)
    proc = subprocess.run(["qemu-img", "commit", "-q", "-f", "qcow2", str(overlay)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HypervisorError(f"qemu-img cannot commit {overlay} into {base}: {proc.stderr.strip()}")
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_INACTIVE))
    for name, disk in disk_elements(root):
        if name == target:
            point_disk_at(disk, base, base_format, as_file=False)
    dom.connect().defineXML(ET.tostring(root, encoding="unicode"))


def release_overlays(dom: libvirt.virDomain, overlays: dict[str, Overlay]) -> bool:
    """Commit each overlay still in use back into its base and delete it.

    Returns whether the bitmaps could follow (False when the VM was off and qemu-img did the
    commit). Raises with the remedy if an overlay stays in use; that overlay is kept.
    """
    bitmaps_kept = True
    stuck = []
    for target, (overlay, base, base_format) in overlays.items():
        try:
            if dom.isActive():
                if _current_source(dom, target) == str(overlay):
                    _commit_live(dom, target, overlay)
            elif _current_source(dom, target, libvirt.VIR_DOMAIN_XML_INACTIVE) == str(overlay):
                _commit_offline(dom, target, overlay, base, base_format)
                bitmaps_kept = False
        except (libvirt.libvirtError, HypervisorError) as exc:
            why = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else str(exc)
            log.warning("%s: cannot commit %s back (%s); the overlay is kept", dom.name(), overlay, why)
            stuck.append(f"{target} runs on {overlay} ({why})")
            continue
        overlay.unlink(missing_ok=True)
        log.debug("%s: overlay %s committed and removed", dom.name(), overlay)
    if stuck:
        raise HypervisorError(
            f"VM {dom.name()} still writes to vmkeep's snapshot overlays: {'; '.join(stuck)}. They hold the "
            f"guest's newest data and were kept; merge each with `virsh blockcommit {dom.name()} DISK --active "
            "--pivot` (or run the next backup, which retries)")
    return bitmaps_kept


def merge_stale_overlays(dom: libvirt.virDomain, domain_xml: str) -> bool:
    """Commit back the overlays a vmkeep run left when it died mid-backup; whether there were any.

    ``domain_xml``: the VM's live definition (secure), read by the caller."""
    stale = {}
    for s in disk_specs(domain_xml):
        if s.source.endswith(OVERLAY_SUFFIX):
            stale[s.target] = (Path(s.source), *_backing_file(s.source))
    if stale:
        log.info("%s runs on overlays a dead vmkeep run left (%s): committing them back", dom.name(),
                 ", ".join(str(o) for o, _, _ in stale.values()))
    if stale and not release_overlays(dom, stale):
        forget_bitmaps(dom, [base for _, base, _ in stale.values()])
    for overlay, _, _ in stale.values():
        shutil.rmtree(overlay.parent, ignore_errors=True)
    return bool(stale)


def _backing_file(image: str) -> tuple[str, str]:
    """The path and format of an overlay's base."""
    proc = subprocess.run(["qemu-img", "info", "-U", "--output=json", image], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HypervisorError(f"cannot read the overlay {image}: {proc.stderr.strip()}")
    info = json.loads(proc.stdout)
    return str(info.get("full-backing-filename", "")), str(info.get("backing-filename-format", "raw"))


def forget_bitmaps(dom: libvirt.virDomain, bases: list[str]) -> None:
    """Drop vmkeep's checkpoints and their bitmaps once the bitmaps no longer cover every write,
    so the next backup is full instead of a wrong incremental."""
    log.info("%s: dropping vmkeep's checkpoints and bitmaps (they miss writes now): the next backup is full",
             dom.name())
    for cp in dom.listAllCheckpoints():
        if cp.getName().startswith(CHECKPOINT_PREFIX):
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    for base in bases:
        for name in probe_image(Path(base)).bitmaps:
            if name.startswith(CHECKPOINT_PREFIX):
                proc = subprocess.run(["qemu-img", "bitmap", "--remove", base, name], capture_output=True, text=True)
                if proc.returncode != 0:
                    # its checkpoint is gone already, so no incremental will build on it
                    log.warning("cannot remove bitmap %s from %s: %s", name, base, proc.stderr.strip())


def _resume(dom: libvirt.virDomain) -> None:
    """Let the guest run again, unless it was stopped meanwhile."""
    try:
        dom.resume()
    except libvirt.libvirtError as exc:
        if dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
            raise
        log.info("%s not resumed: it stopped meanwhile (%s)", dom.name(), exc.get_error_message())


class _BackgroundServer:
    """qemu-nbd on the bases, started and later stopped by a thread of its own, which stays up in
    between: each qemu-nbd is bound to die with the thread that started it (PR_SET_PDEATHSIG)."""

    def __init__(self, vm: str, eligible: list[DiskSpec], bitmap: str | None, sizes: dict[str, int]) -> None:
        self._disks: Future[dict[str, DiskExport]] = Future()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(vm, eligible, bitmap, sizes), name="vmkeep-serve",
                                        daemon=True)
        self._thread.start()

    def _run(self, vm: str, eligible: list[DiskSpec], bitmap: str | None, sizes: dict[str, int]) -> None:
        try:
            with ExitStack() as stack:
                self._disks.set_result(serve_images(stack, vm, eligible, bitmap, sizes))
                self._stop.wait()
        except BaseException as exc:
            if not self._disks.done():
                self._disks.set_exception(exc)

    def disks(self) -> dict[str, DiskExport]:
        """The exports once every qemu-nbd is up; raises what stopped one from starting."""
        return self._disks.result()

    def stop(self) -> None:
        """Stop every qemu-nbd it started (they let go of the bases); repeating it does nothing."""
        self._stop.set()
        self._thread.join()


@dataclass
class SanPoint:
    disks: dict[str, DiskExport]
    parent_cp: str | None  # the checkpoint the incremental builds on; None: full
    reason: str
    consistency: Consistency = "crash"
    release: Callable[[], None] | None = None  # the engine's reads are done: commit back now


@contextmanager
def frozen_bases(dom: libvirt.virDomain, eligible: list[DiskSpec], sizes: dict[str, int], overlay_dir: Path,
                 checkpoint_xml: str, parent_cp: str | None, reason: str,
                 quiesced: Callable[[], AbstractContextManager[Consistency]]) -> Iterator[SanPoint]:
    """Snapshot and checkpoint with the guest paused, serve the bases; on leaving, commit back.

    ``sizes``: each disk's capacity, from libvirt. ``quiesced`` freezes the guest's filesystems
    around the snapshot and names the consistency. The point's ``release`` commits back at once,
    on a thread of its own, once the caller has read everything it needs from the bases.
    """
    vm = dom.name()
    overlays = {s.target: overlay_dir / f"{s.target}{OVERLAY_SUFFIX}" for s in eligible}
    overlay_dir.mkdir(parents=True, exist_ok=True)
    snapshot = snapshot_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE), overlays)
    taken: dict[str, Overlay] = {}
    point = SanPoint({}, parent_cp, reason)
    was_running = dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    serving: _BackgroundServer | None = None
    early: EarlyRelease[bool] | None = None
    try:
        with quiesced() as point.consistency:
            if was_running:
                dom.suspend()
            try:
                log.debug("%s: disk-only snapshot into %s", vm, overlay_dir)
                dom.snapshotCreateXML(snapshot, SNAPSHOT_FLAGS)
                taken = {s.target: (overlays[s.target], s.source, s.format) for s in eligible}
                # The bases hold the point in time from here on: qemu-nbd starts on them while the
                # checkpoint is made and the guest resumed and thawed (tens of milliseconds).
                serving = _BackgroundServer(vm, eligible, parent_cp, sizes)
                dom.checkpointCreateXML(checkpoint_xml, 0)
            except libvirt.libvirtError as exc:
                why = exc.get_error_message()
                remedy = explain_full_scratch(why, overlay_dir.parent) or "use --transport hotadd:nbd"
                raise HypervisorError(f"libvirt cannot snapshot {vm} for the san transport: {why}; {remedy}") from exc
            finally:
                if was_running:
                    _resume(dom)
        with ExitStack() as stack:
            try:
                assert serving is not None  # set with taken, before anything that can fail quietly
                stack.callback(serving.stop)
                point.disks = serving.disks()
            except ImageError as exc:
                if parent_cp is None:
                    raise
                stack.close()
                point.reason = f"the bitmap of checkpoint {parent_cp} cannot be read from the base image ({exc})"
                log.info("%s: full backup instead: %s", vm, point.reason)
                point.parent_cp = None
                point.disks = serve_images(stack, vm, eligible, None, sizes)

            def let_go() -> bool:
                stack.close()  # qemu-nbd releases the bases, so that the commit may write them
                return release_overlays(dom, taken)
            early = EarlyRelease(let_go, f"vmkeep-release-{vm}")
            point.release = early.start
            try:
                with ScratchWatch(dom, overlay_dir, early, "stopped reading and committed the overlays back"):
                    yield point
            finally:
                early.join()  # the engine may have started it: never two commits at once
    finally:
        if serving is not None:
            serving.stop()  # before the commit writes the bases; stopped already unless something failed
        try:
            # committed back already when the early release succeeded; else (again) now, raising the remedy
            bitmaps_kept = (early.outcome() if early is not None and early.succeeded
                            else not taken or release_overlays(dom, taken))
            if taken and not bitmaps_kept:
                forget_bitmaps(dom, [base for _, base, _ in taken.values()])
        finally:
            if not any(p.exists() for p, _, _ in taken.values()):
                shutil.rmtree(overlay_dir, ignore_errors=True)
