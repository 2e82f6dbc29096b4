"""Repository throughput against the hardware limits, measured side by side in one run.

Scenarios (each the median of --repeat rounds, every tool run once per round in turn so that the
machine's drift hits a tool and its reference alike; every vmkeep run into a fresh repository):

* disk-bound: `vmkeep disk backup` of an incompressible qcow2 into an encrypted repository on the
  local disk vs `nbdcopy` of the same qemu-nbd export to a raw file on the same filesystem + sync;
* CPU-bound: the same backup into repositories on tmpfs (/dev/shm), encrypted and not, vs
  `nbdcopy` of the export to `null:`;
* unchanged incremental: `--since latest --changed <empty>` vs the full backup;
* restore: `vmkeep disk restore --format raw` + sync vs `qemu-img convert -O raw` + sync;
* restore into qcow2 (what a VM restore writes) of an image three quarters full (2/4 random,
  1/4 text): `vmkeep disk restore --format qcow2` + sync vs `qemu-img convert -O qcow2` + sync.

Writes bench/results-repo.json and the tables of docs/performance.md between its markers.

    .venv/bin/python -m bench.repo_bench [--size-gib 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmkeep.lab.images import Segment, make_image
from vmkeep.transport.qemu_nbd import probe_image, serve_image

ROOT = Path(__file__).resolve().parent.parent
VMKEEP = str(Path(sys.executable).with_name("vmkeep"))
GiB = 1 << 30
# The commands measured run as on an administrator's machine: bytecode is cached (a caller's
# PYTHONDONTWRITEBYTECODE would make every vmkeep start compile what changed since set-up).
BASE_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV = {**BASE_ENV, "VMKEEP_PASSPHRASE": "bench-passphrase"}


PLAIN_ENV = {k: v for k, v in ENV.items() if k != "VMKEEP_PASSPHRASE"}  # a plain repository refuses one


def sh(*cmd: str, env: dict[str, str] = ENV) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def touch_free_memory(cap: int = 12 * GiB) -> None:
    """Write once to (nearly) all free memory, in a child process that then exits.

    The lab machine is a virtual machine whose host backs guest memory lazily and takes freed
    pages back (virtio-balloon free page reporting): the first write to such a page costs a host
    fault, which made writes into the page cache two to three times slower at random. Every
    measured run, of every tool alike, starts after this, so each finds its memory backed.
    """
    free = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemFree:"))
    size = min(cap, free - GiB)
    if size > 0:
        subprocess.run([sys.executable, "-c", f"b = b'\\x01' * {size}"], check=True)


@dataclass
class Trial:
    """One contender of a round: made ready, timed, cleaned up (the last two outside the timing)."""

    run: Callable[[], object]
    setup: Callable[[], None] = lambda: None
    cleanup: Callable[[], None] = lambda: None
    # Touch the free memory first (see touch_free_memory): right for runs that fill the page cache;
    # a run that writes a few MiB would only find the program's own files evicted by it.
    touch_memory: bool = True


def rounds(repeat: int, trials: dict[str, Trial]) -> dict[str, list[float]]:
    """Seconds of each trial over ``repeat`` rounds, each round running every trial once in turn.

    This shared machine's device and CPU speeds drift by tens of percent within minutes; with
    runs grouped by tool, a tool and its reference would each catch a different phase of that
    drift, with runs taken in turn they catch the same one.
    """
    times: dict[str, list[float]] = {name: [] for name in trials}
    for _ in range(repeat):
        for name, trial in trials.items():
            trial.setup()
            if trial.touch_memory:
                touch_free_memory()
            try:
                times[name].append(timed(trial.run))
            finally:
                trial.cleanup()
    return times


def median_of(repeat: int, setup: Callable[[], None], run: Callable[[], object],
              cleanup: Callable[[], None], touch_memory: bool = True) -> tuple[float, list[float]]:
    times = rounds(repeat, {"": Trial(run, setup, cleanup, touch_memory)})[""]
    return statistics.median(times), times


def rm(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--workers", type=int, default=6)
    args = ap.parse_args()
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm/vmkeep-bench")
    shm.mkdir(exist_ok=True)
    size = int(args.size_gib * GiB)
    image = work / "incompressible.qcow2"
    if not image.exists() or probe_image(image).virtual_size != size:
        rm(image)
        print(f"making a {size / GiB:.1f} GiB qcow2 of incompressible data …", flush=True)
        make_image(image, size, [Segment(0, size, "random", "bench")])
    sh("sync")
    results: dict[str, dict[str, object]] = {}
    w = str(args.workers)

    def record(key: str, seconds: float, runs: list[float], nbytes: int = size) -> None:
        results[key] = {"seconds": round(seconds, 3), "runs": [round(r, 3) for r in runs],
                        "throughput_gbps": round(nbytes / seconds / 1e9, 3)}
        print(f"{key:34s} {seconds:7.2f} s  {nbytes / seconds / 1e9:6.2f} GB/s", flush=True)

    info = probe_image(image)
    copy = work / "nbdcopy.raw"
    disk_repo, shm_repo_enc, shm_repo_plain = work / "repo", shm / "repo-enc", shm / "repo-plain"

    def backup_into(repo: Path, encrypt: bool, keep: bool = False) -> Trial:
        def setup() -> None:
            rm(repo)
            sh(VMKEEP, "repo", "init", str(repo), *(["--encrypt"] if encrypt else []),
               env=ENV if encrypt else PLAIN_ENV)

        return Trial(lambda: sh(VMKEEP, "disk", "backup", str(image), "--repo", str(repo), "--name", "bench",
                                "--workers", w, "--json", env=ENV if encrypt else PLAIN_ENV), setup,
                     (lambda: None) if keep else (lambda: rm(repo)))

    with serve_image(info, connections=8) as uri:
        backups = rounds(args.repeat, {
            "nbdcopy to raw file + sync": Trial(lambda: (sh("nbdcopy", uri, str(copy)), sh("sync")),
                                                lambda: rm(copy), lambda: rm(copy)),
            "nbdcopy to null:": Trial(lambda: sh("nbdcopy", uri, "null:")),
            # the last round's repository stays for the incremental and the restore below
            "vmkeep backup, encrypted, local disk": backup_into(disk_repo, True, keep=True),
            "vmkeep backup, encrypted, tmpfs": backup_into(shm_repo_enc, True),
            "vmkeep backup, plain, tmpfs": backup_into(shm_repo_plain, False),
        })
    for key, runs in backups.items():
        record(key, statistics.median(runs), runs)

    empty = work / "no-changes.txt"
    empty.write_text("")
    engine_times: list[float] = []

    def unchanged_incremental() -> None:
        out = sh(VMKEEP, "disk", "backup", str(image), "--repo", str(disk_repo), "--name", "bench",
                 "--since", "latest", "--changed", str(empty), "--json")
        engine_times.append(float(json.loads(out.stdout)["duration"]))

    t, runs = median_of(args.repeat, lambda: None, unchanged_incremental, lambda: None)
    record("vmkeep incremental, no changes", t, runs)
    record("  the same, engine time only", statistics.median(engine_times), engine_times)

    def restores_against_convert(source: Path, repo: Path, name: str, fmt: str, suffix: str = "") -> None:
        """`qemu-img convert -O fmt` of the source and `vmkeep disk restore --format fmt` of its
        point, each + sync, in rounds; recorded under their keys (+ ``suffix``)."""
        out = work / f"restored.{fmt}"
        runs = rounds(args.repeat, {
            f"qemu-img convert to {fmt} + sync{suffix}": Trial(
                lambda: (sh("qemu-img", "convert", "-O", fmt, str(source), str(out)), sh("sync")),
                lambda: rm(out), lambda: rm(out)),
            f"vmkeep restore to {fmt} + sync{suffix}": Trial(
                lambda: (sh(VMKEEP, "disk", "restore", name, "--repo", str(repo), "--output", str(out),
                            "--format", fmt, "--workers", w, "--json"), sh("sync")),
                lambda: rm(out), lambda: rm(out)),
        })
        for key, times in runs.items():
            record(key, statistics.median(times), times)

    restores_against_convert(image, disk_repo, "bench", "raw")
    rm(disk_repo, shm)

    # the format a VM restore writes: an image three quarters full (half random, a quarter text)
    mixed = work / "mixed.qcow2"
    if not mixed.exists() or probe_image(mixed).virtual_size != size:
        rm(mixed)
        make_image(mixed, size, [Segment(0, size // 2, "random", "bench"),
                                 Segment(size // 2, size // 4, "text", "bench")])
    mixed_repo = work / "repo-mixed"
    rm(mixed_repo)
    sh(VMKEEP, "repo", "init", str(mixed_repo), "--encrypt")
    sh(VMKEEP, "disk", "backup", str(mixed), "--repo", str(mixed_repo), "--name", "mixed", "--workers", w)
    sh("sync")
    restores_against_convert(mixed, mixed_repo, "mixed", "qcow2", ", 3/4 full")
    rm(mixed_repo)

    def ratio(a: str, b: str) -> float:
        return round(float(results[b]["seconds"]) / float(results[a]["seconds"]), 3)  # type: ignore[arg-type]

    ratios = {
        "disk-bound: encrypted backup / (nbdcopy to file + sync)": (
            ratio("vmkeep backup, encrypted, local disk", "nbdcopy to raw file + sync"), 0.8),
        "CPU-bound: encrypted backup on tmpfs / nbdcopy to null": (
            ratio("vmkeep backup, encrypted, tmpfs", "nbdcopy to null:"), 0.5),
        "CPU-bound: plain backup on tmpfs / nbdcopy to null": (
            ratio("vmkeep backup, plain, tmpfs", "nbdcopy to null:"), 0.6),
        "restore / qemu-img convert": (ratio("vmkeep restore to raw + sync", "qemu-img convert to raw + sync"), 0.6),
        "restore to qcow2 / qemu-img convert -O qcow2, 3/4 full": (
            ratio("vmkeep restore to qcow2 + sync, 3/4 full", "qemu-img convert to qcow2 + sync, 3/4 full"), 0.7),
    }
    full = float(results["vmkeep backup, encrypted, local disk"]["seconds"])  # type: ignore[arg-type]
    incr_share = round(float(results["vmkeep incremental, no changes"]["seconds"]) / full, 4)  # type: ignore[arg-type]
    engine_share = round(float(results["  the same, engine time only"]["seconds"]) / full, 4)  # type: ignore[arg-type]
    doc = {"size_bytes": size, "repeat": args.repeat, "workers": args.workers, "cpus": os.cpu_count(),
           "results": results, "ratios": {k: {"ratio": r, "target": t} for k, (r, t) in ratios.items()},
           "unchanged_incremental_share_of_full": {"share": incr_share, "engine_share": engine_share,
                                                   "target_below": 0.02}}
    (ROOT / "bench" / "results-repo.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_markdown(doc)
    print(json.dumps(doc["ratios"], indent=1), "\nunchanged incremental / full:", incr_share)


MARK_BEGIN, MARK_END = "<!-- repo-bench:begin -->", "<!-- repo-bench:end -->"


def write_section(begin: str, end: str, lines: list[str], heading: str) -> None:
    """Replace the text between ``begin`` and ``end`` in docs/performance.md (added under
    ``heading`` when the markers are not there yet)."""
    path = ROOT / "docs" / "performance.md"
    text = path.read_text() if path.exists() else "# Performance\n"
    if begin not in text:
        text += f"\n## {heading}\n\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(head + "\n".join([begin, *lines, end]) + tail)


class Results(dict[str, dict[str, object]]):
    """A VM benchmark's runs by name: median seconds, each round's seconds, throughput over
    ``nbytes`` (the data moved; a run that moves less names its own), printed as they come."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes = nbytes

    def record(self, key: str, seconds: float, runs: list[float], nbytes: int | None = None) -> None:
        moved = self.nbytes if nbytes is None else nbytes
        self[key] = {"seconds": round(seconds, 3), "runs": [round(r, 3) for r in runs],
                     "throughput_gbps": round(moved / seconds / 1e9, 3)}
        print(f"{key:44s} {seconds:7.2f} s  {moved / seconds / 1e9:6.2f} GB/s", flush=True)


