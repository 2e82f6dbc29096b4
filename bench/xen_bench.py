"""XenServer / XCP-ng backup against the limit of XAPI's own NBD export, in one run.

The lab's XAPI simulator (vmkeep/lab/xapi: real qcow2 images, real qemu-nbd exports over TLS
behind XAPI's get_nbd_info, changed blocks from real persistent dirty bitmaps) holds a VM with an
8 GiB disk of which --data-gib is incompressible data. Measured, each the median of --repeat
rounds (a round runs every contender once, in turn, so that drift hits a tool and its reference
alike):

* read + write limit: `nbdcopy` from the NBD export XAPI gives for a snapshot of the disk (TLS,
  the certificate get_nbd_info returns) to a raw file on the local filesystem, then `sync`;
* read limit: the same export to `null:`;
* `vmkeep backup --full` of the VM into a fresh encrypted repository on the local disk (snapshot,
  CBT, data_destroy and the snapshot's removal included);
* after a 1 MiB guest write, `vmkeep backup` (incremental: only the blocks XAPI's
  list_changed_blocks names) as a whole command, its engine time, and the same incremental in a
  process that is already up (as a proxy's worker runs it); each the median of
  --incremental-repeat runs.

Targets (issue 26): full ≥ 0.8× nbdcopy to a file + sync; incremental after 1 MiB < 3 % of the full.
Writes bench/results-xen.json and its table in docs/performance.md.

    .venv/bin/python -m bench.xen_bench [--data-gib 4] [--repeat 3] [--incremental-repeat 9]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench import repo_bench as rb
from bench.repo_bench import ENV, ROOT, VMKEEP, GiB, Results, Trial, publish
from vmkeep.lab import xapi
from vmkeep.lab.images import Segment, write_segments

VM = "xen-bench"
MiB = 1 << 20
MARK_BEGIN, MARK_END = "<!-- xen-bench:begin -->", "<!-- xen-bench:end -->"
Record = Callable[..., None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Lab:
    """The simulator, the bench VM and an XAPI session of the bench's own (for the reference's
    snapshots and exports)."""

    def __init__(self, sim: xapi.Xapi, work: Path) -> None:
        self.sim, self.work = sim, work
        self.session = xapi.session(sim)
        self.x = self.session.xenapi

    def snapshot_export(self) -> tuple[str, Callable[[], None]]:
        """A snapshot of the bench VM and the NBD URI of its disk as XAPI gives it; the undo."""
        (ref,) = self.x.VM.get_by_name_label(VM)
        snap = self.x.VM.snapshot(ref, "bench-reference")
        vdis = [self.x.VBD.get_VDI(v) for v in self.x.VM.get_VBDs(snap) if self.x.VBD.get_type(v) == "Disk"]
        (info, *_) = self.x.VDI.get_nbd_info(vdis[0])
        certs = Path(tempfile.mkdtemp(prefix="xen-bench-tls-"))
        (certs / "ca-cert.pem").write_text(info["cert"])
        uri = (f"nbds://{info['address']}:{info['port']}/{quote(info['exportname'], safe='')}"
               f"?tls-certificates={certs}")

        def undo() -> None:
            self.x.VM.destroy(snap)
            for vdi in vdis:
                self.x.VDI.destroy(vdi)
            shutil.rmtree(certs, ignore_errors=True)
        return uri, undo

    def close(self) -> None:
        self.session.xenapi.session.logout()


def reference(lab: Lab, cmd: Callable[[str], object], *scratch: Path) -> Trial:
    """A trial timing ``cmd(uri)`` on a fresh snapshot's export, the snapshot made and removed
    outside the timing."""
    state: dict[str, Any] = {}

    def setup() -> None:
        rb.rm(*scratch)
        state["uri"], state["undo"] = lab.snapshot_export()

    def cleanup() -> None:
        state.pop("undo")()
        rb.rm(*scratch)
    return Trial(lambda: cmd(state["uri"]), setup, cleanup)


def incrementals(lab: Lab, env: dict[str, str], repo: Path, disk: str, repeat: int, first: int,
                 record: Record) -> None:
    """A 1 MiB guest write, then an incremental backup through the CLI, ``repeat`` times."""
    engine: list[float] = []

    def write() -> None:
        n = first + len(engine) + 1
        xapi.guest_write(lab.sim, disk, (n * 37 + 5) * MiB, bytes([n % 251 + 1]) * MiB)

    def one() -> None:
        out = json.loads(rb.sh(VMKEEP, "backup", VM, "--host", lab.sim.address, "--repo", str(repo), "--json",
                            env=env).stdout)["vms"][0]
        assert out["mode"] == "incremental" and out["bytes_read"] <= 2 * MiB, out
        engine.append(float(out["duration"]))

    t, runs = rb.median_of(repeat, write, one, lambda: None, touch_memory=False)
    record("vmkeep incremental after a 1 MiB write", t, runs, nbytes=MiB)
    record("  the same, engine time only", statistics.median(engine), engine, nbytes=MiB)


def proxy_incrementals(lab: Lab, repo: Path, disk: str, repeat: int, first: int, record: Record) -> None:
    """The same incremental in a process already up with the repository's key derived."""
    from vmkeep.engine.vm import backup_vm
    from vmkeep.hypervisors.connect import open_connector
    from vmkeep.repository.backends import open_backend
    from vmkeep.repository.config import Credentials
    from vmkeep.repository.repo import Repository

    credentials = Credentials(passphrase=ENV["VMKEEP_PASSPHRASE"].encode())
    Repository.open(open_backend(str(repo)), credentials)  # an earlier job of this proxy
    runs: list[float] = []
    for i in range(repeat):
        n = first + i + 1
        xapi.guest_write(lab.sim, disk, (n * 37 + 5) * MiB, bytes([n % 251 + 1]) * MiB)
        t = time.perf_counter()
        connector = open_connector(lab.sim.address, credentials=("root", lab.sim.password))
        try:
            m = backup_vm(Repository.open(open_backend(str(repo)), credentials), connector, VM,
                          transports=["nbd"], quiesce="try")
        finally:
            connector.close()
        runs.append(time.perf_counter() - t)
        assert m.meta["mode"] == "incremental" and m.stats["bytes_read"] <= 2 * MiB, m.stats
    record("  the same, in a running proxy process", statistics.median(runs), runs, nbytes=MiB)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-gib", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--incremental-repeat", type=int, default=9)
    args = ap.parse_args()
    size, data = 8 * GiB, int(args.data_gib * GiB)
    work = ROOT / "bench" / "work"
    work.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="xen-bench-sim-"))
    sim = xapi.start(f"127.0.0.1:{free_port()}", lab_vm=False, state=state)
    results = Results(data)
    record = results.record

    try:
        env = {**ENV, **sim.env()}
        os.environ.update(sim.env())  # the in-process incrementals read the CA file from the settings
        vm = xapi.create_vm(sim, VM, size, running=True)
        lab = Lab(sim, work)
        disk = xapi.disks(sim, vm)["xvda"]
        write_segments(xapi.image(sim, disk), "qcow2", size, [Segment(0, data, "random", "xen-bench")])
        repo, copy = work / "xen-repo", work / "xen-nbdcopy.raw"

        def full_setup() -> None:
            rb.rm(repo)
            rb.sh(VMKEEP, "repo", "init", str(repo), "--encrypt", env=env)

        trials = {
            "nbdcopy export → raw file + sync": reference(lab, lambda uri: (rb.sh("nbdcopy", uri, str(copy)),
                                                                            rb.sh("sync")), copy),
            "nbdcopy export → null:": reference(lab, lambda uri: rb.sh("nbdcopy", uri, "null:")),
            # the last round's full is what the incrementals below build on: it is kept
            "vmkeep full backup, encrypted, local disk": Trial(
                lambda: rb.sh(VMKEEP, "backup", VM, "--host", sim.address, "--repo", str(repo), "--full", "--json",
                           env=env), full_setup),
        }
        times = rb.rounds(args.repeat, trials)
        for key, runs in times.items():
            record(key, statistics.median(runs), runs)
        n = args.incremental_repeat
        incrementals(lab, env, repo, disk, n, 0, record)
        proxy_incrementals(lab, repo, disk, n, n, record)
        lab.close()
        rb.rm(repo)
    finally:
        xapi.stop(state)
        shutil.rmtree(state, ignore_errors=True)

    def secs(key: str) -> float:
        return float(results[key]["seconds"])  # type: ignore[arg-type]

    full = secs("vmkeep full backup, encrypted, local disk")
    ratios = {
        "disk-bound: full backup / (nbdcopy to file + sync)": (
            round(secs("nbdcopy export → raw file + sync") / full, 3), 0.8, "≥"),
        "read-bound: full backup / nbdcopy to null (no target)": (
            round(secs("nbdcopy export → null:") / full, 3), 0.0, "info"),
        "incremental after 1 MiB / full, whole command": (
            round(secs("vmkeep incremental after a 1 MiB write") / full, 4), 0.03, "<"),
        "incremental after 1 MiB / full, in a running proxy": (
            round(secs("  the same, in a running proxy process") / full, 4), 0.03, "<"),
        "incremental after 1 MiB / full, engine time": (
            round(secs("  the same, engine time only") / full, 4), 0.03, "<"),
    }
    publish("xen", (MARK_BEGIN, MARK_END), "XenServer / XCP-ng backup",
            f"VM disk: 8 GiB holding {data / GiB:.1f} GiB of incompressible data, in the lab's XAPI simulator (NBD "
            f"over TLS); {os.cpu_count()} CPUs; median of {args.repeat} runs, of {n} for the incrementals (written "
            "by `bench/xen_bench.py`).",
            {"disk_bytes": size, "data_bytes": data, "repeat": args.repeat, "cpus": os.cpu_count()},
            results, ratios)

if __name__ == "__main__":
    main()
