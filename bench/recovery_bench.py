"""Restore points used in place: instant recovery's time to running, and `vmkeep mount` against
qemu-nbd serving the same disk restored.

1. Time to running: a lab VM with one data disk of 1 GiB (256 MiB written) and one of 16 GiB
   (4 GiB written) is backed up; `vmkeep instant-restore` then boots the point and the clock
   stops when the guest agent answers. Reference, same run: the 1 GiB case; target: the 16 GiB
   case within 20 % of it (time to running must not depend on disk size).
2. Reads: a 2 GiB image with 1 GiB of random data, backed up into an encrypted repository and
   restored to a raw file. The same disk is read over NBD from `vmkeep mount` (cold: a fresh
   export each pass) and from qemu-nbd serving the restored file (the reference): 4 KiB random
   reads (p50 and p99 latency, one request at a time) and a sequential read of the whole disk
   (4 MiB requests, 4 in flight).

Writes bench/results-recovery.json and its table in docs/performance.md.

    .venv/bin/python -m bench.recovery_bench
"""

from __future__ import annotations

import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import libvirt
import libvirt_qemu
import nbd

from bench.repo_bench import ROOT, write_section
from vmkeep.engine.mount import PointSpec, serve
from vmkeep.lab.vm import create_lab_vm, destroy_lab_vm
from vmkeep.transport.qemu_nbd import ImageInfo, serve_image

VMKEEP = str(Path(sys.executable).with_name("vmkeep"))
MARK_BEGIN, MARK_END = "<!-- recovery-bench:begin -->", "<!-- recovery-bench:end -->"
MiB, GiB = 1 << 20, 1 << 30
ENV = {**os.environ, "VMKEEP_PASSPHRASE": "bench passphrase"}


def vmkeep(*args: str) -> dict:
    proc = subprocess.run([VMKEEP, *args, "--json"], capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        raise SystemExit(f"vmkeep {' '.join(args)} failed: {proc.stderr}")
    return dict(json.loads(proc.stdout))


def fill(image: Path, written: int) -> None:
    """Incompressible data in the first ``written`` bytes of a qcow2 image (host side, VM stopped)."""
    size = int(json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)], capture_output=True,
                                         text=True, check=True).stdout)["virtual-size"])
    with serve_image(ImageInfo(image, "qcow2", size), readonly=False) as uri:
        h = nbd.NBD()
        h.connect_uri(uri)
        for offset in range(0, written, 16 * MiB):  # NBD requests stay under 32 MiB
            h.pwrite(os.urandom(16 * MiB), offset)
        h.flush()
        h.shutdown()


def time_to_running(size: int, written: int, repo: str) -> float:
    name = f"vmkeep-rb-{secrets.token_hex(3)}"
    vm = create_lab_vm(name, disks=1, size=size)
    copy = f"{name}-ir"
    try:
        vm.stop()
        fill(vm.disks["vda"], written)
        vm.start()
        point = vmkeep("backup", name, "--repo", repo)["vms"][0]["point"]
        conn = libvirt.open("qemu:///system")
        t0 = time.monotonic()
        vmkeep("instant-restore", f"{name}@{point}", "--repo", repo, "--as", copy)
        dom = conn.lookupByName(copy)
        while True:
            try:
                libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 2, 0)
                break
            except libvirt.libvirtError:
                time.sleep(0.2)
        seconds = time.monotonic() - t0
        conn.close()
        return seconds
    finally:
        subprocess.run([VMKEEP, "instant-restore", "finish", copy, "--discard"], capture_output=True, env=ENV)
        destroy_lab_vm(copy)
        destroy_lab_vm(name)


