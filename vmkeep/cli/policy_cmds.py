"""`vmkeep --server URL policy create|update|run|list|delete|copy-to|replicate-to|replicas`: backup policies on
the server."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.live import Live

from vmkeep.cli.client_cmds import client, job_table, say, show_list
from vmkeep.cli.common import JsonOpt
from vmkeep.cli.output import emit_json, out_console
from vmkeep.client import ApiClient
from vmkeep.errors import UsageError, VmkeepError

policy_app = typer.Typer(help="Backup policies on the server.", no_args_is_help=True)

Name = Annotated[str, typer.Argument(help="The policy's name")]
Vms = Annotated[str | None, typer.Option(help="Comma-separated VM names ('' for none)")]
Globs = Annotated[str | None, typer.Option(help="Comma-separated name globs, e.g. web-* ('' for none)")]
Hypervisor = Annotated[str | None, typer.Option(help="Only this hypervisor's VMs ('' for any)")]
Schedule = Annotated[str | None, typer.Option(help="cron, UTC: '0 22 * * *' ('' for none: runs on demand)")]
Keep = Annotated[int | None, typer.Option(min=0, help="Points to keep (0: this rule off)")]
FullEvery = Annotated[int | None, typer.Option(min=0, help="A full backup every N runs (0: only when needed)")]
Limit = Annotated[int | None, typer.Option(min=0, help="This run's backups at once (0: no limit)")]
Verify = Annotated[bool | None, typer.Option("--verify-after/--no-verify-after",
                                             help="Re-read every chunk of each new point")]
Boot = Annotated[bool | None, typer.Option("--verify-boot/--no-verify-boot",
                                           help="Boot each new point in a sandbox and wait for its heartbeat")]
# what a new policy gets for what its options leave out (the API's defaults)
NEW: dict[str, Any] = {"vms": [], "globs": [], "hypervisor": None, "schedule": None, "retention": {},
                       "full_every": None, "transports": "san:hotadd:nbd", "quiesce": "try", "max_per_host": None,
                       "max_per_datastore": None, "max_per_proxy": None, "verify_after": False, "verify_boot": False}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _body(base: dict[str, Any], keep: dict[str, int | None], **given: Any) -> dict[str, Any]:
    """``base`` with the options given on the command line: lists from commas, an empty text or a 0
    clears the field; --keep-* change only their own retention rule."""
    body = {k: v for k, v in base.items() if k not in ("next_run", "created")}
    for key, value in given.items():
        if value is None:
            continue
        if key in ("vms", "globs"):
            value = _csv(value)
        body[key] = value if value not in ("", 0) or isinstance(value, bool) else None
    retention = {**body["retention"], **{k: v for k, v in keep.items() if v is not None}}
    body["retention"] = {k: v for k, v in retention.items() if v}
    return body


@policy_app.command("create")
def policy_create_cmd(
    ctx: typer.Context, name: Name,
    repository: Annotated[str, typer.Option(help="Registered repository name (vmkeep repository list)")],
    vms: Vms = None, globs: Globs = None, hypervisor: Hypervisor = None, schedule: Schedule = None,
    keep_last: Keep = None, keep_daily: Keep = None, keep_weekly: Keep = None, keep_monthly: Keep = None,
    full_every: FullEvery = None,
    transports: Annotated[str | None, typer.Option(help="In order of preference [default: san:hotadd:nbd]")] = None,
    quiesce: Annotated[str | None, typer.Option(help="required, try or off [default: try]")] = None,
    max_per_host: Limit = None, max_per_datastore: Limit = None, max_per_proxy: Limit = None,
    verify_after: Verify = None, verify_boot: Boot = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a policy: which VMs, where, when, how long to keep."""
    body = _body({**NEW, "name": name}, {"last": keep_last, "daily": keep_daily, "weekly": keep_weekly,
                                         "monthly": keep_monthly},
                 repository=repository, vms=vms, globs=globs, hypervisor=hypervisor, schedule=schedule,
                 full_every=full_every, transports=transports, quiesce=quiesce, max_per_host=max_per_host,
                 max_per_datastore=max_per_datastore, max_per_proxy=max_per_proxy, verify_after=verify_after,
                 verify_boot=verify_boot)
    created = client(ctx).call("POST", "/api/policies", json=body)
    if json_out:
        emit_json(created)
    else:
        out_console.print(f"policy {name} created" + (f", next run {created['next_run']}" if created["next_run"]
                                                       else ""))


