"""vmkeep against its peers and the hardware limit, side by side in one run (issue 7, scenarios 1,
4 and 5 so far): full backup of a running VM, restore of that full point, and restore of the
latest of a month of daily incrementals.

The VM runs under libvirt with no guest OS (QEMU owns the disk and serves the pull-mode backup
export). Its disk: half incompressible, a quarter text-like, a quarter zero. Tools, each the
median of --repeat runs into a fresh target, with wall seconds, CPU seconds (user + system of the
tool and its children) and peak memory (largest resident set among them):

* full backup — vmkeep (compressed; compressed + encrypted), virtnbdbackup (`-l copy`, plain and
  `--compress`), and the limits: `nbdcopy` from the same export to `null:` (read) and to a raw file
  then `sync` (read + write);
* restore of the full point to a raw file — vmkeep, virtnbdrestore, and the write limit
  (`qemu-img convert` of the source image to a raw file, then `sync`);
* a full and 30 daily incrementals (`--quick`: 5), each after the VM rewrote 5 % of its disk —
  vmkeep (encrypted) and virtnbdbackup (`-l full`, then `-l inc`, compressed) — then restore of
  the latest: vmkeep reads one full index, virtnbdrestore replays the chain.

Writes bench/results-peers.json, bench/peers-backup.png, and its table in docs/performance.md.

    .venv/bin/python -m bench.peers [--quick] [--disk-gib 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import libvirt

from bench.repo_bench import ROOT, VMKEEP, GiB, write_section
from bench.vm_bench import define_vm, destroy_vm
from vmkeep.lab.images import Segment, make_image

VM = "vmkeep-peers"
WORK = Path("/var/lib/vmkeep-bench-peers")
MARK_BEGIN, MARK_END = "<!-- peers-bench:begin -->", "<!-- peers-bench:end -->"
ENV = {**os.environ, "VMKEEP_PASSPHRASE": "bench-passphrase"}


def run_measured(cmd: list[str] | str, *, shell: bool = False) -> dict[str, float]:
    """Wall, CPU (user + system, the whole process tree) and peak RSS of one command."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, shell=shell, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed: {err[-800:]}")
    return {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def median_run(repeat: int, setup: Callable[[], None], cmd: Callable[[], list[str] | str],
               shell: bool = False) -> dict[str, float]:
    runs = []
    for _ in range(repeat):
        setup()
        runs.append(run_measured(cmd(), shell=shell))
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}


def fresh(*paths: Path) -> Callable[[], None]:
    def clean() -> None:
        for p in paths:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        subprocess.run(["sync"], check=True)
    return clean


def export_uri() -> tuple[str, Callable[[], None]]:
    """A pull-mode backup export of the VM's disk on a unix socket (what vmkeep's hotadd reads)."""
    sock = WORK / "export.sock"
    sock.unlink(missing_ok=True)
    conn = libvirt.open("qemu:///system")
    dom = conn.lookupByName(VM)
    dom.backupBegin(f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/><disks>"
                    f"<disk name='vda' backup='yes' type='file'><scratch file='{WORK / 'scratch.qcow2'}'/></disk>"
                    "</disks></domainbackup>", None, 0)

    def end() -> None:
        dom.abortJob()
        conn.close()
        (WORK / "scratch.qcow2").unlink(missing_ok=True)
    return f"nbd+unix:///vda?socket={sock}", end


