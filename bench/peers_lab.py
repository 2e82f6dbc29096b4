"""The lab side of the peers benchmark: the VMs under test, what their guests write, and how each
tool's run is measured (wall seconds, CPU seconds of the whole process tree, peak memory).

The VMs run under libvirt with no guest OS: QEMU owns the disk and serves the pull-mode backup
export, and "guest writes" go through QEMU's own block layer (HMP ``qemu-io``), as a guest's
writes would land.
"""

from __future__ import annotations

import collections
import os
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import libvirt
import libvirt_qemu

from bench.repo_bench import BASE_ENV, VMKEEP, Trial, rm, rounds
from bench.vm_bench import define_vm, destroy_vm
from vmkeep.lab.images import Segment, content, make_image

VM = "vmkeep-peers"
WORK = Path("/var/lib/vmkeep-bench-peers")
SHM = Path("/dev/shm/vmkeep-bench-peers")
PIECE = 4 << 20
ENV = {**BASE_ENV, "VMKEEP_PASSPHRASE": "bench-passphrase", "BORG_PASSPHRASE": "bench-passphrase",
       "BORG_BASE_DIR": str(WORK / "borg-home")}

Measured = dict[str, float]


def run_measured(cmd: list[str] | str, *, shell: bool = False) -> Measured:
    """Wall, CPU (user + system, the whole process tree) and peak RSS of one command."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, shell=shell, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed: {err[-800:]}")
    return {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def median(runs: list[Measured]) -> Measured:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


@dataclass
class Contender:
    """One tool's run in a round: its set-up and clean-up are not timed."""

    cmd: Callable[[], list[str] | str]
    setup: Callable[[], None] = lambda: None
    cleanup: Callable[[], None] = lambda: None
    shell: bool = False


def median_rounds(repeat: int, contenders: dict[str, Contender], cold: bool = False) -> dict[str, Measured]:
    """Each contender's median over ``repeat`` rounds, every round running each contender once in
    turn (:func:`bench.repo_bench.rounds`): the machine's drift then hits a tool and its reference
    alike.

    ``cold``: the page cache is emptied before each run, so what the tool reads comes from the
    disk, as in a restore from a repository written days ago (the same for every tool)."""
    runs: dict[str, list[Measured]] = {name: [] for name in contenders}

    def trial(name: str, c: Contender) -> Trial:
        def setup() -> None:
            c.setup()
            if cold:
                subprocess.run(["sync"], check=True)
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return Trial(lambda: runs[name].append(run_measured(c.cmd(), shell=c.shell)), setup, c.cleanup)

    rounds(repeat, {name: trial(name, c) for name, c in contenders.items()})
    return {name: median(r) for name, r in runs.items()}


def fresh(*paths: Path) -> Callable[[], None]:
    """A set-up step that removes ``paths`` and flushes, so no run pays for the last one's writeback."""
    def clean() -> None:
        rm(*paths)
        subprocess.run(["sync"], check=True)
    return clean


# a plain repository refuses a passphrase: its commands run without VMKEEP_PASSPHRASE
WITHOUT_PASSPHRASE = ["env", "-u", "VMKEEP_PASSPHRASE"]


def init_repo(repo: Path, *, encrypt: bool = True) -> None:
    fresh(repo)()
    subprocess.run([*([] if encrypt else WITHOUT_PASSPHRASE), VMKEEP, "repo", "init", str(repo),
                    *(["--encrypt"] if encrypt else [])], env=ENV, check=True, capture_output=True)


def vmkeep_backup(repo: Path, vm: str = VM, *, full: bool = False, encrypted: bool = True) -> list[str]:
    return [*([] if encrypted else WITHOUT_PASSPHRASE), VMKEEP, "backup", vm, "--repo", str(repo), "--transport",
            "hotadd", "--json", *(["--full"] if full else [])]


def virtnbdbackup(level: str, out: Path, vm: str = VM, *, compress: bool = True) -> list[str]:
    compression = ["--compress"] if compress else []
    return ["virtnbdbackup", "-d", vm, "-l", level, "-o", str(out), "--noprogress", *compression]


