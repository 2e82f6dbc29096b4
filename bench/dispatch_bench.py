"""The dispatcher keeps N proxies busy: one policy run over many VMs with 1, 2 and 4 proxy processes.

Everything on the control path is real — PostgreSQL, a `vmkeep server`, proxy processes that
register and heartbeat over the API and work their procrastinate queues, the backup task's row
bookkeeping, catalog inserts and job settling. Only the data movement is simulated: each VM's
disk is "read" at a fixed rate per stream (the task sleeps, as a network-bound NBD stream waits),
so the figures measure the master and the queue rather than this machine's two CPUs.

Reference, same run: the ideal makespan, ceil(VMs / (proxies × concurrency)) × per-VM time. The
ratio ideal / measured is 1.0 when no slot ever idles; aggregate throughput should grow with the
number of proxies.

Writes bench/results-dispatch.json and its table in docs/performance.md.

    .venv/bin/python -m bench.dispatch_bench [--vms 24] [--disk-mib 1024] [--rate-mib 256] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.repo_bench import ROOT, write_section
from vmkeep.catalog.queue_schema import libpq_url
from vmkeep.lab.postgres import ensure_postgres, psql

VMKEEP = str(Path(sys.executable).with_name("vmkeep"))
MARK_BEGIN, MARK_END = "<!-- dispatch-bench:begin -->", "<!-- dispatch-bench:end -->"
MiB = 1 << 20
PASSWORD = "bench-password"


def simulated_proxy(name: str, server: str, token: str, concurrency: int) -> None:
    """A real proxy whose backups move no data: each disk takes size / rate seconds."""
    import vmkeep.proxy.backup_task as backup_task
    from vmkeep.progress import Progress
    from vmkeep.proxy.worker import run_proxy
    from vmkeep.repository.points import DiskEntry, Manifest

    size, rate = int(os.environ["BENCH_DISK_BYTES"]), float(os.environ["BENCH_RATE"])

    def backup_vm(_repo: object, _connector: object, vm: str, *, progress: Progress, **_: Any) -> Manifest:
        started = time.monotonic()
        task, step = progress.task(vm, size), size // 8
        for _ in range(8):
            time.sleep(step / rate)
            task.advance(step)
        task.finish()
        now = datetime.now(UTC)
        return Manifest(name=vm, point_id=f"{now:%Y%m%dT%H%M%S%f}-{secrets.token_hex(2)}", created=now.isoformat(),
                        parent=None, disks={"vda": DiskEntry(size, "simulated", "simulated")}, chunk_size=4 * MiB,
                        meta={"kind": "vm", "mode": "full", "transport": "nbd", "consistency": "crash"},
                        stats={"bytes_read": size, "bytes_stored": 0, "seconds": time.monotonic() - started})

    backup_task.backup_vm = backup_vm  # type: ignore[assignment]
    run_proxy(server, token, name, ["nbd"], ["*"], concurrency)


def add_vms(url: str, count: int, size: int) -> None:
    """Synthetic inventory on eight made-up hosts, discovered just now so no discovery runs."""
    with psycopg.connect(libpq_url(url)) as conn:
        hyp = conn.execute("INSERT INTO hypervisors (name, kind, uri, discovered_at, discovery_minutes) VALUES "
                           "('sim', 'libvirt', 'qemu:///system', now(), 10080) RETURNING id").fetchone()
        assert hyp is not None
        disks = json.dumps([{"name": "vda", "path": "", "format": "qcow2", "size": size, "allocation": size}])
        for i in range(count):
            conn.execute("INSERT INTO vms (hypervisor_id, name, uuid, host, state, disks, tags, present) "
                         "VALUES (%s, %s, %s, %s, 'running', %s, '[]', true)",
                         (hyp[0], f"sim-{i:03d}", secrets.token_hex(16), f"sim-host-{i % 8}", disks))


def wait_until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while (value := check()) is None or value is False:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)
    return value


def one_round(api: httpx.Client, base: str, token: str, env: dict[str, str], proxies: int, args: argparse.Namespace,
              vm_names: list[str]) -> dict[str, float]:
    names = [f"r{proxies}-p{i}" for i in range(proxies)]
    procs = [subprocess.Popen([sys.executable, "-m", "bench.dispatch_bench", "proxy", n, base, token,
                               str(args.concurrency)], env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
             for n in names]
    try:
        wait_until(lambda: {p["name"] for p in api.get("/api/proxies").json() if p["up"]} == set(names), 60,
                   f"{proxies} proxies up (and the last round's down)")
        policy = f"round-{proxies}"
        reply = api.post("/api/policies", json={"name": policy, "repository": "main", "vms": vm_names,
                                                "transports": "nbd"})
        assert reply.status_code == 201, reply.text
        t0 = time.monotonic()
        job = api.post(f"/api/policies/{policy}/run").json()
        done = wait_until(lambda: (j := api.get(f"/api/jobs/{job['id']}").json())["finished"] and j, 600, "the run")
        seconds = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert done["status"] == "succeeded", done
    per_vm = args.disk_mib * MiB / (args.rate_mib * MiB)
    ideal = math.ceil(len(vm_names) / (proxies * args.concurrency)) * per_vm
    busy = sum((datetime.fromisoformat(v["finished"]) - datetime.fromisoformat(v["started"])).total_seconds()
               for v in done["vms"])
    return {"proxies": proxies, "seconds": round(seconds, 2), "ideal_seconds": round(ideal, 2),
            "ratio": round(ideal / seconds, 3),
            "slot_utilisation": round(busy / (proxies * args.concurrency * seconds), 3),
            "aggregate_mib_s": round(len(vm_names) * args.disk_mib / seconds, 1),
            "spread": len({v["proxy"] for v in done["vms"]})}


def main() -> None:
    if sys.argv[1:2] == ["proxy"]:
        name, server, token, concurrency = sys.argv[2:6]
        simulated_proxy(name, server, token, int(concurrency))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=24)
    ap.add_argument("--disk-mib", type=int, default=1024)
    ap.add_argument("--rate-mib", type=float, default=256, help="simulated read rate of one stream")
    ap.add_argument("--concurrency", type=int, default=2, help="backups at once per proxy")
    args = ap.parse_args()
    server_url = ensure_postgres()
    name = f"vmkeep_bench_{secrets.token_hex(3)}"
    psql(f"CREATE DATABASE {name} OWNER vmkeep")
    url = server_url.rsplit("/", 1)[0] + f"/{name}"
    server = None
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "VMKEEP_DATABASE_URL": url, "VMKEEP_NEW_PASSWORD": PASSWORD,
                   "VMKEEP_MASTER_KEY_FILE": f"{tmp}/master.key", "BENCH_DISK_BYTES": str(args.disk_mib * MiB),
                   "BENCH_RATE": str(args.rate_mib * MiB), "PYTHONPATH": str(ROOT)}
            # the schema and the proxies' database role (derived from this master key)
            subprocess.run([VMKEEP, "db", "upgrade"], env=env, check=True, capture_output=True)
            add_vms(url, args.vms, args.disk_mib * MiB)
            subprocess.run([VMKEEP, "user", "add", "bench", "--role", "admin"], env=env, check=True,
                           capture_output=True)
            subprocess.run([VMKEEP, "repo", "init", f"{tmp}/repo"], env=env, check=True, capture_output=True)
            port = 18470 + os.getpid() % 1000
            base = f"http://127.0.0.1:{port}"
            server = subprocess.Popen([VMKEEP, "server", "--listen", f"127.0.0.1:{port}"], env=env,
                                      stderr=subprocess.DEVNULL)
            wait_until(lambda: _healthy(base), 60, "the server")
            login = httpx.post(f"{base}/api/auth/login", json={"name": "bench", "password": PASSWORD}).json()
            api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {login['token']}"}, timeout=60)
            assert api.post("/api/repositories", json={"name": "main", "location": f"{tmp}/repo"}).status_code == 201
            token = api.post("/api/tokens", json={"name": "proxies"}).json()["token"]
            vm_names = [v["name"] for v in api.get("/api/vms", params={"limit": "10000"}).json()]
            for proxies in (1, 2, 4):
                results.append(one_round(api, base, token, env, proxies, args, vm_names))
                print(json.dumps(results[-1]), flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        psql(f"DROP ROLE IF EXISTS {name}_proxy")
    doc = {"vms": args.vms, "disk_mib": args.disk_mib, "rate_mib_s": args.rate_mib, "concurrency": args.concurrency,
           "cpus": os.cpu_count(), "results": results}
    (ROOT / "bench" / "results-dispatch.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["", f"One policy run over {args.vms} VMs of {args.disk_mib} MiB each, every disk read at a simulated "
             f"{args.rate_mib:.0f} MiB/s per stream, {args.concurrency} backups at once per proxy; real server, "
             f"PostgreSQL, procrastinate and proxy processes; {doc['cpus']} CPUs (written by "
             "`bench/dispatch_bench.py`). Ideal: every slot busy from the start to the end.", "",
             "| proxies | seconds | ideal s | ideal / measured | slot use | aggregate MiB/s | proxies used |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['proxies']} | {r['seconds']:.1f} | {r['ideal_seconds']:.1f} | {r['ratio']:.2f} | "
              f"{r['slot_utilisation']:.2f} | {r['aggregate_mib_s']:.0f} | {r['spread']} |" for r in results]
    lines.append("")
    write_section(MARK_BEGIN, MARK_END, lines, "Dispatcher: keeping N proxies busy")


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
