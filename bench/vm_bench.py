"""Backup of a running libvirt VM against the limits of its own pull-mode NBD export, in one run.

A VM (no guest OS needed: QEMU owns the disk and serves the backup export) gets an 8 GiB qcow2
disk holding --data-gib of incompressible data. Measured, each the median of --repeat rounds (a
round runs every contender once, in turn, so that drift hits a tool and its reference alike):

per transport — hotadd (QEMU's pull-mode export on a unix socket) and san (the proxy's qemu-nbd
on the frozen base image):

* read + write limit: `nbdcopy` from that transport's export to a raw file on the local
  filesystem, then `sync`;
* read limit: `nbdcopy` from that export to `null:`;
* device floor (no target; it explains the disk-bound ratio): `nbdcopy` from that export to
  `null:` while 6 threads write the same number of bytes as 4 MiB files with O_DIRECT, as
  vmkeep's chunk store does, beside it — the device's time for vmkeep's I/O with no CPU work;
* `vmkeep backup --full` into a fresh encrypted repository on the local disk, and on tmpfs;
* after a 1 MiB write into the running VM, `vmkeep backup` (incremental) against the full, and
  the same incremental as a proxy's worker runs it (a process already up, the key derived once);
  each the median of --incremental-repeat runs.

Writes bench/results-vm.json and the tables of docs/performance.md between its markers.

    .venv/bin/python -m bench.vm_bench [--data-gib 4] [--repeat 3] [--incremental-repeat 9]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import libvirt

from bench.repo_bench import (
    ENV,
    ROOT,
    VMKEEP,
    GiB,
    Results,
    Trial,
    median_of,
    publish,
    rm,
    rounds,
    sh,
)
from vmkeep.hypervisors.libvirt.connector import LibvirtConnector
from vmkeep.lab.images import Segment, make_image

VM = "vmkeep-bench"
IMAGES = Path("/var/lib/libvirt/images/vmkeep-bench")
MARK_BEGIN, MARK_END = "<!-- vm-bench:begin -->", "<!-- vm-bench:end -->"
TRANSPORTS = ("hotadd", "san")


def define_vm(image: Path, name: str = VM) -> None:
    """A running VM with no guest OS on ``image``: QEMU owns the disk and serves backup exports."""
    xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
           "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
           "<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>"
           f"<source file='{image}'/><target dev='vda' bus='virtio'/></disk></devices></domain>")
    conn = libvirt.open("qemu:///system")
    try:
        conn.defineXML(xml).create()
    finally:
        conn.close()


def destroy_vm(name: str = VM) -> None:
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()


Record = Callable[..., None]


def reference(transport: str, cmd: Callable[[str], object], *scratch: Path) -> Trial:
    """nbdcopy from the export vmkeep reads with ``transport``: QEMU's pull-mode export (hotadd)
    or qemu-nbd on the frozen base image (san). The export is set up and released around each
    run, outside its timing, so that vmkeep's own backups can run between them."""
    stack = ExitStack()
    uri: list[str] = []

    def setup() -> None:
        rm(*scratch)
        connector = LibvirtConnector()
        stack.callback(connector.close)
        pit = stack.enter_context(connector.point_in_time(VM, since=None, previous_disks=None,
                                                          transports=[transport], quiesce="off"))
        uri.append(pit.disks["vda"].uri)

    def cleanup() -> None:
        uri.clear()
        stack.close()
        rm(*scratch)
    return Trial(lambda: cmd(uri[0]), setup, cleanup)


FLOOR_WRITERS = 6  # vmkeep's default workers: as many O_DIRECT chunk writes in flight
FLOOR_FILE = 4 << 20  # vmkeep's chunk size