def publish(name: str, marks: tuple[str, str], heading: str, intro: str, doc: dict[str, object],
            results: dict[str, dict[str, object]], ratios: dict[str, tuple[float, float, str]]) -> None:
    """Write a VM benchmark's results: bench/results-NAME.json, and in docs/performance.md its two
    tables under ``intro`` — each run's seconds and GB/s, then each ratio against its target
    (``sense``: "≥", "<", or "info" for a ratio without a target)."""
    doc = {**doc, "results": results,
           "ratios": {k: {"ratio": r, "target": t, "sense": c} for k, (r, t, c) in ratios.items()}}
    (ROOT / "bench" / f"results-{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["", intro, "", "| run | seconds | GB/s |", "|---|---:|---:|"]
    lines += [f"| {k} | {r['seconds']:.2f} | {r['throughput_gbps']:.2f} |" for k, r in results.items()]
    lines += ["", "| ratio | measured | target | met |", "|---|---:|---:|---|"]
    for k, (r, t, c) in ratios.items():
        if c == "info":
            lines.append(f"| {k} | {r:.3f} | — | — |")
            continue
        met = r >= t if c == "≥" else r < t
        lines.append(f"| {k} | {r:.3f} | {c} {t} | {'yes' if met else 'no'} |")
    write_section(marks[0], marks[1], [*lines, ""], heading)
    print(json.dumps(doc["ratios"], indent=1))


def write_markdown(doc: dict) -> None:
    lines = ["",
             f"Image: {doc['size_bytes'] / GiB:.1f} GiB qcow2 of incompressible data (the qcow2 restores: one "
             "three quarters full, half random and a quarter text); "
             f"{doc['cpus']} CPUs; "
             f"{doc['workers']} vmkeep workers; median of {doc['repeat']} runs (written by `bench/repo_bench.py`).", "",
             "| run | seconds | GB/s |", "|---|---:|---:|"]
    for key, r in doc["results"].items():
        lines.append(f"| {key} | {r['seconds']:.2f} | {r['throughput_gbps']:.2f} |")
    lines += ["", "| ratio | measured | target | met |", "|---|---:|---:|---|"]
    for key, r in doc["ratios"].items():
        lines.append(f"| {key} | {r['ratio']:.2f} | ≥ {r['target']} | {'yes' if r['ratio'] >= r['target'] else 'no'} |")
    for label, key in (("unchanged incremental / full, whole command", "share"),
                       ("unchanged incremental / full, engine time", "engine_share")):
        share = doc["unchanged_incremental_share_of_full"][key]
        lines.append(f"| {label} | {share:.3f} | < 0.02 | {'yes' if share < 0.02 else 'no'} |")
    lines.append("")
    write_section(MARK_BEGIN, MARK_END, lines, "Repository: backup and restore of a disk image")


if __name__ == "__main__":
    main()