def du(path: Path) -> int:
    """Bytes stored under ``path`` (file sizes; every tool here writes whole files)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop_checkpoints(vm: str = VM) -> None:
    """virtnbdbackup refuses to work beside another tool's checkpoints: each chain starts clean."""
    conn = libvirt.open("qemu:///system")
    try:
        for cp in conn.lookupByName(vm).listAllCheckpoints():
            cp.delete(0)
    finally:
        conn.close()


def template_segments(size: int) -> list[Segment]:
    """Half incompressible, a quarter text-like, a quarter never written (zero)."""
    return [Segment(0, size // 2, "random", "peers"), Segment(size // 2, size // 4, "text", "peers")]


def fresh_vm(image: Path, size: int, vm: str = VM) -> None:
    """The VM on a disk made anew, the same bytes every time."""
    destroy_vm(vm)
    image.unlink(missing_ok=True)
    make_image(image, size, template_segments(size))
    define_vm(image, vm)


def clone_vm(template: Path, clone: Path, vm: str) -> None:
    """A VM on a linked clone of ``template`` (a qcow2 overlay, as a template deployment makes)."""
    destroy_vm(vm)
    clone.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(template), "-F", "qcow2", str(clone)],
                   check=True)
    define_vm(clone, vm)


def guest_rewrites(fraction: float, seed: str, size: int, vm: str = VM) -> int:
    """The running VM rewrites ``fraction`` of its disk in 4 MiB pieces at random aligned places
    (data, text and never-written areas alike), each piece new data: half incompressible, half
    text-like. Returns the bytes written."""
    slots = list(range(size // PIECE))
    rng = random.Random(seed)
    chosen = rng.sample(slots, max(1, int(len(slots) * fraction)))
    source = WORK / "guest-piece"
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(vm)
        for slot in chosen:
            half, key = PIECE // 2, f"{seed}:{slot}"
            source.write_bytes(content("random", key, 0, half) + content("text", key, half, half))
            libvirt_qemu.qemuMonitorCommand(
                dom, f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -s {source} '
                f'{slot * PIECE} {PIECE}"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    finally:
        conn.close()
    return len(chosen) * PIECE


def export_uri(vm: str = VM) -> tuple[str, Callable[[], None]]:
    """A pull-mode backup export of the VM's disk on a unix socket (what vmkeep's hotadd reads)."""
    sock = WORK / "export.sock"
    sock.unlink(missing_ok=True)
    conn = libvirt.open("qemu:///system")
    dom = conn.lookupByName(vm)
    dom.backupBegin(f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/><disks>"
                    f"<disk name='vda' backup='yes' type='file'><scratch file='{WORK / 'scratch.qcow2'}'/></disk>"
                    "</disks></domainbackup>", None, 0)

    def end() -> None:
        dom.abortJob()
        conn.close()
        (WORK / "scratch.qcow2").unlink(missing_ok=True)
    return f"nbd+unix:///vda?socket={sock}", end


def profile(name: str, cmd: list[str] | str, out_dir: Path) -> list[dict[str, object]]:
    """Run ``cmd`` once under py-spy (all its Python processes, native frames included) and return
    the functions that held the CPU most, by share of the samples where they were on top."""
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{name}.txt"
    argv = cmd if isinstance(cmd, list) else ["sh", "-c", cmd]
    spy = [str(Path(VMKEEP).with_name("py-spy")), "record", "--subprocesses", "--native", "--rate", "200",
           "--format", "raw", "--output", str(raw), "--"]
    subprocess.run(spy + argv, env=ENV, check=True, capture_output=True)
    own: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        own[hot_spot(stack.split(";"))] += int(count)
    total = sum(own.values())
    return [{"function": f, "share": round(n / total, 3)} for f, n in own.most_common(12)] if total else []


def hot_spot(frames: list[str]) -> str:
    """A sample's place, as "innermost Python frame → native code it was in" (a native frame
    without a symbol is named by its library)."""
    python = next((f for f in reversed(frames) if ".py:" in f), "(no Python frame)")
    leaf = frames[-1]
    if leaf.startswith("0x") and "(" in leaf:
        leaf = leaf[leaf.index("(") + 1:].rstrip(")")
    return python if leaf == python else f"{python} → {leaf}"


def cleanup_vms(*names: str) -> None:
    for name in names:
        destroy_vm(name)
