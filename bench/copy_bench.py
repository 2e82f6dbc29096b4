"""Backup copy (`vmkeep copy`) against copying the repository's files, in one run.

A local encrypted repository holds one point of a --size-gib disk of incompressible data (no
dedup, no compression to win). Measured, each the median of --repeat rounds (a round runs every
contender once, in turn, so that the machine's drift hits a tool and its reference alike):

* reference: `cp -a` of the source repository's directory to a new one on the same filesystem,
  then `sync`;
* `vmkeep copy` of the point into an empty local repository made by `repo init --like` (raw: the
  chunks travel as stored, each checked against its checksum), then `sync`;
* an unchanged second copy into that target (every point already there: nothing travels), as a
  whole command and its engine time; median of --second-repeat runs.

Targets (issue 27): copy ≥ 0.8× the reference; an unchanged second copy < 2 % of the first.
Writes bench/results-copy.json and its table in docs/performance.md.

    .venv/bin/python -m bench.copy_bench [--size-gib 4] [--repeat 3] [--second-repeat 9]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from bench import repo_bench as rb
from bench.repo_bench import ROOT, VMKEEP, GiB, Results, Trial, publish
from vmkeep.lab.images import Segment, make_image

MARK_BEGIN, MARK_END = "<!-- copy-bench:begin -->", "<!-- copy-bench:end -->"


def source_repository(work: Path, size: int) -> Path:
    """The source: an encrypted repository holding one point of ``size`` incompressible bytes
    (kept between runs; the image it was made from is not)."""
    repo = work / "copy-source"
    done = repo / "bench-size"
    if done.exists() and done.read_text() == str(size):
        return repo
    rb.rm(repo)
    image = work / "copy-source.qcow2"
    print(f"making a {size / GiB:.1f} GiB point of incompressible data …", flush=True)
    make_image(image, size, [Segment(0, size, "random", "copy-bench")])
    rb.sh(VMKEEP, "repo", "init", str(repo), "--encrypt")
    rb.sh(VMKEEP, "disk", "backup", str(image), "--repo", str(repo), "--name", "bench", "--json")
    rb.rm(image)
    done.write_text(str(size))  # outside chunks/, points/ …: the repository ignores it
    rb.sh("sync")
    return repo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--second-repeat", type=int, default=9)
    args = ap.parse_args()
    size = int(args.size_gib * GiB)
    work = ROOT / "bench" / "work"
    work.mkdir(parents=True, exist_ok=True)
    source = source_repository(work, size)
    stored = sum(p.stat().st_size for p in (source / "chunks").rglob("*") if p.is_file())
    files, target = work / "copy-cp", work / "copy-target"
    results = Results(stored)
    first_engine: list[float] = []

    def fresh_target() -> None:
        rb.rm(target)
        rb.sh(VMKEEP, "repo", "init", str(target), "--like", str(source))

    def copy() -> None:
        out = rb.sh(VMKEEP, "copy", str(source), str(target), "--json")
        report = json.loads(out.stdout)
        assert report["mode"] == "raw" and len(report["points_copied"]) == 1, report
        first_engine.append(float(report["seconds"]))
        rb.sh("sync")

    times = rb.rounds(args.repeat, {
        "cp -a of the repository + sync": Trial(lambda: (rb.sh("cp", "-a", str(source), str(files)), rb.sh("sync")),
                                                lambda: rb.rm(files), lambda: rb.rm(files)),
        # the last round's target stays for the unchanged copies below
        "vmkeep copy to an empty local target (raw) + sync": Trial(copy, fresh_target),
    })
    for key, runs in times.items():
        results.record(key, statistics.median(runs), runs)
    results.record("  the same, engine time only", statistics.median(first_engine), first_engine)

    second_engine: list[float] = []

    def unchanged() -> None:
        report = json.loads(rb.sh(VMKEEP, "copy", str(source), str(target), "--json").stdout)
        assert report["points_copied"] == [] and report["bytes_sent"] == 0, report
        second_engine.append(max(float(report["seconds"]), 0.001))  # reported to the ms

    t, runs = rb.median_of(args.second_repeat, lambda: None, unchanged, lambda: None, touch_memory=False)
    results.record("vmkeep copy, unchanged (nothing to send)", t, runs)
    results.record("  the unchanged copy, engine time only", statistics.median(second_engine), second_engine)
    rb.rm(target)

    def secs(key: str) -> float:
        return float(results[key]["seconds"])  # type: ignore[arg-type]

    first = secs("vmkeep copy to an empty local target (raw) + sync")
    ratios = {
        "copy / (cp -a of the repository + sync)": (round(secs("cp -a of the repository + sync") / first, 3),
                                                    0.8, "≥"),
        "unchanged second copy / first, whole command": (
            round(secs("vmkeep copy, unchanged (nothing to send)") / first, 4), 0.02, "<"),
        "unchanged second copy / first, engine time": (
            round(secs("  the unchanged copy, engine time only") / first, 4), 0.02, "<"),
    }
    publish("copy", (MARK_BEGIN, MARK_END), "Backup copy",
            f"Source: one point of {size / GiB:.1f} GiB of incompressible data in an encrypted local repository "
            f"({stored / GiB:.2f} GiB stored in {size >> 22} chunks), copied on the same filesystem; "
            f"{os.cpu_count()} CPUs; median of {args.repeat} runs, of {args.second_repeat} for the unchanged copy "
            "(written by `bench/copy_bench.py`).",
            {"size_bytes": size, "stored_bytes": stored, "repeat": args.repeat, "cpus": os.cpu_count()},
            results, ratios)


if __name__ == "__main__":
    main()
