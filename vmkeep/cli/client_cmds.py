"""Commands that talk to a vmkeep server (`vmkeep --server URL …`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from vmkeep.cli.common import JsonOpt
from vmkeep.cli.output import byte_bars, emit_json, human, out_console, uncut
from vmkeep.client import ApiClient, save_token
from vmkeep.errors import UsageError, VmkeepError


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


def say(json_out: bool, data: object, line: str) -> None:
    """``data`` as JSON with --json, else one line for a person."""
    if json_out:
        emit_json(data)
    else:
        out_console.print(line, highlight=False, soft_wrap=True)


Row = dict[str, Any]


def show_list(ctx: typer.Context, path: str, key: str, json_out: bool, columns: Sequence[str],
              cells: Callable[[Row], Sequence[str]], params: dict[str, Any] | None = None) -> None:
    """GET ``path``: with --json one object ``{key: [...]}``, else a table of ``cells`` per row."""
    rows = client(ctx).call("GET", path, params={k: v for k, v in (params or {}).items() if v is not None})
    if json_out:
        emit_json({key: rows})
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*cells(row))
    out_console.print(uncut(table))


def login_cmd(ctx: typer.Context, name: Annotated[str, typer.Argument(help="User name")]) -> None:
    """Log in and keep the token for this server (password from VMKEEP_PASSWORD, else asked)."""
    api = client(ctx)
    from vmkeep.settings import secret, settings

    password = secret(settings().password) or typer.prompt("password", hide_input=True)
    token = api.call("POST", "/api/auth/login", json={"name": name, "password": password})["token"]
    save_token(api.server, token)
    out_console.print(f"logged in to {api.server} as {name}")


def job_table(job: dict[str, Any]) -> Group:
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


def _show_job(job: dict[str, Any], json_out: bool) -> None:
    if json_out:
        emit_json(job)
    else:
        out_console.print(job_table(job))


def jobs_cmd(ctx: typer.Context,
             what: Annotated[str | None, typer.Argument(metavar="[ID|cancel|log]", help=(
                 "A run's id: that run per VM; cancel: stop a run; log: the proxies' log lines of a run"))] = None,
             cancel_id: Annotated[int | None, typer.Argument(metavar="[ID]",
                                                             help="With cancel or log: the run")] = None,
             json_out: JsonOpt = False) -> None:
    """Policy runs on the server, newest first; one run per VM; or `jobs cancel ID`, `jobs log ID`.

    Cancelling drops the run's queued VMs and stops the running ones at their next chunk."""
    api = client(ctx)
    if what == "log":
        if cancel_id is None:
            raise UsageError("say which run: vmkeep jobs log ID (the run column of `vmkeep jobs`)")
        lines = api.call("GET", f"/api/jobs/{cancel_id}/log")
        if json_out:
            emit_json(lines)
        for line in [] if json_out else lines:
            out_console.print(f"{line['at'][:19]} {line['vm']} {line['level']} {line['logger']}: {line['message']}",
                              highlight=False, soft_wrap=True, markup=False)
        return
    if what == "cancel":
        if cancel_id is None:
            raise UsageError("say which run: vmkeep jobs cancel ID (the run column of `vmkeep jobs`)")
        _show_job(api.call("POST", f"/api/jobs/{cancel_id}/cancel"), json_out)
        return
    if what is not None:
        if not what.isdigit() or cancel_id is not None:
            raise UsageError(f"`jobs {what}`: give a run's id (vmkeep jobs 12) or cancel one (vmkeep jobs cancel 12)")
        _show_job(api.call("GET", f"/api/jobs/{what}"), json_out)
        return
    show_list(ctx, "/api/jobs", "jobs", json_out, ("run", "policy", "status", "by", "started", "VMs"),
              lambda j: (str(j["id"]), j["policy"], j["status"], j["requested_by"], j["started"][:19],
                         f"{sum(v['status'] == 'succeeded' for v in j['vms'])}/{len(j['vms'])}"))


