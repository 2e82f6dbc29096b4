"""Commands that talk to a vmkeep server (`vmkeep --server URL …`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from vmkeep.cli.common import JsonOpt
from vmkeep.cli.output import byte_bars, emit_json, human, out_console, uncut
from vmkeep.client import ApiClient, save_token
from vmkeep.errors import UsageError, VmkeepError

hypervisor_app = typer.Typer(help="Hypervisors registered on the server.", no_args_is_help=True)
policy_app = typer.Typer(help="Backup policies on the server.", no_args_is_help=True)


def server_options(ctx: typer.Context) -> tuple[str | None, Path | None]:
    """The root's --server and --ca-file, else VMKEEP_SERVER and VMKEEP_CA_FILE."""
    from vmkeep.settings import settings

    options, env = ctx.find_root().obj or {}, settings()
    return options.get("server") or env.server, options.get("ca_file") or env.ca_file


def client(ctx: typer.Context) -> ApiClient:
    server, ca_file = server_options(ctx)
    if not server:
        raise UsageError("this command talks to a vmkeep server: give --server URL (or VMKEEP_SERVER)")
    return ApiClient(server, ca_file)


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def login_cmd(ctx: typer.Context, name: Annotated[str, typer.Argument(help="User name")]) -> None:
    """Log in and keep the token for this server (password from VMKEEP_PASSWORD, else asked)."""
    api = client(ctx)
    from vmkeep.settings import secret, settings

    password = secret(settings().password) or typer.prompt("password", hide_input=True)
    token = api.call("POST", "/api/auth/login", json={"name": name, "password": password})["token"]
    save_token(api.server, token)
    out_console.print(f"logged in to {api.server} as {name}")


@hypervisor_app.command("add")
def hypervisor_add_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    uri: Annotated[str, typer.Option(help="libvirt URI of the host, or vsphere://USER@VCENTER")],
    username: Annotated[str | None, typer.Option(help="Login, if the host asks for one")] = None,
    discovery_minutes: Annotated[int, typer.Option(min=1, help="Rediscover every N minutes")] = 60,
    json_out: JsonOpt = False,
) -> None:
    """Register a hypervisor (password from VMKEEP_HYPERVISOR_PASSWORD) and discover its VMs."""
    api = client(ctx)
    from vmkeep.hypervisors.connect import kind_of
    from vmkeep.settings import secret, settings

    body = {"name": name, "kind": kind_of(uri), "uri": uri, "username": username,
            "password": secret(settings().hypervisor_password), "discovery_minutes": discovery_minutes}
    added = api.call("POST", "/api/hypervisors", json=body)
    found = api.call("POST", f"/api/hypervisors/{name}/discover")
    if json_out:
        emit_json({**added, "discovery": found})
    else:
        out_console.print(f"hypervisor {name} added: {found['vms']} VMs")