@policy_app.command("update")
def policy_update_cmd(
    ctx: typer.Context, name: Name,
    repository: Annotated[str | None, typer.Option(help="Back up into this registered repository from now on")]
    = None,
    vms: Vms = None, globs: Globs = None, hypervisor: Hypervisor = None, schedule: Schedule = None,
    keep_last: Keep = None, keep_daily: Keep = None, keep_weekly: Keep = None, keep_monthly: Keep = None,
    full_every: FullEvery = None,
    transports: Annotated[str | None, typer.Option(help="In order of preference, e.g. hotadd:nbd")] = None,
    quiesce: Annotated[str | None, typer.Option(help="required, try or off")] = None,
    max_per_host: Limit = None, max_per_datastore: Limit = None, max_per_proxy: Limit = None,
    verify_after: Verify = None, verify_boot: Boot = None,
    json_out: JsonOpt = False,
) -> None:
    """Change the options given; the rest stays.

    Runs under way keep their VMs, the next run uses the new settings."""
    api = client(ctx)
    body = _body(_current(api, name), {"last": keep_last, "daily": keep_daily, "weekly": keep_weekly,
                                       "monthly": keep_monthly},
                 repository=repository, vms=vms, globs=globs, hypervisor=hypervisor, schedule=schedule,
                 full_every=full_every, transports=transports, quiesce=quiesce, max_per_host=max_per_host,
                 max_per_datastore=max_per_datastore, max_per_proxy=max_per_proxy, verify_after=verify_after,
                 verify_boot=verify_boot)
    changed = api.call("PUT", f"/api/policies/{name}", json=body)
    if json_out:
        emit_json(changed)
    else:
        out_console.print(f"policy {name} updated" + (f", next run {changed['next_run']}" if changed["next_run"]
                                                       else ""))


def _current(api: ApiClient, name: str) -> dict[str, Any]:
    """The policy as the server has it."""
    current = next((p for p in api.call("GET", "/api/policies") if p["name"] == name), None)
    if current is None:
        raise VmkeepError(f"no policy {name} on {api.server}: see `vmkeep --server {api.server} policy list`")
    return dict(current)


