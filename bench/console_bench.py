"""The web console at scale: every page of the console with 10,000 VMs and 1,000,000 restore points.

Fills a fresh database with the catalog bench's synthetic inventory and points
(`bench.catalog_bench.fill`), adds what a running installation has besides (tags and folders,
policies of each kind of selection rule, 30 days of job history, a run going on now, a usage
measurement of the repository, proxies, users, a hash-chained audit log), starts a real
`vmkeep server`, logs in through the console's form and times every page the navigation links
to (GET, over loopback), with a search, a filter, a deep page and a detail page where the page
offers them. Target: every page under 300 ms at p95.

Writes bench/results-console.json and the table of docs/performance.md between its markers.

    .venv/bin/python -m bench.console_bench [--vms 10000] [--points 1000000] [--requests 60]
"""

from __future__ import annotations

import json
import os
import random
import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any

import httpx
import psycopg

from bench.catalog_bench import arguments, bench_database, fill, served, timed
from bench.repo_bench import ROOT, write_section
from vmkeep.catalog.audit_chain import GENESIS, entry_hash
from vmkeep.catalog.queue_schema import libpq_url
from vmkeep.repository.info import NameStats, RepoInfo

MARK_BEGIN, MARK_END = "<!-- console-bench:begin -->", "<!-- console-bench:end -->"
TARGET_MS = 300.0
HISTORY_DAYS = 30
AUDIT_ENTRIES = 50_000
# name, selection rules, cron schedule, created (days ago): one policy per kind of rule
POLICIES: list[tuple[str, dict[str, Any], str | None, int]] = [
    ("nightly-prod", {"tags": ["prod"]}, "0 22 * * *", 60),
    ("hourly-db", {"globs": ["vm-00[0-4]*"]}, "0 * * * *", 2),
    ("weekly-racks", {"hypervisor": "dc1", "folders": ["/dc1/rack-0*"]}, "0 3 * * 0", 60),
    ("hosts-7-8", {"hosts": ["host-07", "host-08"], "globs": ["vm-0[5-9]*"]}, "30 1 * * *", 60),
    ("archive", {"vms": [f"vm-{i:05d}" for i in range(9000, 9040)]}, None, 60),
]