@hypervisor_app.command("list")
def hypervisor_list_cmd(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    rows = client(ctx).call("GET", "/api/hypervisors")
    if json_out:
        emit_json({"hypervisors": rows})
        return
    table = Table("name", "uri", "discovered", "error")
    for h in rows:
        table.add_row(h["name"], h["uri"], (h["discovered_at"] or "")[:19], h["discovery_error"] or "")
    out_console.print(table)


@policy_app.command("create")
def policy_create_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    repository: Annotated[str, typer.Option(help="Registered repository name")],
    vms: Annotated[str | None, typer.Option(help="Comma-separated VM names")] = None,
    globs: Annotated[str | None, typer.Option(help="Comma-separated name globs, e.g. web-*")] = None,
    hypervisor: Annotated[str | None, typer.Option()] = None,
    schedule: Annotated[str | None, typer.Option(help="cron, UTC: '0 22 * * *'")] = None,
    keep_last: Annotated[int, typer.Option(min=0)] = 0,
    keep_daily: Annotated[int, typer.Option(min=0)] = 0,
    keep_weekly: Annotated[int, typer.Option(min=0)] = 0,
    keep_monthly: Annotated[int, typer.Option(min=0)] = 0,
    full_every: Annotated[int | None, typer.Option(min=1)] = None,
    transports: Annotated[str, typer.Option()] = "san:hotadd:nbd",
    quiesce: Annotated[str, typer.Option()] = "try",
    max_per_host: Annotated[int | None, typer.Option(min=1, help="This run's backups at once per host")] = None,
    max_per_datastore: Annotated[int | None, typer.Option(min=1)] = None,
    max_per_proxy: Annotated[int | None, typer.Option(min=1)] = None,
    verify_after: Annotated[bool, typer.Option(help="Re-read every chunk of each new point")] = False,
    verify_boot: Annotated[bool, typer.Option(help="Boot each new point in a sandbox and wait for its "
                                                   "heartbeat")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create a policy: which VMs, where, when, how long to keep."""
    retention = {k: v for k, v in (("last", keep_last), ("daily", keep_daily), ("weekly", keep_weekly),
                                   ("monthly", keep_monthly)) if v}
    body: dict[str, Any] = {"name": name, "repository": repository, "vms": _csv(vms), "globs": _csv(globs),
                            "hypervisor": hypervisor, "schedule": schedule, "retention": retention,
                            "full_every": full_every, "transports": transports, "quiesce": quiesce,
                            "max_per_host": max_per_host, "max_per_datastore": max_per_datastore,
                            "max_per_proxy": max_per_proxy, "verify_after": verify_after,
                            "verify_boot": verify_boot}
    created = client(ctx).call("POST", "/api/policies", json=body)
    if json_out:
        emit_json(created)
    else:
        out_console.print(f"policy {name} created" + (f", next run {created['next_run']}" if created["next_run"]
                                                       else ""))


def _job_table(job: dict[str, Any]) -> Group:
    """One run per VM, then each VM's error and every warning in full below the table (a
    failover says where the backup went; a narrow terminal wraps them, never cuts them)."""
    table = Table("VM", "status", "proxy", "tries", "mode", "transport", "read", "stored", "seconds",
                  title=f"run {job['id']} of {job['policy']}: {job['status']}", box=None, pad_edge=False)
    notes = []
    for v in job["vms"]:
        read = human(v["read_bytes"] or 0)
        if v["status"] == "running" and v["total_bytes"]:
            read = f"{human(v['progress_bytes'] or 0)} / {human(v['total_bytes'])}"
        status = v["status"] + (" ✓ verified" if v.get("verified") else "")
        table.add_row(v["vm"], status, v["proxy"] or "", str(v.get("attempts") or ""), v["mode"] or "",
                      v["transport"] or "", read, human(v["stored_bytes"] or 0),
                      f"{v['duration_seconds']:.1f}" if v["duration_seconds"] else "")
        if v["error"]:
            notes.append(Text(f"{v['vm']}: error: {v['error']}", style="red"))
        notes += [Text(f"{v['vm']}: {w}") for w in v["warnings"]]
    return Group(uncut(table), *notes)


@policy_app.command("run")
def policy_run_cmd(ctx: typer.Context, name: Annotated[str, typer.Argument()],
                   wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the run to its end")] = True,
                   json_out: JsonOpt = False) -> None:
    """Start a run now; with --wait (default), show each VM's progress until the run ends."""
    api = client(ctx)
    job = api.call("POST", f"/api/policies/{name}/run")
    if wait:
        with Live(_job_table(job), console=out_console, auto_refresh=False, transient=json_out) as live:
            while not job["finished"]:
                time.sleep(1)
                job = api.call("GET", f"/api/jobs/{job['id']}")
                live.update(_job_table(job), refresh=True)
    if json_out:
        emit_json(job)
    if wait and job["status"] != "succeeded":
        raise VmkeepError(f"run {job['id']} of {name} ended {job['status']}")


@policy_app.command("list")
def policy_list_cmd(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    rows = client(ctx).call("GET", "/api/policies")
    if json_out:
        emit_json({"policies": rows})
        return
    table = Table("name", "repository", "VMs", "schedule", "next run")
    for p in rows:
        table.add_row(p["name"], p["repository"], ", ".join(p["vms"] + p["globs"]) or "all", p["schedule"] or "",
                      (p["next_run"] or "")[:19])
    out_console.print(table)


@policy_app.command("delete")
def policy_delete_cmd(ctx: typer.Context, name: Annotated[str, typer.Argument()], json_out: JsonOpt = False) -> None:
    """Delete a policy (refused while one of its runs goes); its run history and points stay."""
    client(ctx).call("DELETE", f"/api/policies/{name}")
    if json_out:
        emit_json({"deleted": name})
    else:
        out_console.print(f"policy {name} deleted")


def jobs_cmd(ctx: typer.Context, job_id: Annotated[int | None, typer.Argument(help="One run, in detail")] = None,
             json_out: JsonOpt = False) -> None:
    """Policy runs on the server, newest first (or one run, per VM)."""
    api = client(ctx)
    if job_id is not None:
        job = api.call("GET", f"/api/jobs/{job_id}")
        if json_out:
            emit_json(job)
        else:
            out_console.print(_job_table(job))
        return
    rows = api.call("GET", "/api/jobs")
    if json_out:
        emit_json({"jobs": rows})
        return
    table = Table("run", "policy", "status", "by", "started", "VMs")
    for j in rows:
        ok = sum(v["status"] == "succeeded" for v in j["vms"])
        table.add_row(str(j["id"]), j["policy"], j["status"], j["requested_by"], j["started"][:19],
                      f"{ok}/{len(j['vms'])}")
    out_console.print(uncut(table))


def server_points(ctx: typer.Context, name: str | None, json_out: bool) -> None:
    """`vmkeep --server URL points [VM]`: the catalog's points across repositories."""
    if not server_options(ctx)[0]:
        raise UsageError("give --repo REPO to list a repository's points, or --server URL for a server's catalog")
    rows = client(ctx).call("GET", "/api/points", params={"vm": name} if name else {})
    if json_out:
        emit_json({"points": rows})
        return
    table = Table("VM", "point", "created", "mode", "transport", "stored", "repository")
    for p in rows:
        table.add_row(p["name"], p["point_id"], p["created"][:19], p["mode"] or "", p["transport"] or "",
                      human(p["stored_bytes"] or 0), p["repository"])
    out_console.print(uncut(table))


def server_restore(ctx: typer.Context, vm: str, point: str | None, hypervisor: str | None, as_name: str | None,
                   overwrite: bool, disk: str | None, storage: str | None, start: bool, json_out: bool) -> None:
    """`vmkeep --server URL restore VM[@POINT] --hypervisor H --as NEW|--overwrite`, followed to its end."""
    if not server_options(ctx)[0]:
        raise UsageError("give --repo REPO to restore here, or --server URL to have a proxy do it")
    if disk is not None:
        raise UsageError("single-disk restores run here: give --repo REPO with --disk and --output")
    if hypervisor is None:
        raise UsageError("through a server, say where: --hypervisor NAME (see `vmkeep --server URL hypervisor list`)")
    api = client(ctx)
    job = api.call("POST", "/api/restores", json={"vm": vm, "point": point, "hypervisor": hypervisor,
                                                  "as_name": as_name, "overwrite": overwrite, "storage": storage,
                                                  "start": start})
    with byte_bars() as bars:  # the proxy reports bytes written into the restore's row every second
        bar = bars.add_task(f"restoring {vm}@{job['point']}", total=None)
        while job["status"] in ("queued", "running"):
            time.sleep(1)
            job = api.call("GET", f"/api/restores/{job['id']}")
            bars.update(bar, completed=job["progress_bytes"] or 0, total=job["total_bytes"] or None,
                        description=f"restoring {vm}@{job['point']} on {job['proxy']}")
    if json_out:
        emit_json(job)
    elif job["status"] == "succeeded":
        out_console.print(f"restored {vm}@{job['point']} → {job['new_name'] or vm} (by proxy {job['proxy']})")
    if job["status"] != "succeeded":
        raise VmkeepError(f"the restore failed on proxy {job['proxy']}: {job['error']}")
