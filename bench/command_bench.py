"""What a `vmkeep` command costs before its work starts, and how that weighs on an incremental.

An incremental after a small guest write does little work, so its whole-command time is mostly
the command's start: the interpreter and vmkeep's modules, and, for a passphrase-protected
repository, scrypt (deliberately slow; it runs on the second core while the modules load). This
bench separates those parts in one run, on the same VM as bench/vm_bench.py (8 GiB qcow2 disk
holding --data-gib of incompressible data), each the median of --repeat runs:

* the interpreter alone (`python -c pass`) and scrypt alone, with the repository's parameters;
* `vmkeep points` on a passphrase repository and on a key-file repository (same data);
* the san full backup into a new local repository (the denominator of the ratios of both
  transports: usually the faster full, so the stricter ratio), twice into a passphrase repository and
  twice into a key-file one;
* per transport, after a 1 MiB guest write, `vmkeep backup` (incremental) into the passphrase
  repository, then into the key-file repository (each chain starts from its own full: libvirt
  keeps one vmkeep checkpoint per VM, so the two repositories cannot be interleaved).

Writes bench/results-command.json and its table in docs/performance.md.

    .venv/bin/python -m bench.command_bench [--data-gib 4] [--repeat 9]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from bench.repo_bench import ROOT, VMKEEP, GiB, median_of, rm, sh, touch_free_memory, write_section
from bench.vm_bench import IMAGES, TRANSPORTS, VM, define_vm, destroy_vm, incrementals
from vmkeep.lab.images import Segment, make_image
from vmkeep.repository import kdf

MARK_BEGIN, MARK_END = "<!-- command-bench:begin -->", "<!-- command-bench:end -->"
PASSPHRASE_INCREMENTAL = "incremental after a 1 MiB write, passphrase repository"
KEY_FILE_INCREMENTAL = "incremental after a 1 MiB write, key-file repository"
FULL = "san: full backup, local disk (passphrase, key file, passphrase, key file)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-gib", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    n = args.repeat
    work = ROOT / "bench" / "work"
    work.mkdir(parents=True, exist_ok=True)
    passphrase_repo, key_repo, key_file = work / "cmd-pass-repo", work / "cmd-key-repo", work / "cmd-repo.key"
    key_args = ("--key-file", str(key_file))
    destroy_vm()
    shutil.rmtree(IMAGES, ignore_errors=True)
    IMAGES.mkdir(parents=True)
    data = int(args.data_gib * GiB)
    define_vm(make_image(IMAGES / "vda.qcow2", 8 * GiB, [Segment(0, data, "random", "vm-bench")]))
    results: dict[str, dict[str, object]] = {}

    def record(key: str, seconds: float, runs: list[float], nbytes: int = 0) -> None:
        results[key] = {"seconds": round(seconds, 3), "runs": [round(r, 3) for r in runs]}
        print(f"{key:64s} {seconds:7.3f} s", flush=True)

    def nothing() -> None:
        pass

    try:
        fulls = [_fresh_full(passphrase_repo, ()), _fresh_full(key_repo, key_args, key_file)]
        encryption = json.loads((passphrase_repo / "config.json").read_bytes())["encryption"]
        salt, *cost = kdf.parameters(encryption)

        def scrypt() -> None:
            hashlib.scrypt(b"bench-passphrase", salt=salt, n=cost[0], r=cost[1], p=cost[2],
                           maxmem=kdf.SCRYPT_MAXMEM, dklen=32)

        for key, run in (
            ("interpreter alone (python -c pass)", lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)),
            ("scrypt alone, the repository's parameters", scrypt),
        ):
            t, runs = median_of(n, nothing, run, nothing, touch_memory=False)
            record(key, t, runs)

        for repo, repo_args, label in (
            (passphrase_repo, (), "vmkeep points, passphrase repository"),
            (key_repo, key_args, "vmkeep points, key-file repository"),
        ):
            t, runs = median_of(n, nothing, partial(sh, VMKEEP, "points", "--repo", str(repo), *repo_args),
                                nothing, touch_memory=False)
            record(label, t, runs)
        fulls.append(_fresh_full(passphrase_repo, ()))
        for i, transport in enumerate(TRANSPORTS):
            incrementals(transport, passphrase_repo, n, 100 + i * n, record, label=PASSPHRASE_INCREMENTAL,
                         engine_label="the same, engine time only (passphrase)")
        fulls.append(_fresh_full(key_repo, key_args, key_file))
        record(FULL, statistics.median(fulls), fulls)
        for i, transport in enumerate(TRANSPORTS):
            incrementals(transport, key_repo, n, 200 + i * n, record, repo_args=key_args, label=KEY_FILE_INCREMENTAL,
                         engine_label="the same, engine time only (key file)")
    finally:
        destroy_vm()
        shutil.rmtree(IMAGES, ignore_errors=True)
        rm(passphrase_repo, key_repo, key_file)

    def secs(key: str) -> float:
        return float(results[key]["seconds"])  # type: ignore[arg-type]

    full = secs(FULL)
    ratios: dict[str, tuple[float, float, str]] = {}
    for tr in TRANSPORTS:
        ratios[f"{tr}, incremental / full, whole command, passphrase repository"] = (
            round(secs(f"{tr}: {PASSPHRASE_INCREMENTAL}") / full, 4), 0.03, "<")
        ratios[f"{tr}, incremental / full, whole command, key-file repository"] = (
            round(secs(f"{tr}: {KEY_FILE_INCREMENTAL}") / full, 4), 0.03, "<")
    doc = {"disk_bytes": 8 * GiB, "data_bytes": data, "repeat": n, "cpus": os.cpu_count(), "results": results,
           "ratios": {k: {"ratio": r, "target": t, "sense": c} for k, (r, t, c) in ratios.items()}}
    (ROOT / "bench" / "results-command.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["", f"Same VM as above (8 GiB disk, {data / GiB:.1f} GiB of data); median of {n} runs, of 4 for the "
             "full (written by `bench/command_bench.py`).", "", "| run | seconds |", "|---|---:|"]
    lines += [f"| {k} | {r['seconds']:.3f} |" for k, r in results.items()]
    lines += ["", "| ratio | measured | target | met |", "|---|---:|---:|---|"]
    lines += [f"| {k} | {r:.4f} | {c} {t} | {'yes' if r < t else 'no'} |" for k, (r, t, c) in ratios.items()]
    lines.append("")
    write_section(MARK_BEGIN, MARK_END, lines, "What a command costs to start")
    print(json.dumps(doc["ratios"], indent=1))


def _fresh_full(repo: Path, repo_args: tuple[str, ...], key_file: Path | None = None) -> float:
    """Seconds of one full backup into ``repo``, created anew (with a new key file, if any) as
    bench/vm_bench.py's fulls are, so that every chunk is stored."""
    rm(repo, *([key_file] if key_file else []))
    sh(VMKEEP, "repo", "init", str(repo), "--encrypt", *repo_args)
    touch_free_memory()  # as before each of bench/vm_bench.py's runs
    t = time.perf_counter()
    out = json.loads(sh(VMKEEP, "backup", VM, "--repo", str(repo), *repo_args, "--full", "--transport", "san",
                         "--json").stdout)["vms"][0]
    seconds = time.perf_counter() - t
    assert out["mode"] == "full", out
    return seconds


if __name__ == "__main__":
    main()
