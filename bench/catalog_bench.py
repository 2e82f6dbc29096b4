"""The catalog at scale: 10,000 VMs and 1,000,000 restore points, listed and searched through the API.

Fills a fresh database with synthetic rows (PostgreSQL COPY), starts a real `vmkeep server`, and
times each request type from a client on loopback: p50 and p95 over --requests requests each.
The target: every listing and search under 200 ms at p95.

Writes bench/results-catalog.json and the table of docs/performance.md between its markers.

    .venv/bin/python -m bench.catalog_bench [--vms 10000] [--points 1000000] [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
from sqlalchemy import create_engine, text

from bench.repo_bench import ROOT, write_section
from vmkeep.catalog.db import upgrade
from vmkeep.catalog.queue_schema import libpq_url
from vmkeep.lab.postgres import ensure_postgres, psql

VMKEEP = str(Path(sys.executable).with_name("vmkeep"))
MARK_BEGIN, MARK_END = "<!-- catalog-bench:begin -->", "<!-- catalog-bench:end -->"
TARGET_MS = 200.0


def fill(url: str, vms: int, points: int) -> float:
    """Synthetic inventory and points; returns the seconds it took."""
    started = time.monotonic()
    rng = random.Random(7)
    now = datetime.now(UTC)
    with psycopg.connect(libpq_url(url)) as conn:
        repo_id = conn.execute("INSERT INTO repositories (name, location, repo_id, encrypted) VALUES "
                               "('main', '/srv/main', 'bench', true) RETURNING id").fetchone()[0]  # type: ignore[index]
        # discovered just now, so the master's schedule does not try to reach this made-up host
        hyp_id = conn.execute("INSERT INTO hypervisors (name, kind, uri, discovered_at) VALUES ('dc1', 'libvirt', "
                              "'qemu+tls://dc1/system', now()) RETURNING id").fetchone()[0]  # type: ignore[index]
        columns = "hypervisor_id, name, uuid, host, state, disks, tags, present"
        with conn.cursor().copy(f"COPY vms ({columns}) FROM STDIN") as cp:
            for i in range(vms):
                cp.write_row((hyp_id, f"vm-{i:05d}", secrets.token_hex(16), f"host-{i % 50:02d}", "running",
                              '[{"name": "vda", "size": 42949672960}]', "[]", True))
        per_vm = points // vms
        with conn.cursor().copy("COPY restore_points (repository_id, name, point_id, created, kind, mode, transport, "
                                "consistency, logical_bytes, read_bytes, stored_bytes, duration_seconds, disks) "
                                "FROM STDIN") as cp:
            for i in range(vms):
                for k in range(per_vm):
                    created = now - timedelta(hours=(per_vm - k) * 24, minutes=rng.randrange(600))
                    cp.write_row((repo_id, f"vm-{i:05d}", f"{created:%Y%m%dT%H%M%SZ}-{i:05d}{k:03d}", created, "vm",
                                  "incremental" if k else "full", "hotadd", "application", 42949672960,
                                  rng.randrange(1 << 30), rng.randrange(1 << 29), rng.random() * 60,
                                  '{"vda": 42949672960}'))
        conn.execute("ANALYZE")
    return time.monotonic() - started


def timed(client: httpx.Client, path: str, params: dict[str, str], n: int) -> tuple[dict[str, float], httpx.Response]:
    """p50 and p95 of ``n`` GETs (each must answer 200), and the last answer."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        reply = client.get(path, params=params)
        times.append((time.perf_counter() - t0) * 1000)
        assert reply.status_code == 200, (path, params, reply.status_code, reply.text[:500])
    times.sort()
    return {"p50_ms": round(statistics.median(times), 1), "p95_ms": round(times[int(len(times) * 0.95) - 1], 1)}, reply


def measure(client: httpx.Client, path: str, params: dict[str, str], n: int) -> dict[str, float]:
    figures, reply = timed(client, path, params, n)
    return {**figures, "rows": len(reply.json())}


def arguments(doc: str | None, requests: int) -> argparse.Namespace:
    """The scale benchmarks' command line: --vms, --points, --requests."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=10_000)
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=requests)
    return ap.parse_args()


@contextmanager
def bench_database() -> Iterator[str]:
    """A fresh database at the newest schema for one run (dropped afterwards): its URL."""
    server_url = ensure_postgres()
    name = f"vmkeep_bench_{secrets.token_hex(3)}"
    admin = create_engine(server_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = server_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        admin.dispose()
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # as the superuser: autovacuum may be at work


@contextmanager
def served(url: str, role: str = "auditor") -> Iterator[tuple[str, str, str]]:
    """A real `vmkeep server` on the catalog at ``url`` with a user ``bench`` of ``role``:
    (base URL, user name, password)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "VMKEEP_DATABASE_URL": url, "VMKEEP_NEW_PASSWORD": "bench-password",
               "VMKEEP_MASTER_KEY_FILE": f"{tmp}/master.key"}
        subprocess.run([VMKEEP, "user", "add", "bench", "--role", role], env=env, check=True, capture_output=True)
        port = 18470 + os.getpid() % 1000
        log = Path(tmp, "server.log")  # its access log would drown the figures
        with log.open("w") as out:
            proc = subprocess.Popen([VMKEEP, "server", "--listen", f"127.0.0.1:{port}"], env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{base}/api/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            yield base, "bench", "bench-password"
        finally:
            proc.terminate()
            proc.wait()


def main() -> None:
    args = arguments(__doc__, 200)
    with bench_database() as url:
        seconds = fill(url, args.vms, args.points)
        print(f"filled {args.vms} VMs and {args.points} points in {seconds:.0f} s", flush=True)
        with served(url) as (base, user, password):
            token = httpx.post(f"{base}/api/auth/login", json={"name": user, "password": password}).json()["token"]
            client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60)
            cases = {
                "newest 100 points across all VMs": ("/api/points", {"limit": "100"}),
                "points of one VM": ("/api/points", {"vm": "vm-04242", "limit": "100"}),
                "points of VMs matching vm-042*": ("/api/points", {"vm": "vm-042*", "limit": "100"}),
                "1,000 VMs (first page)": ("/api/vms", {"limit": "1000"}),
                "VMs matching vm-0424*": ("/api/vms", {"name": "vm-0424*"}),
            }
            for path, params in cases.values():
                measure(client, path, params, 5)  # warm the caches
            results = {key: measure(client, path, params, args.requests) for key, (path, params) in cases.items()}
    for key, r in results.items():
        print(f"{key:40s} p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  ({r['rows']} rows)")
    doc = {"vms": args.vms, "points": args.points, "requests": args.requests, "cpus": os.cpu_count(),
           "target_p95_ms": TARGET_MS, "results": results}
    (ROOT / "bench" / "results-catalog.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["", f"{args.vms:,} VMs and {args.points:,} restore points (synthetic rows); {args.requests} "
             f"requests of each kind through the API on loopback; {doc['cpus']} CPUs "
             "(written by `bench/catalog_bench.py`).", "",
             "| request | p50 ms | p95 ms | rows | p95 < 200 ms |", "|---|---:|---:|---:|---|"]
    lines += [f"| {k} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['rows']} | "
              f"{'yes' if r['p95_ms'] < TARGET_MS else 'no'} |" for k, r in results.items()]
    lines.append("")
    write_section(MARK_BEGIN, MARK_END, lines, "Catalog and API at scale")


if __name__ == "__main__":
    main()