def guest_rewrites(fraction: float, day: int, size: int) -> None:
    """The running VM rewrites ``fraction`` of its disk (4 MiB pieces spread over the data half and
    the zero quarter), through QEMU's own block layer as a guest's writes would land."""
    piece = 4 << 20
    slots = list(range(size // piece))
    rng = random.Random(day)
    for slot in rng.sample(slots, max(1, int(len(slots) * fraction))):
        subprocess.run(["virsh", "-c", "qemu:///system", "qemu-monitor-command", VM, "--hmp",
                        f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P {day % 250 + 1} '
                        f'{slot * piece} {piece}"'], check=True, capture_output=True)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop_checkpoints() -> None:
    """virtnbdbackup refuses to work beside another tool's checkpoints: each chain starts clean."""
    conn = libvirt.open("qemu:///system")
    try:
        for cp in conn.lookupByName(VM).listAllCheckpoints():
            cp.delete(0)
    finally:
        conn.close()


def fresh_vm(image: Path, size: int) -> None:
    """The VM on a disk made anew, the same bytes every time (half random, a quarter text)."""
    destroy_vm(VM)
    image.unlink(missing_ok=True)
    make_image(image, size, [Segment(0, size // 2, "random", "peers"), Segment(size // 2, size // 4, "text", "peers")])
    define_vm(image, VM)


def chain(image: Path, size: int, days: int) -> dict[str, dict[str, float]]:
    """Per tool, from the same disk and the same daily 5 % rewrites: a full, then ``days`` daily
    incrementals; then the restore of the latest point."""
    repo, vnb = WORK / "repo-chain", WORK / "vnb-chain"
    fresh(repo, vnb)()
    subprocess.run([VMKEEP, "repo", "init", str(repo), "--encrypt"], env=ENV, check=True, capture_output=True)
    tools = {
        "vmkeep": lambda day: [VMKEEP, "backup", VM, "--repo", str(repo), "--transport", "hotadd", "--json"],
        "virtnbdrestore": lambda day: ["virtnbdbackup", "-d", VM, "-l", "full" if day == 0 else "inc", "-o",
                                       str(vnb), "--noprogress", "--compress"],
    }
    totals: dict[str, float] = {}
    for tool, command in tools.items():
        fresh_vm(image, size)  # both chains start from the same bytes
        totals[tool] = 0.0
        for day in range(days + 1):
            if day:
                guest_rewrites(0.05, day, size)
            totals[tool] += run_measured(command(day))["seconds"]
    drop_checkpoints()
    out, vout = WORK / "chain-restored.raw", WORK / "chain-vnb-restore"
    result = {}
    fresh(out)()  # each restore starts with nothing else left to flush
    result["vmkeep"] = run_measured(f"{VMKEEP} restore {VM} --repo {repo} --disk vda --output {out} --format raw "
                                    "&& sync", shell=True)
    fresh(vout)()
    result["virtnbdrestore"] = run_measured(f"virtnbdrestore -i {vnb} -o {vout} --noprogress && sync", shell=True)
    for tool, target in (("vmkeep", repo), ("virtnbdrestore", vnb)):
        result[tool].update(backup_seconds_total=round(totals[tool], 1), stored_bytes=du(target))
    fresh(out, vout)()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 GiB disk, one run each")
    ap.add_argument("--disk-gib", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    size = (1 if args.quick else args.disk_gib) * GiB
    repeat = 1 if args.quick else args.repeat
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    image = WORK / "disk.qcow2"
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # a missing VM is fine here
    fresh_vm(image, size)
    repo, repo_enc, vnb, raw = WORK / "repo", WORK / "repo-enc", WORK / "virtnbdbackup", WORK / "copy.raw"
    backup: dict[str, dict[str, float]] = {}
    try:
        uri, end = export_uri()
        try:
            backup["read limit (nbdcopy → null:)"] = median_run(repeat, fresh(), lambda: ["nbdcopy", uri, "null:"])
            backup["read + write limit (nbdcopy → raw file, sync)"] = median_run(
                repeat, fresh(raw), lambda: f"nbdcopy '{uri}' {raw} && sync", shell=True)
        finally:
            end()
        for label, target, enc in (("vmkeep (compressed)", repo, []), ("vmkeep (compressed + encrypted)", repo_enc,
                                                                       ["--encrypt"])):
            def setup(target: Path = target, enc: list[str] = enc) -> None:
                fresh(target)()
                subprocess.run([VMKEEP, "repo", "init", str(target), *enc], env=ENV, check=True, capture_output=True)
            backup[label] = median_run(repeat, setup, lambda target=target: [  # type: ignore[misc]
                VMKEEP, "backup", VM, "--repo", str(target), "--full", "--transport", "hotadd", "--json"])
        for label, extra in (("virtnbdbackup (copy)", []), ("virtnbdbackup (copy, --compress)", ["--compress"])):
            backup[label] = median_run(repeat, fresh(vnb), lambda extra=extra: [  # type: ignore[misc]
                "virtnbdbackup", "-d", VM, "-l", "copy", "-o", str(vnb), "--noprogress", *extra])
        # restore the full point (the last backups of each tool are in place)
        restore: dict[str, dict[str, float]] = {}
        out = WORK / "restored.raw"
        restore["write limit (qemu-img convert → raw, sync)"] = median_run(
            repeat, fresh(out), lambda: f"qemu-img convert -U -O raw {image} {out} && sync", shell=True)
        restore["vmkeep"] = median_run(repeat, fresh(out), lambda: f"{VMKEEP} restore {VM} --repo {repo_enc} "
                                       f"--disk vda --output {out} --format raw && sync", shell=True)
        vout = WORK / "vnb-restore"
        restore["virtnbdrestore"] = median_run(repeat, fresh(vout), lambda: f"virtnbdrestore -i {vnb} -o {vout} "
                                               "--noprogress && sync", shell=True)
        fresh(out, vout, vnb, raw)()
        days = 5 if args.quick else 30
        latest = chain(image, size, days)
    finally:
        destroy_vm(VM)
    gb = size / 1e9
    for table in (backup, restore):
        for r in table.values():
            r["gb_s"] = round(gb / r["seconds"], 3)
    ratios = {
        "vmkeep encrypted / virtnbdbackup --compress": backup["vmkeep (compressed + encrypted)"]["gb_s"]
        / backup["virtnbdbackup (copy, --compress)"]["gb_s"],
        "vmkeep encrypted / read + write limit": backup["vmkeep (compressed + encrypted)"]["gb_s"]
        / backup["read + write limit (nbdcopy → raw file, sync)"]["gb_s"],
        "vmkeep restore / virtnbdrestore": restore["vmkeep"]["gb_s"] / restore["virtnbdrestore"]["gb_s"],
        f"restore of the {days}th incremental: virtnbdrestore seconds / vmkeep seconds":
        latest["virtnbdrestore"]["seconds"] / latest["vmkeep"]["seconds"],
    }
    doc = {"disk_gib": size / GiB, "repeat": repeat, "cpus": os.cpu_count(), "backup": backup, "restore": restore,
           "chain": {"days": days, "rewrite_per_day": 0.05, "tools": latest},
           "ratios": {k: round(v, 3) for k, v in ratios.items()}}
    (ROOT / "bench" / "results-peers.json").write_text(json.dumps(doc, indent=1) + "\n")
    chart(backup, restore, ROOT / "bench" / "peers-backup.png", size)
    lines = ["", f"{size / GiB:.0f} GiB disk of a running VM (half incompressible, a quarter text, a quarter zero); "
             f"median of {repeat}; {doc['cpus']} CPUs; written by `bench/peers.py`. CPU = user + system seconds "
             "of the tool and its children; memory = largest resident set.", "",
             "| full backup | seconds | GB/s | CPU s | peak MiB |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['seconds']:.2f} | {v['gb_s']:.2f} | {v['cpu_seconds']:.1f} | {v['peak_rss_mib']:.0f} |"
              for k, v in backup.items()]
    lines += ["", "| restore of the full point | seconds | GB/s | CPU s | peak MiB |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['seconds']:.2f} | {v['gb_s']:.2f} | {v['cpu_seconds']:.1f} | {v['peak_rss_mib']:.0f} |"
              for k, v in restore.items()]
    lines += ["", f"| a full + {days} daily incrementals (5 % rewritten each day), then restore of the latest | "
              "restore s | CPU s | peak MiB | all backups s | stored MiB |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['seconds']:.2f} | {v['cpu_seconds']:.1f} | {v['peak_rss_mib']:.0f} | "
              f"{v['backup_seconds_total']:.1f} | {v['stored_bytes'] / (1 << 20):.0f} |" for k, v in latest.items()]
    lines += ["", "| ratio | measured |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in doc["ratios"].items()]
    lines += ["", "![full backup and restore throughput](../bench/peers-backup.png)", ""]
    write_section(MARK_BEGIN, MARK_END, lines, "Against the peers: full backup and restore")
    print(json.dumps(doc, indent=1))


def chart(backup: dict[str, dict[str, float]], restore: dict[str, dict[str, float]], path: Path, size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(8, 6), gridspec_kw={"height_ratios": [len(backup), len(restore)]})
    for ax, (title, table) in zip(axes, (("full backup", backup), ("restore", restore)), strict=True):
        names = list(table)
        ax.barh(names, [table[n]["gb_s"] for n in names], color=["#888" if "limit" in n else "#2a6" if "vmkeep" in n
                                                                 else "#36c" for n in names])
        ax.set_title(f"{title}, {size / GiB:.0f} GiB disk")
        ax.set_xlabel("GB/s")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