def extras(url: str, vms: int, now: datetime) -> None:
    """What an installation has besides VMs and points: tags, folders, policies, job history,
    a run going on now, proxies, users and the audit log."""
    rng = random.Random(25)
    with psycopg.connect(libpq_url(url)) as conn:
        conn.execute("UPDATE vms SET tags = CASE WHEN id %% 3 = 0 THEN '[\"prod\"]'::json ELSE '[\"test\"]'::json END, "
                     "folder = '/dc1/rack-' || lpad((id %% 20)::text, 2, '0'), first_seen = %s",
                     (now - timedelta(days=100),))  # known as long as their points
        repo_id = conn.execute("SELECT id FROM repositories WHERE name = 'main'").fetchone()[0]  # type: ignore[index]
        ids = {}
        for name, rules, schedule, days in POLICIES:
            ids[name] = conn.execute(
                "INSERT INTO policies (name, selection, repository_id, schedule, retention, transports, quiesce, "
                "created) VALUES (%s, %s, %s, %s, '{\"keep_daily\": 30}', 'san:hotadd:nbd', 'try', %s) RETURNING id",
                (name, json.dumps(rules), repo_id, schedule, now - timedelta(days=days))).fetchone()[0]  # type: ignore[index]
        conn.execute("INSERT INTO proxies (name, transports, reaches, concurrency, last_heartbeat) SELECT "
                     "'proxy-' || n, '[\"hotadd\", \"nbd\"]', '[\"*\"]', 4, now() FROM generate_series(1, 4) n")
        conn.execute("INSERT INTO users (name, role, password_hash, disabled) SELECT 'user-' || n, "
                     "(ARRAY['admin', 'operator', 'restore-only', 'auditor'])[1 + n % 4], 'x', false "
                     "FROM generate_series(1, 20) n")
        members = {name: [r[0:2] for r in conn.execute(_selected(rules))] for name, rules, _s, _d in POLICIES}
        runs = [(name, now - timedelta(days=d, hours=2)) for d in range(1, HISTORY_DAYS + 1) for name in
                ("nightly-prod", "hosts-7-8")] + [("weekly-racks", now - timedelta(days=7 * w + 1)) for w in range(4)]
        runs += [("hourly-db", now - timedelta(hours=h, minutes=50)) for h in range(1, 48)]
        runs.sort(key=lambda r: r[1])
        job_ids = []
        for name, started in runs:
            job_ids.append(conn.execute("INSERT INTO jobs (policy_id, policy_name, requested_by, status, started, "
                                        "finished, notified_at) VALUES (%s, %s, 'schedule', 'succeeded', %s, %s, %s) "
                                        "RETURNING id", (ids[name], name, started, started + timedelta(hours=1),
                                                         started + timedelta(hours=1))).fetchone()[0])  # type: ignore[index]
        running = conn.execute("INSERT INTO jobs (policy_id, policy_name, requested_by, status, started) VALUES "
                               "(%s, 'nightly-prod', 'schedule', 'running', %s) RETURNING id",
                               (ids["nightly-prod"], now - timedelta(hours=1))).fetchone()[0]  # type: ignore[index]
        columns = ("job_id, vm_id, vm_name, proxy, status, attempts, mode, transport, read_bytes, stored_bytes, "
                   "progress_bytes, total_bytes, duration_seconds, warnings, started, finished")
        with conn.cursor().copy(f"COPY job_vms ({columns}) FROM STDIN") as cp:
            for job_id, (name, started) in zip(job_ids, runs, strict=True):
                for vm_id, vm_name in members[name]:
                    ok = rng.random() > 0.02
                    cp.write_row((job_id, vm_id, vm_name, f"proxy-{vm_id % 4 + 1}", "succeeded" if ok else "failed",
                                  1, "incremental", "hotadd", rng.randrange(1 << 30), rng.randrange(1 << 29), None,
                                  None, rng.random() * 60, "[]", started, started + timedelta(minutes=30)))
            for k, (vm_id, vm_name) in enumerate(members["nightly-prod"]):
                total = 40 << 30
                status = "succeeded" if k < 2000 else "running" if k < 2008 else "queued"
                cp.write_row((running, vm_id, vm_name, f"proxy-{vm_id % 4 + 1}", status, 1, "incremental", "hotadd",
                              None, None, rng.randrange(total) if status == "running" else None,
                              total if status == "running" else None, None, "[]",
                              now - timedelta(minutes=rng.randrange(1, 30)) if status != "queued" else None,
                              now - timedelta(minutes=1) if status == "succeeded" else None))
        usage_run(conn, repo_id, vms, now)
        audit_log(conn, now)
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")  # as autovacuum leaves a catalog that has run for a while


def _selected(rules: dict[str, Any]) -> str:
    """The (id, name) of the VMs the bench's rules pick (each rule kind the bench uses, in SQL)."""
    where = ["present"]
    if "tags" in rules:
        where.append(f"tags::jsonb ?| array{rules['tags']!r}")
    if "globs" in rules:
        where.append("(" + " OR ".join(f"name SIMILAR TO '{g.replace('*', '%')}'" for g in rules["globs"]) + ")")
    if "folders" in rules:
        where.append("(" + " OR ".join(f"folder LIKE '{g.replace('*', '%')}'" for g in rules["folders"]) + ")")
    if "hosts" in rules:
        where.append("host IN (" + ", ".join(f"'{h}'" for h in rules["hosts"]) + ")")
    if "vms" in rules:
        where.append("name IN (" + ", ".join(f"'{v}'" for v in rules["vms"]) + ")")
    return f"SELECT id, name FROM vms WHERE {' AND '.join(where)} ORDER BY id"