def restores_cmd(ctx: typer.Context, restore_id: Annotated[int | None, typer.Argument(
        help="One restore, in full")] = None, json_out: JsonOpt = False) -> None:
    """Restores started through the server, newest first (the last 100), or one of them."""
    api = client(ctx)
    if restore_id is not None:
        r = api.call("GET", f"/api/restores/{restore_id}")
        if json_out:
            emit_json(r)
            return
        done = f"{human(r['progress_bytes'] or 0)} of {human(r['total_bytes'] or 0)}"
        out_console.print(f"restore {r['id']}: {r['vm']}@{r['point']} from {r['repository']} → "
                          f"{r['new_name'] or r['vm']} ({r['mode']}) on {r['hypervisor']}, proxy {r['proxy']}: "
                          f"{r['status']}, {done}, {r['attempts']} attempts", highlight=False, soft_wrap=True)
        for line in [*r["warnings"], *(f"{d}: {path}" for d, path in (r["disks"] or {}).items())]:
            out_console.print(f"  {line}", highlight=False, soft_wrap=True)
        if r["error"]:
            out_console.print(f"  [red]error:[/red] {escape(r['error'])}", highlight=False, soft_wrap=True)
        return
    show_list(ctx, "/api/restores", "restores", json_out,
              ("id", "VM", "point", "as", "hypervisor", "proxy", "status", "by", "created"),
              lambda r: (str(r["id"]), r["vm"], r["point"], r["new_name"] or "(overwrite)", r["hypervisor"],
                         r["proxy"] or "", r["status"], r["requested_by"], r["created"][:19]))


def server_points(ctx: typer.Context, name: str | None, json_out: bool) -> None:
    """`vmkeep --server URL points [VM]`: the catalog's points across repositories."""
    if not server_options(ctx)[0]:
        raise UsageError("give --repo REPO to list a repository's points, or --server URL for a server's catalog")
    show_list(ctx, "/api/points", "points", json_out,
              ("VM", "point", "created", "mode", "transport", "stored", "repositories"),
              lambda p: (p["name"], p["point_id"], p["created"][:19], p["mode"] or "", p["transport"] or "",
                         human(p["stored_bytes"] or 0), ", ".join(p.get("repositories") or [p["repository"]])),
              params={"vm": name})


def follow(api: ApiClient, path: str, run: dict[str, Any], label: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Poll ``path`` until the run a proxy does (a restore, a repository's maintenance) has ended,
    showing the bytes it reports into its row."""
    with byte_bars() as bars:
        bar = bars.add_task(label(run), total=None)
        while run["status"] in ("queued", "running"):
            time.sleep(1)
            run = api.call("GET", path)
            bars.update(bar, completed=run["progress_bytes"] or 0, total=run["total_bytes"] or None,
                        description=label(run))
    return dict(run)


def server_restore(ctx: typer.Context, vm: str, point: str | None, hypervisor: str | None, as_name: str | None,
                   overwrite: bool, disk: str | None, storage: str | None, start: bool, json_out: bool,
                   place: dict[str, str] | None = None, repository: str | None = None) -> None:
    """`vmkeep --server URL restore VM[@POINT] --hypervisor H --as NEW|--overwrite`, followed to its end;
    ``place``: --network, --esx-host (the API's host), --folder of a new VM; ``repository``: read only it."""
    if not server_options(ctx)[0]:
        raise UsageError("give --repo REPO to restore here, or --server URL to have a proxy do it")
    if disk is not None:
        raise UsageError("single-disk restores run here: give --repo REPO with --disk and --output")
    if hypervisor is None:
        raise UsageError("through a server, say where: --hypervisor NAME (see `vmkeep --server URL hypervisor list`)")
    api = client(ctx)
    job = api.call("POST", "/api/restores", json={"vm": vm, "point": point, "hypervisor": hypervisor,
                                                  "as_name": as_name, "overwrite": overwrite, "storage": storage,
                                                  "start": start, "repository": repository, **(place or {})})
    # the proxy reports bytes written into the restore's row every second
    job = follow(api, f"/api/restores/{job['id']}", job,
                 lambda j: f"restoring {vm}@{j['point']}" + (f" on {j['proxy']}" if j["proxy"] else ""))
    if json_out:
        emit_json(job)
    elif job["status"] == "succeeded":
        copy = job.get("restored_from")
        out_console.print(f"restored {vm}@{job['point']} → {job['new_name'] or vm} (by proxy {job['proxy']}"
                          + (f", from the copy in {copy}" if copy and copy != job["repository"] else "") + ")")
    if job["status"] != "succeeded":
        raise VmkeepError(f"the restore failed on proxy {job['proxy']}: {job['error']}")
