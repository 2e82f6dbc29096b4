"""vmkeep against its peers and the hardware limit, side by side in one run (docs/performance.md):

1. full backup of a running VM: vmkeep (compressed; compressed + encrypted, on the disk and on
   tmpfs) vs virtnbdbackup (plain, --compress) vs the read limit (`nbdcopy` to `null:`) and the
   read + write limit (`nbdcopy` to a raw file, then `sync`);
2. incrementals after the guest rewrote 1 %, 5 % and 25 % of its disk: vmkeep vs virtnbdbackup;
3. dedup over VMs cloned from one template, each with 2 % of its own writes: stored bytes for
   vmkeep vs virtnbdbackup vs borg with its fixed chunker over the images;
4. restore of the full point: vmkeep vs virtnbdrestore vs the write limit (`qemu-img convert`);
5. a full and thirty daily incrementals (5 % rewritten each day), then restore of the latest:
   vmkeep (one full index) vs virtnbdrestore (chain replay).

Each figure is the median of --repeat runs into a fresh target, with wall seconds, CPU seconds
and peak memory. ``--only`` runs some scenarios and merges them into the last results.
``--profile`` records a py-spy profile of vmkeep where a target is missed.

Writes bench/results.json, bench/peers-*.png and its section of docs/performance.md.

    .venv/bin/python -m bench.peers [--quick] [--only full,restore] [--disk-gib 4] [--repeat 3] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import libvirt

from bench.peers_lab import SHM, VM, WORK, cleanup_vms
from bench.peers_report import charts, markdown
from bench.peers_scenarios import SCENARIOS, Context
from bench.repo_bench import ROOT, GiB, write_section

RESULTS = ROOT / "bench" / "results.json"
MARK_BEGIN, MARK_END = "<!-- peers-bench:begin -->", "<!-- peers-bench:end -->"


def selected(only: str | None) -> list[str]:
    names = list(SCENARIOS) if not only else [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario {', '.join(unknown)}: choose from {', '.join(SCENARIOS)}")
    if "restore" in names and "full" not in names:
        names.insert(names.index("restore"), "full")  # restore reads the points the full backups made
    return [n for n in SCENARIOS if n in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 GiB disk, one run each, 5 days, 3 clones")
    ap.add_argument("--only", help=f"comma-separated scenarios out of {','.join(SCENARIOS)}")
    ap.add_argument("--disk-gib", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="py-spy vmkeep where a target is missed")
    args = ap.parse_args()
    names = selected(args.only)
    ctx = Context(size=(1 if args.quick else args.disk_gib) * GiB, repeat=1 if args.quick else args.repeat,
                  days=5 if args.quick else 30, clones=3 if args.quick else 10,
                  profile_dir=ROOT / "bench" / "profiles" if args.profile else None)
    shutil.rmtree(WORK, ignore_errors=True)
    shutil.rmtree(SHM, ignore_errors=True)
    WORK.mkdir(parents=True)
    SHM.mkdir(parents=True)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # a missing VM is fine here
    doc = json.loads(RESULTS.read_text()) if args.only and RESULTS.exists() else {"scenarios": {}}
    if doc.get("disk_gib") not in (None, ctx.size / GiB) or doc.get("quick", False) != args.quick:
        doc = {"scenarios": {}}  # figures of another disk size do not sit in one table
    doc.update(disk_gib=ctx.size / GiB, repeat=ctx.repeat, cpus=os.cpu_count(), quick=args.quick)
    try:
        for name in names:
            print(f"bench: scenario {name}", flush=True)
            doc["scenarios"][name] = SCENARIOS[name](ctx)
            RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    finally:
        cleanup_vms(VM)
        shutil.rmtree(WORK, ignore_errors=True)
        shutil.rmtree(SHM, ignore_errors=True)
    doc["scenarios"] = {n: doc["scenarios"][n] for n in SCENARIOS if n in doc["scenarios"]}
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    charts(doc, ROOT / "bench")
    write_section(MARK_BEGIN, MARK_END, markdown(doc), "Against the peers")
    for s in doc["scenarios"].values():
        for t in s["targets"]:
            print(f"{'met ' if t['met'] else 'MISS'} {t['name']}: {t['measured']:.2f} ({t['target']})")


if __name__ == "__main__":
    main()