def usage_run(conn: psycopg.Connection[Any], repo_id: int, vms: int, now: datetime) -> None:
    """A usage measurement of the repository as a proxy reports it (RepoInfo.as_dict): the
    catalog's trigger turns its names into repository_usage rows, one per VM."""
    rng = random.Random(15)
    info = RepoInfo("/srv/main", "bench", True, 1 << 20, 3, 0, points=100 * vms, logical_bytes=vms * (40 << 30) * 100,
                    referenced_bytes=vms * (20 << 30) * 100, unique_plain_bytes=vms * (6 << 30),
                    stored_bytes=vms * (3 << 30), chunks=vms * 6144)
    info.names = {f"vm-{i:05d}": NameStats(100, 100 * (40 << 30), 100 * (20 << 30), rng.randrange(4 << 30),
                                           rng.randrange(2 << 30)) for i in range(vms)}
    run_id = conn.execute("INSERT INTO maintenance_runs (repository_id, repository_name, kind, requested_by, proxy, "
                          "status, attempts, created, started) VALUES (%s, 'main', 'usage', 'schedule', 'proxy-1', "
                          "'running', 1, %s, %s) RETURNING id", (repo_id, now - timedelta(hours=5),
                                                                  now - timedelta(hours=5))).fetchone()[0]  # type: ignore[index]
    conn.execute("UPDATE maintenance_runs SET status = 'succeeded', result = %s, finished = %s WHERE id = %s",
                 (json.dumps(info.as_dict()), now - timedelta(hours=4), run_id))


