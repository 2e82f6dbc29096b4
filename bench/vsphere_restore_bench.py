"""A vSphere restore streams through the hypervisor: bytes moved and scratch space on the proxy.

The lab's vCenter simulator (vmkeep/lab/vcsim/main.go, which really decodes what an NFC import
sends) holds a VM with a 4 GiB disk of which 1 GiB is random data (16 runs of 64 MiB spread over
the disk). It is backed up into an encrypted repository, then `vmkeep restore --as NEW` brings it
back as a new VM through an NFC import lease. Measured: the bytes the simulator received for the
lease (its GET /vmkeep-lab/nfc counter), the peak scratch space the restore used on the proxy
(its TMPDIR and /tmp polled every 20 ms), the restore command's peak memory, and the time; the
new disk is compared byte for byte with the source. For comparison, the restore over the
original VM (one datastore PUT per disk, zeros included since a PUT replaces the whole file).
Targets (issue 23): at most 1.1 GiB moved; no scratch space of a chunk per worker or more.

Writes bench/results-vsphere-restore.json and its table in docs/performance.md.

    .venv/bin/python -m bench.vsphere_restore_bench [--size-gib 4] [--data-gib 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.repo_bench import ROOT, write_section
from vmkeep.lab import vcsim

VMKEEP = str(Path(sys.executable).with_name("vmkeep"))
MARK_BEGIN, MARK_END = "<!-- vsphere-restore-bench:begin -->", "<!-- vsphere-restore-bench:end -->"
MiB, GiB = 1 << 20, 1 << 30
RUN = 64 * MiB
CHUNK, WORKERS = 4 * MiB, 6  # the repository's default chunk size and the restore's default workers
TARGET_MOVED = 1.1  # GiB


def allocated(paths: list[Path]) -> int:
    """Bytes allocated on disk by the files under ``paths``."""
    total = 0
    for top in paths:
        for root, _dirs, files in os.walk(top):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
                except FileNotFoundError:
                    continue
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(env: dict[str, str], *args: str, scratch: Path | None = None) -> dict[str, Any]:
    """``vmkeep ARGS --json``: seconds, the peak scratch it allocated under ``scratch`` and
    /tmp's vmkeep-restore-* (where restores staged disks before issue 23), its peak memory."""
    found = {"scratch": 0, "rss": 0}
    stop = threading.Event()
    started = time.monotonic()
    proc = subprocess.Popen([VMKEEP, *args, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)

    def poll() -> None:
        while not stop.wait(0.02):
            staged = [scratch] if scratch else []
            staged += list(Path("/tmp").glob("vmkeep-restore-*"))
            found["scratch"] = max(found["scratch"], allocated(staged))
            found["rss"] = max(found["rss"], peak_rss(proc.pid))

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    seconds = time.monotonic() - started
    stop.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"vmkeep {' '.join(args)} failed: {err[-2000:]}{out[-2000:]}")
    return {"seconds": seconds, "scratch_peak_bytes": found["scratch"], "peak_rss_bytes": found["rss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4)
    ap.add_argument("--data-gib", type=float, default=1)
    args = ap.parse_args()
    size, data = int(args.size_gib * GiB), int(args.data_gib * GiB)
    runs = data // RUN
    with tempfile.TemporaryDirectory(prefix="vmkeep-vsphere-bench-") as tmp:
        work = Path(tmp)
        state = work / "vcsim"
        sim = vcsim.start(f"127.0.0.1:{free_port()}", lab_vm=False, state=state)
        try:
            env = {**os.environ, **sim.env(), "VMKEEP_PASSPHRASE": "bench passphrase"}
            flat = vcsim.create_vm(sim, "bench-src", size)
            with flat.open("r+b") as f:  # incompressible data, spread over the whole disk
                for i in range(runs):
                    f.seek(i * (size // runs))
                    f.write(os.urandom(RUN))
            repo = str(work / "repo")
            subprocess.run([VMKEEP, "repo", "init", repo, "--encrypt"], env=env, check=True, capture_output=True)
            run(env, "backup", "bench-src", "--host", sim.address, "--repo", repo)

            scratch = work / "scratch"
            scratch.mkdir()
            restore_env = {**env, "TMPDIR": str(scratch)}
            as_new = run(restore_env, "restore", "bench-src", "--host", sim.address, "--repo", repo, "--as",
                         "bench-copy", "--no-start", scratch=scratch)
            (lease,) = [x for x in sim.nfc_leases() if x["vm"] == "bench-copy"]
            copy = Path(sim.datastores[0]) / "bench-copy" / "bench-copy-flat.vmdk"
            same = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(flat), str(copy)]
                                  ).returncode == 0
            reference = work / "source.raw"  # the source as backed up, for the restore over it
            copy.rename(reference)
            with flat.open("r+b") as f:  # damage the original where the point has data and zeros
                for at in (0, size // 2 + RUN + MiB):
                    f.seek(at)
                    f.write(os.urandom(MiB))

            over = run(restore_env, "restore", "bench-src", "--host", sim.address, "--repo", repo, "--overwrite",
                       scratch=scratch)
            over_same = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(reference),
                                        str(flat)]).returncode == 0
        finally:
            vcsim.stop(state)
    doc = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "disk_bytes": size, "data_bytes": runs * RUN, "cpus": os.cpu_count(), "chunk_bytes": CHUNK,
        "workers": WORKERS,
        "as_new": {"bytes_moved": lease["bytes"], "lease_state": lease["state"], "identical": same, **as_new},
        "overwrite": {"bytes_moved": size, "identical": over_same, **over},
    }
    (ROOT / "bench" / "results-vsphere-restore.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    write_markdown(doc)


def write_markdown(doc: dict[str, Any]) -> None:
    new, over = doc["as_new"], doc["overwrite"]
    moved = new["bytes_moved"] / GiB
    scratch_limit = doc["chunk_bytes"] * doc["workers"]
    lines = ["",
             f"A {doc['disk_bytes'] / GiB:.0f} GiB disk holding {doc['data_bytes'] / GiB:.1f} GiB of random data in "
             f"runs of 64 MiB, restored from an encrypted repository into the lab's vCenter simulator; "
             f"{doc['cpus']} CPUs, {doc['workers']} workers, {doc['chunk_bytes'] // MiB} MiB chunks (written by "
             "`bench/vsphere_restore_bench.py`). Byte-for-byte identical to the source: "
             f"{'yes' if new['identical'] else 'NO'} (as a new VM), "
             f"{'yes' if over['identical'] else 'NO'} (over the original).", "",
             "| method | target | measured | met |", "|---|---|---:|---|",
             f"| as a new VM (NFC import, streamOptimized): bytes moved to the simulator | ≤ {TARGET_MOVED} GiB | "
             f"{moved:.3f} GiB | {'yes' if moved <= TARGET_MOVED else 'no'} |",
             f"| as a new VM: scratch space on the proxy (peak) | < 1 chunk per worker "
             f"({doc['workers']} × {doc['chunk_bytes'] // MiB} MiB) | {new['scratch_peak_bytes'] / MiB:.1f} MiB | "
             f"{'yes' if new['scratch_peak_bytes'] < scratch_limit else 'no'} |",
             f"| as a new VM: time, whole command | — | {new['seconds']:.1f} s | |",
             f"| as a new VM: peak memory of the command | — | {new['peak_rss_bytes'] / MiB:.0f} MiB | |",
             f"| over the original (datastore PUT, zeros sent): bytes moved | the disk's size | "
             f"{over['bytes_moved'] / GiB:.3f} GiB | |",
             f"| over the original: scratch space (peak) / time | — | {over['scratch_peak_bytes'] / MiB:.1f} MiB / "
             f"{over['seconds']:.1f} s | |",
             ""]
    write_section(MARK_BEGIN, MARK_END, lines, "vSphere restore: streamed through the hypervisor")


if __name__ == "__main__":
    main()