def write_direct(directory: Path, nbytes: int) -> None:
    """``nbytes`` of random data written as 4 MiB files with O_DIRECT by several threads."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    directory.mkdir(parents=True, exist_ok=True)
    buf = mmap.mmap(-1, FLOOR_FILE)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(FLOOR_FILE))

    def writer(first: int) -> None:
        for i in range(first, nbytes // FLOOR_FILE, FLOOR_WRITERS):
            fd = os.open(directory / f"{i:06d}", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
            try:
                os.write(fd, buf)
            finally:
                os.close(fd)

    with ThreadPoolExecutor(FLOOR_WRITERS) as pool:
        list(pool.map(writer, range(FLOOR_WRITERS)))
    os.sync()


def device_floor(transport: str, directory: Path, nbytes: int) -> Trial:
    """The export read to ``null:`` while ``nbytes`` are written with O_DIRECT beside it."""
    def both(uri: str) -> None:
        reader = subprocess.Popen(["nbdcopy", uri, "null:"], env=ENV)
        try:
            write_direct(directory, nbytes)
        finally:
            if reader.wait() != 0:
                raise RuntimeError("nbdcopy to null: failed")
    return reference(transport, both, directory)


def guest_write(n: int) -> None:
    """1 MiB written into the running VM (the ``n``-th write lands at its own offset)."""
    subprocess.run(["virsh", "-c", "qemu:///system", "qemu-monitor-command", VM, "--hmp",
                    'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend '
                    f'"write -P {n} {(n * 37 + 5) * 1048576} 1M"'], check=True, capture_output=True)


def incrementals(transport: str, repo: Path, repeat: int, first_write: int, record: Record,
                 repo_args: tuple[str, ...] = (), label: str = "vmkeep incremental after a 1 MiB write",
                 engine_label: str = "the same, engine time only") -> None:
    """A 1 MiB guest write, then an incremental backup, ``repeat`` times (``repo_args``: how the
    repository is unlocked, when not by the passphrase in the environment)."""
    engine: list[float] = []

    def write() -> None:  # before the clock starts, as in proxy_incrementals
        guest_write(first_write + len(engine) + 1)

    def one() -> None:
        out = json.loads(sh(VMKEEP, "backup", VM, "--repo", str(repo), *repo_args, "--transport", transport,
                            "--json").stdout)["vms"][0]
        # the write touches one or two 4 MiB chunks of allocated data (bound: both re-read whole)
        assert out["mode"] == "incremental" and out["bytes_read"] <= 2 * 4 << 20, out
        engine.append(float(out["duration"]))

    t, runs = median_of(repeat, write, one, lambda: None, touch_memory=False)
    record(f"{transport}: {label}", t, runs, nbytes=1 << 20)
    record(f"{transport}:   {engine_label}", statistics.median(engine), engine, nbytes=1 << 20)


def proxy_incrementals(transport: str, repo: Path, repeat: int, first_write: int, record: Record) -> None:
    """The same incremental as a proxy's worker runs it: in a process that is already up and has
    derived the repository's key for an earlier job, opening the repository and the hypervisor
    connection for this job."""
    from vmkeep.engine.vm import backup_vm
    from vmkeep.repository.backends import open_backend
    from vmkeep.repository.config import Credentials
    from vmkeep.repository.repo import Repository

    credentials = Credentials(passphrase=ENV["VMKEEP_PASSPHRASE"].encode())
    Repository.open(open_backend(str(repo)), credentials)  # an earlier job of this proxy
    runs: list[float] = []
    for i in range(repeat):
        guest_write(first_write + i + 1)
        t = time.perf_counter()
        connector = LibvirtConnector()
        try:
            m = backup_vm(Repository.open(open_backend(str(repo)), credentials), connector, VM,
                          transports=[transport], quiesce="try")
        finally:
            connector.close()
        runs.append(time.perf_counter() - t)
        assert m.meta["mode"] == "incremental" and m.stats["bytes_read"] <= 2 * 4 << 20, m.stats
    record(f"{transport}:   the same, in a running proxy process", statistics.median(runs), runs, nbytes=1 << 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-gib", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--incremental-repeat", type=int, default=9,
                    help="incrementals per kind: each takes a fraction of a second, and single runs vary "
                         "by tens of milliseconds on a busy host")
    args = ap.parse_args()
    work = ROOT / "bench" / "work"
    work.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm/vmkeep-vm-bench")
    destroy_vm()
    shutil.rmtree(IMAGES, ignore_errors=True)
    IMAGES.mkdir(parents=True)
    data = int(args.data_gib * GiB)
    image = make_image(IMAGES / "vda.qcow2", 8 * GiB, [Segment(0, data, "random", "vm-bench")])
    define_vm(image)
    results = Results(data)
    record = results.record

    try:
        disk_repo, shm_repo, copy = work / "vm-repo", shm / "repo", work / "vm-nbdcopy.raw"

        def full_into(repo: Path, transport: str, keep: bool) -> Trial:
            def setup() -> None:
                rm(repo)
                sh(VMKEEP, "repo", "init", str(repo), "--encrypt")
            return Trial(lambda: sh(VMKEEP, "backup", VM, "--repo", str(repo), "--full", "--transport", transport,
                                    "--json"), setup, (lambda: None) if keep else (lambda: rm(repo)))

        trials: dict[str, Trial] = {}
        for tr in TRANSPORTS:
            trials[f"{tr}: nbdcopy export → raw file + sync"] = reference(
                tr, lambda uri: (sh("nbdcopy", uri, str(copy)), sh("sync")), copy)
            trials[f"{tr}: nbdcopy export → null:"] = reference(tr, lambda uri: sh("nbdcopy", uri, "null:"))
            trials[f"{tr}: device floor, export → null: beside O_DIRECT writes"] = device_floor(
                tr, work / "vm-floor", data)
            trials[f"{tr}: vmkeep full backup, encrypted, tmpfs"] = full_into(shm_repo, tr, keep=False)
            # checkpoints belong to the VM: the local repository's full of the last transport, the
            # last run of the last round, is what the incrementals below build on
            trials[f"{tr}: vmkeep full backup, encrypted, local disk"] = full_into(disk_repo, tr, keep=True)
        times = rounds(args.repeat, trials)
        order = [k for kind in ("raw file", "null:", "device floor", "tmpfs", "local disk") for k in trials
                 if kind in k and not (kind == "null:" and "device floor" in k)]
        for key in order:
            record(key, statistics.median(times[key]), times[key])
        rm(shm)

        for i, transport in enumerate(TRANSPORTS):
            n = args.incremental_repeat
            incrementals(transport, disk_repo, n, 2 * i * n, record)
            proxy_incrementals(transport, disk_repo, n, (2 * i + 1) * n, record)
        rm(disk_repo)
    finally:
        destroy_vm()
        shutil.rmtree(IMAGES, ignore_errors=True)

    def secs(key: str) -> float:
        return float(results[key]["seconds"])  # type: ignore[arg-type]

    ratios = {}
    for tr in TRANSPORTS:
        full = secs(f"{tr}: vmkeep full backup, encrypted, local disk")
        ratios.update({
            f"{tr}, disk-bound: full backup / (nbdcopy to file + sync)": (
                round(secs(f"{tr}: nbdcopy export → raw file + sync") / full, 3), 0.8, "≥"),
            f"{tr}, disk-bound: full backup / device floor (no target)": (
                round(secs(f"{tr}: device floor, export → null: beside O_DIRECT writes") / full, 3), 0.0, "info"),
            f"{tr}, CPU-bound: full backup on tmpfs / nbdcopy to null": (
                round(secs(f"{tr}: nbdcopy export → null:") / secs(f"{tr}: vmkeep full backup, encrypted, tmpfs"),
                      3), 0.5, "≥"),
            f"{tr}, incremental after 1 MiB / full, whole command": (
                round(secs(f"{tr}: vmkeep incremental after a 1 MiB write") / full, 4), 0.03, "<"),
            f"{tr}, incremental after 1 MiB / full, in a running proxy": (
                round(secs(f"{tr}:   the same, in a running proxy process") / full, 4), 0.03, "<"),
            f"{tr}, incremental after 1 MiB / full, engine time": (
                round(secs(f"{tr}:   the same, engine time only") / full, 4), 0.03, "<"),
        })
    publish("vm", (MARK_BEGIN, MARK_END), "VM backup through libvirt",
            f"VM disk: 8 GiB qcow2 holding {data / GiB:.1f} GiB of incompressible data; {os.cpu_count()} CPUs; "
            f"median of {args.repeat} runs, of {args.incremental_repeat} for the incrementals (written by "
            "`bench/vm_bench.py`).",
            {"disk_bytes": 8 * GiB, "data_bytes": data, "repeat": args.repeat, "cpus": os.cpu_count()},
            results, ratios)

if __name__ == "__main__":
    main()