@policy_app.command("copy-to")
def policy_copy_to_cmd(
    ctx: typer.Context, name: Name,
    repository: Annotated[str, typer.Argument(help="Registered repository the points are copied into")],
    when: Annotated[str, typer.Option(help="after-backup (right after each run) or a cron schedule, UTC")]
    = "after-backup",
    keep_last: Keep = None, keep_daily: Keep = None, keep_weekly: Keep = None, keep_monthly: Keep = None,
    keep_yearly: Keep = None,
    remove: Annotated[bool, typer.Option("--remove", help="Stop copying there (the copies made stay)")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Copy the policy's points into another repository (after each run's backups, or on a cron),
    kept there by their own retention (--keep-*; none: every copy is kept). Given again, it
    replaces that target's settings."""
    api = client(ctx)
    current = _current(api, name)
    targets = [{k: t[k] for k in ("repository", "when", "retention")} for t in current["copy_targets"]
               if t["repository"] != repository]
    if not remove:
        keep = {"last": keep_last, "daily": keep_daily, "weekly": keep_weekly, "monthly": keep_monthly,
                "yearly": keep_yearly}
        targets.append({"repository": repository, "when": when, "retention": {k: v for k, v in keep.items() if v}})
    changed = api.call("PUT", f"/api/policies/{name}", json={**_body(current, {}), "copy_targets": targets})
    if json_out:
        emit_json(changed)
    else:
        out_console.print(f"policy {name} copies to: " + (", ".join(
            f"{t['repository']} ({t['when']})" for t in changed["copy_targets"]) or "nowhere"))


@policy_app.command("replicate-to")
def policy_replicate_to_cmd(
    ctx: typer.Context, name: Name,
    hypervisor: Annotated[str | None, typer.Argument(help="Registered libvirt hypervisor the replicas are kept on")]
    = None,
    storage: Annotated[str | None, typer.Option(help="Where new replicas' disks go on the host (inside its restore "
                                                     "locations), or a pool")] = None,
    network: Annotated[str | None, typer.Option(help="The replicas' network; 'none': no interfaces")] = None,
    replica_name: Annotated[str, typer.Option("--name", help="Each replica VM's name, {vm} the VM's")] = "{vm}-replica",
    remove: Annotated[bool, typer.Option("--remove", help="Stop keeping replicas (the replica VMs stay)")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Keep a powered-off replica of each of the policy's VMs on a libvirt host, brought to each
    run's new point by writing only what changed (vmkeep failover/failback start and copy back)."""
    if not remove and hypervisor is None:
        raise UsageError("name the hypervisor the replicas are kept on, or give --remove")
    body = {"hypervisor": None} if remove else {"hypervisor": hypervisor, "storage": storage, "network": network,
                                                "name": replica_name}
    changed = client(ctx).call("PUT", f"/api/policies/{name}/replica", json=body)
    say(json_out, changed, f"policy {name} keeps replicas on {changed['hypervisor']}" if changed["hypervisor"]
        else f"policy {name} keeps no replicas")


@policy_app.command("replicas")
def policy_replicas_cmd(ctx: typer.Context,
                        name: Annotated[str | None, typer.Argument(help="Only this policy's replicas")] = None,
                        vm: Annotated[str | None, typer.Option(help="Only this VM's replicas")] = None,
                        json_out: JsonOpt = False) -> None:
    """The replicas the server keeps: where, at which point, in which state, and their last sync."""
    show_list(ctx, "/api/replicas", "replicas", json_out,
              ("VM", "replica", "host", "point", "state", "last sync", "written"),
              lambda r: (r["vm"], r["replica"], r["hypervisor"], r["point"] or "", r["state"] or "",
                         r["status"] + (f": {r['error']}" if r["error"] else ""), str(r["bytes_written"] or 0)),
              params={"policy": name, "vm": vm})


@policy_app.command("run")
def policy_run_cmd(ctx: typer.Context, name: Name,
                   wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the run to its end")] = True,
                   json_out: JsonOpt = False) -> None:
    """Start a run now; with --wait (default), show each VM's progress until the run ends."""
    api = client(ctx)
    job = api.call("POST", f"/api/policies/{name}/run")
    if wait:
        with Live(job_table(job), console=out_console, auto_refresh=False, transient=json_out) as live:
            while not job["finished"]:
                time.sleep(1)
                job = api.call("GET", f"/api/jobs/{job['id']}")
                live.update(job_table(job), refresh=True)
    if json_out:
        emit_json(job)
    if wait and job["status"] != "succeeded":
        raise VmkeepError(f"run {job['id']} of {name} ended {job['status']}")


@policy_app.command("list")
def policy_list_cmd(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """The policies: what they back up, where, when they run next."""
    show_list(ctx, "/api/policies", "policies", json_out,
              ("name", "repository", "VMs", "schedule", "next run", "keep", "copies to"),
              lambda p: (p["name"], p["repository"], ", ".join(p["vms"] + p["globs"]) or "all", p["schedule"] or "",
                         (p["next_run"] or "")[:19], ", ".join(f"{k} {v}" for k, v in p["retention"].items()),
                         ", ".join(t["repository"] for t in p.get("copy_targets", []))))


@policy_app.command("delete")
def policy_delete_cmd(ctx: typer.Context, name: Name, json_out: JsonOpt = False) -> None:
    """Delete a policy (refused while one of its runs goes); its run history and points stay."""
    client(ctx).call("DELETE", f"/api/policies/{name}")
    if json_out:
        emit_json({"deleted": name})
    else:
        out_console.print(f"policy {name} deleted")
