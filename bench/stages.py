"""What each per-chunk stage of a backup costs on this machine: single-threaded CPU seconds per GB
of 4 MiB chunks, through vmkeep's own functions (docs/performance.md, "Where the time goes").

    .venv/bin/python -m bench.stages [--gib 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

from bench.repo_bench import ROOT, write_section
from vmkeep.lab.images import content
from vmkeep.repository.chunks import decode_chunk, encode_chunk, encode_chunk_parts, worth_compressing
from vmkeep.repository.crypto import TAG_SIZE, RepositoryKeys, seal_into

CHUNK = 4 << 20
MARK_BEGIN, MARK_END = "<!-- stages-bench:begin -->", "<!-- stages-bench:end -->"


def cpu_seconds_per_gb(step: Callable[[], object], gib: float) -> float:
    """Thread CPU time of ``step`` run over ``gib`` GiB of 4 MiB chunks, scaled to one GB."""
    count = max(1, int(gib * (1 << 30) / CHUNK))
    step()
    t = time.thread_time()
    for _ in range(count):
        step()
    return (time.thread_time() - t) / (count * CHUNK / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="data per stage")
    args = ap.parse_args()
    keys = RepositoryKeys.derive(os.urandom(32), encrypted=True)
    random_chunk, text_chunk = content("random", "stages", 0, CHUNK), content("text", "stages", 0, CHUNK)
    cid = keys.chunk_id(random_chunk)
    stored_random = encode_chunk(keys, cid, random_chunk, 1)
    text_id = keys.chunk_id(text_chunk)
    stored_text = encode_chunk(keys, text_id, text_chunk, 1)
    assert keys.data_key is not None
    data_key = keys.data_key
    sealed = memoryview(bytearray(len(random_chunk) + TAG_SIZE))
    stages: dict[str, Callable[[], object]] = {
        "keyed BLAKE3 chunk id": lambda: keys.chunk_id(random_chunk),
        "compressibility probe (incompressible chunk)": lambda: worth_compressing(random_chunk, 1),
        "AES-256-GCM seal": lambda: seal_into(data_key, random_chunk, cid, sealed),
        "a fresh 4 MiB buffer, filled (allocation + page faults + copy)": lambda: bytearray(random_chunk),
        "whole chunk encoding, incompressible, encrypted": lambda: encode_chunk_parts(keys, cid, random_chunk, 1),
        "whole chunk encoding, text-like, encrypted (zstd 1)": lambda: encode_chunk_parts(keys, text_id, text_chunk, 1),
        "whole chunk decoding, incompressible, encrypted": lambda: decode_chunk(keys, cid, stored_random, CHUNK),
        "whole chunk decoding, text-like, encrypted": lambda: decode_chunk(keys, text_id, stored_text, CHUNK),
    }
    costs = {name: round(cpu_seconds_per_gb(step, args.gib), 3) for name, step in stages.items()}
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    doc = {"cpu": cpu, "cpus": os.cpu_count(), "chunk_bytes": CHUNK, "cpu_seconds_per_gb": costs}
    (ROOT / "bench" / "results-stages.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["", f"Single-threaded CPU seconds per GB of 4 MiB chunks on {cpu} ({doc['cpus']} CPUs), written by "
             "`bench/stages.py`:", "", "| stage | CPU s per GB | GB/s per core |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.3f} | {1 / v if v else float('inf'):.1f} |" for k, v in costs.items()]
    write_section(MARK_BEGIN, MARK_END, [*lines, ""], "Where the time goes")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