def random_latency(uri: str, size: int, data: int, n: int = 400) -> tuple[float, float]:
    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(7)
    times = []
    for _ in range(n):
        offset = rng.randrange(0, data // 4096) * 4096
        t0 = time.perf_counter()
        h.pread(4096, offset)
        times.append((time.perf_counter() - t0) * 1000)
    h.shutdown()
    times.sort()
    return round(statistics.median(times), 3), round(times[int(n * 0.99) - 1], 3)


def sequential(uri: str) -> float:
    t0 = time.monotonic()
    subprocess.run(["nbdcopy", "--requests=4", "--request-size=4194304", uri, "null:"], check=True, capture_output=True)
    return time.monotonic() - t0


def reads(base: Path) -> dict[str, dict[str, float]]:
    image = base / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(2 * GiB)], check=True)
    fill(image, GiB)
    repo = str(base / "repo-img")
    vmkeep("repo", "init", repo, "--encrypt")
    point = vmkeep("disk", "backup", str(image), "--repo", repo, "--name", "img")["point"]
    raw = base / "restored.raw"
    vmkeep("disk", "restore", f"img@{point}", "--repo", repo, "--output", str(raw), "--format", "raw")
    os.environ["VMKEEP_PASSPHRASE"] = ENV["VMKEEP_PASSPHRASE"]
    out: dict[str, dict[str, float]] = {}
    for label in ("qemu-nbd (restored raw)", "vmkeep mount (repository)"):
        lat, seq = [], []
        for _ in range(3):
            if label.startswith("qemu"):
                ctx = serve_image(ImageInfo(raw, "raw", 2 * GiB))
            else:
                ctx = serve(PointSpec(repo, "img", point, "disk"))
            with ctx as uri:
                lat.append(random_latency(uri, 2 * GiB, GiB))
            with (serve_image(ImageInfo(raw, "raw", 2 * GiB)) if label.startswith("qemu")
                  else serve(PointSpec(repo, "img", point, "disk"))) as uri:
                seq.append(sequential(uri))
        p50 = statistics.median(x[0] for x in lat)
        p99 = statistics.median(x[1] for x in lat)
        seconds = statistics.median(seq)
        out[label] = {"p50_ms": p50, "p99_ms": p99, "seq_seconds": round(seconds, 2),
                      "seq_mb_s": round(2 * GiB / seconds / 1e6, 0)}
    return out


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="vmkeep-rbench-") as tmp:
        base = Path(tmp)
        repo = str(base / "repo-vm")
        vmkeep("repo", "init", repo, "--encrypt")
        small = time_to_running(GiB, 256 * MiB, repo)
        large = time_to_running(16 * GiB, 4 * GiB, repo)
        read = reads(base)
    ratio = large / small
    doc = {"cpus": os.cpu_count(), "time_to_running": {"1 GiB": round(small, 2), "16 GiB": round(large, 2),
                                                       "ratio": round(ratio, 3), "target": "≤ 1.2"},
           "reads": read}
    (ROOT / "bench" / "results-recovery.json").write_text(json.dumps(doc, indent=1) + "\n")
    q, m = read["qemu-nbd (restored raw)"], read["vmkeep mount (repository)"]
    lines = ["", f"{doc['cpus']} CPUs; written by `bench/recovery_bench.py`.", "",
             "| instant recovery, time to running (agent answers) | seconds |", "|---|---:|",
             f"| 1 GiB disk (256 MiB data) | {small:.1f} |", f"| 16 GiB disk (4 GiB data) | {large:.1f} |",
             f"| ratio 16 GiB / 1 GiB (target ≤ 1.2) | {ratio:.2f} {'met' if ratio <= 1.2 else 'not met'} |", "",
             "| reads of a 2 GiB disk (1 GiB data) | 4 KiB random p50 ms | p99 ms | sequential MB/s |",
             "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['seq_mb_s']:.0f} |" for k, v in read.items()]
    lines += ["", f"mount / qemu-nbd: sequential {m['seq_mb_s'] / q['seq_mb_s']:.2f}, random p50 latency "
              f"{m['p50_ms'] / q['p50_ms']:.1f}×.", ""]
    write_section(MARK_BEGIN, MARK_END, lines, "Restore points in place: instant recovery and mount")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