def audit_log(conn: psycopg.Connection[Any], now: datetime) -> None:
    """AUDIT_ENTRIES chained entries over the history (backup starts, logins, restores)."""
    previous = GENESIS
    with conn.cursor().copy('COPY audit_log (at, "user", action, target, client, detail, prev_hash, hash) '
                            "FROM STDIN") as cp:
        for k in range(AUDIT_ENTRIES):
            at = now - timedelta(days=HISTORY_DAYS) + timedelta(seconds=k * HISTORY_DAYS * 86400 // AUDIT_ENTRIES)
            user, action, target = (("schedule", "policy-run", "nightly-prod") if k % 3 else
                                    (f"user-{k % 20 + 1}", "login" if k % 2 else "restore", f"vm-{k % 10000:05d}"))
            detail: dict[str, Any] = {}
            digest = entry_hash(previous, at, user, action, target, "127.0.0.1", detail)
            cp.write_row((at, user, action, target, "127.0.0.1", json.dumps(detail), previous, digest))
            previous = digest


class Links(HTMLParser):
    """The links of a page (with the main navigation's apart), its GET forms' fields, and the
    pager's last page."""

    def __init__(self) -> None:
        super().__init__()
        self.nav: list[str] = []
        self.links: list[str] = []
        self.text_fields: list[str] = []
        self.selects: dict[str, list[str]] = {}
        self._in_nav = False
        self._in_get_form = False
        self._select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "nav" and a.get("aria-label") == "Main":
            self._in_nav = True
        elif tag == "a" and a.get("href"):
            (self.nav if self._in_nav else self.links).append(str(a["href"]))
        elif tag == "form":
            self._in_get_form = (a.get("method") or "get").lower() == "get"
        elif tag == "input" and self._in_get_form and a.get("name") and a.get("type", "text") in ("text", "search"):
            self.text_fields.append(str(a["name"]))
        elif tag == "select" and self._in_get_form and a.get("name"):
            self._select = str(a["name"])
            self.selects[self._select] = []
        elif tag == "option" and self._select and a.get("value"):
            self.selects[self._select].append(str(a["value"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "nav":
            self._in_nav = False
        elif tag == "form":
            self._in_get_form = False
        elif tag == "select":
            self._select = None


def parsed(client: httpx.Client, path: str, params: dict[str, str] | None = None) -> tuple[Links, str]:
    reply = client.get(path, params=params)
    links = Links()
    links.feed(reply.text)
    return links, reply.text


def cases(client: httpx.Client) -> dict[str, tuple[str, dict[str, str]]]:
    """The requests to time: every page in the navigation that exists yet, and on each, its search
    (the first text field), its filter (the first choice of the first list), a deep page and the
    first detail page it links to."""
    home, _ = parsed(client, "/")
    found: dict[str, tuple[str, dict[str, str]]] = {"dashboard": ("/", {}),
                                                    "dashboard: running jobs (polled)": ("/dashboard/running", {})}
    for href in home.nav:
        if href == "/" or client.get(href).status_code != 200:
            continue  # not built yet
        name = href.strip("/")
        found[name] = (href, {})
        links, text = parsed(client, href)
        if links.text_fields:
            found[f"{name}: search"] = (href, {links.text_fields[0]: "vm-0424"})
        for field, values in links.selects.items():
            if len(values) > 1:
                found[f"{name}: filter {field}={values[1]}"] = (href, {field: values[1]})
                break
        pages = re.search(r"Page 1 of (\d+)", text)
        if pages and int(pages[1]) > 2:
            deep = int(pages[1]) // 2 + 1
            found[f"{name}: page {deep} of {pages[1]}"] = (href, {"page": str(deep)})
        details = [link for link in links.links if link.startswith(href + "/") and "?" not in link]
        detail = next((link for link in details if not link.endswith(("/delete", "/new"))), None)
        if detail:
            found[f"{name}: one ({detail})"] = (detail, {})
    return found


def run(url: str, requests: int) -> dict[str, dict[str, Any]]:
    with served(url, role="admin") as (base, user, password):
        client = httpx.Client(base_url=base, timeout=60, follow_redirects=False)
        reply = client.post("/login", data={"name": user, "password": password}, headers={"Origin": base})
        assert reply.status_code == 303, reply.text
        found = cases(client)
        failing = {key: client.get(path, params=params).status_code for key, (path, params) in found.items()}
        results: dict[str, dict[str, Any]] = {}
        for key, (path, params) in found.items():
            if failing[key] != 200:  # a page being built as this runs: reported, not timed
                results[key] = {"path": path, "params": params, "error": f"HTTP {failing[key]}"}
                print(f"{key:50s} HTTP {failing[key]}", flush=True)
                continue
            timed(client, path, params, 3)  # warm the caches
            results[key] = {"path": path, "params": params, **timed(client, path, params, requests)[0]}
            print(f"{key:50s} p50 {results[key]['p50_ms']:7.1f} ms  p95 {results[key]['p95_ms']:7.1f} ms", flush=True)
        return results


def main() -> None:
    args = arguments(__doc__, 60)
    with bench_database() as url:
        now = datetime.now(UTC)
        seconds = fill(url, args.vms, args.points)
        extras(url, args.vms, now)
        print(f"filled {args.vms} VMs and {args.points} points in {seconds:.0f} s", flush=True)
        results = run(url, args.requests)
    doc = {"vms": args.vms, "points": args.points, "requests": args.requests, "cpus": os.cpu_count(),
           "target_p95_ms": TARGET_MS, "results": results}
    (ROOT / "bench" / "results-console.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["", f"{args.vms:,} VMs, {args.points:,} restore points (`bench/catalog_bench.py`'s rows), "
             f"{len(POLICIES)} policies, {HISTORY_DAYS} days of job history, a run going on, per-VM repository usage, "
             f"{AUDIT_ENTRIES:,} audit entries; {args.requests} requests of each page as the admin, through the "
             f"console's session on loopback; {doc['cpus']} CPUs (written by `bench/console_bench.py`).", "",
             "| page | p50 ms | p95 ms | p95 < 300 ms |", "|---|---:|---:|---|"]
    lines += [f"| {k} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {'yes' if r['p95_ms'] < TARGET_MS else 'no'} |"
              if "error" not in r else f"| {k} | | | {r['error']} |" for k, r in results.items()]
    lines.append("")
    write_section(MARK_BEGIN, MARK_END, lines, "Web console at scale")


if __name__ == "__main__":
    main()
