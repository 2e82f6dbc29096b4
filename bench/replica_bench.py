"""VM replica: the first sync of a replica against an update after 1 MiB changed, in one run.

A shut-off VM with an 8 GiB qcow2 disk holding --data-gib of incompressible data is backed up
into a fresh encrypted repository (point A); 1 MiB is written into the disk and it is backed up
again (point B). From the lab's proxy network namespace (so the libvirt host is another machine:
disks go through libvirt volume uploads over TLS), measured:

* `vmkeep replicate --point A` onto an empty host (the replica made, every non-zero slot
  written): the first sync, median of --repeat rounds (the replica removed between rounds);
* `vmkeep replicate --point B` / `--point A` in turn (each writes the one changed slot): the
  update, as a whole command and its engine time, median of --update-repeat runs.

Target (issue 27): the update after 1 MiB changed < 3 % of the first sync.
Writes bench/results-replica.json and its table in docs/performance.md.

    flock /tmp/vmkeep-heavy.lock .venv/bin/python -m bench.replica_bench [--data-gib 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import libvirt

from bench.repo_bench import ENV, VMKEEP, GiB, Results, publish
from vmkeep.lab.images import Segment, make_image
from vmkeep.lab.netns import create_proxy_network, destroy_proxy_network
from vmkeep.lab.tls import PROXY_NETWORK_GATEWAY

VM = "vmkeep-replica-bench"
REPLICA = f"{VM}-replica"
MiB = 1 << 20
SIZE = 8 * GiB
WORK = Path("/var/lib/libvirt/images") / VM
REMOTE = f"qemu+tls://{PROXY_NETWORK_GATEWAY}/system"
MARK_BEGIN, MARK_END = "<!-- replica-bench:begin -->", "<!-- replica-bench:end -->"


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr}{proc.stdout[-2000:]}")
    return proc


def remove(conn: libvirt.virConnect, name: str) -> None:
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    if dom.isActive():
        dom.destroy()
    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)


def define_vm(conn: libvirt.virConnect, image: Path) -> None:
    conn.defineXML(
        f"<domain type='qemu'><name>{VM}</name><memory unit='MiB'>48</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{image}'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-gib", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--update-repeat", type=int, default=9)
    args = parser.parse_args()
    data = int(args.data_gib * GiB)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # "no such domain" is expected, not news
    conn = libvirt.open("qemu:///system")
    remove(conn, REPLICA)
    remove(conn, VM)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    proxy = create_proxy_network()
    try:
        image = make_image(WORK / "vda.qcow2", SIZE, [Segment(0, data, "random", "replica-bench")])
        define_vm(conn, image)
        repo = str(WORK / "repo")
        run(VMKEEP, "repo", "init", repo, "--encrypt")
        point_a = json.loads(run(VMKEEP, "backup", VM, "--repo", repo, "--json").stdout)["vms"][0]["point"]
        run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {3 * GiB + 4 * MiB} 1M", str(image))
        point_b = json.loads(run(VMKEEP, "backup", VM, "--repo", repo, "--json").stdout)["vms"][0]["point"]
        storage = WORK / "replica"

        def replicate(point: str, *extra: str) -> tuple[float, dict[str, object]]:
            started = time.monotonic()
            out = run(*proxy, VMKEEP, "replicate", VM, "--to", REMOTE, "--repo", repo, "--point", point,
                      "--json", *extra).stdout
            return time.monotonic() - started, json.loads(out)

        results = Results(data)
        firsts: list[float] = []
        for _ in range(args.repeat):
            remove(conn, REPLICA)
            shutil.rmtree(storage, ignore_errors=True)
            run("sync")
            seconds, report = replicate(point_a, "--storage", str(storage), "--network", "none")
            assert report["mode"] == "full" and report["bytes_written"] == data, report
            firsts.append(seconds)
        results.record("first replica sync (whole command)", statistics.median(firsts), firsts)
        updates: list[float] = []
        engine: list[float] = []
        for i in range(args.update_repeat):
            seconds, report = replicate(point_b if i % 2 == 0 else point_a)
            assert report["mode"] == "incremental" and report["bytes_written"] == 4 * MiB, report
            updates.append(seconds)
            engine.append(float(report["seconds"]))  # type: ignore[arg-type]
        results.record("replica update after 1 MiB changed (whole command)", statistics.median(updates), updates,
                       nbytes=4 * MiB)
        results.record("  the same, engine time only", statistics.median(engine), engine, nbytes=4 * MiB)
        first = statistics.median(firsts)
        ratios = {"update / first sync, whole command": (round(statistics.median(updates) / first, 4), 0.03, "<"),
                  "update / first sync, engine time": (round(statistics.median(engine) / first, 4), 0.03, "<")}
        publish("replica", (MARK_BEGIN, MARK_END), "VM replicas",
                f"Source VM disk: 8 GiB qcow2 holding {data / GiB:.1f} GiB of incompressible data; replica on the "
                "lab's libvirtd reached over qemu+tls:// from the proxy network namespace (volume uploads); "
                f"{os.cpu_count()} CPUs; median of {args.repeat} first syncs and {args.update_repeat} updates "
                "(written by `bench/replica_bench.py`). An update writes the one 4 MiB slot that changed.",
                {"disk_bytes": SIZE, "data_bytes": data, "repeat": args.repeat, "cpus": os.cpu_count()},
                results, ratios)
    finally:
        remove(conn, REPLICA)
        remove(conn, VM)
        conn.close()
        destroy_proxy_network()
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
