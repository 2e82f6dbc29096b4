"""`vmkeep --server URL repository list|add|rebuild|delete|verify|prune|gc`: the repositories a server
backs up into, and their maintenance run by its proxies (`vmkeep repo …` works on a repository
itself, without a server)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from vmkeep.cli.client_cmds import client, follow, say, show_list
from vmkeep.cli.common import JsonOpt, PassFile, S3Endpoint
from vmkeep.cli.output import emit_json, human, out_console
from vmkeep.errors import VmkeepError

repository_app = typer.Typer(help="Repositories registered on the server (`vmkeep repo` is the local tool).",
                             no_args_is_help=True)
Name = Annotated[str, typer.Argument(help="The repository's name on the server")]


def _imported(report: dict[str, Any], verb: str) -> str:
    """A rebuild's report as a line, then each damaged point on its own."""
    lines = [f"repository {report['repository']} {verb}: {report['points']} restore points in the catalog, "
             f"{report['removed']} gone from it"]
    lines += [f"[red]damaged:[/red] {escape(d['key'])}: {escape(d['reason'])}" for d in report["damaged"]]
    return "\n".join(lines)


@repository_app.command("add")
def repository_add_cmd(
    ctx: typer.Context, name: Name,
    location: Annotated[str, typer.Argument(help="The repository as the server (and its proxies) reach it: a "
                                                 "directory or s3://BUCKET/PREFIX")],
    passphrase_file: PassFile = None,
    s3_endpoint: S3Endpoint = None,
    json_out: JsonOpt = False,
) -> None:
    """Register an existing repository and import its restore points.

    An encrypted one's passphrase (from --passphrase-file or VMKEEP_PASSPHRASE) is sealed by the
    server for its proxies."""
    from vmkeep.repository.kdf import read_passphrase

    passphrase = read_passphrase(passphrase_file)
    body = {"name": name, "location": location, "s3_endpoint": s3_endpoint,
            "passphrase": passphrase.decode() if passphrase else None}
    report = client(ctx).call("POST", "/api/repositories", json=body)
    if json_out:
        emit_json(report)
    else:
        out_console.print(_imported(report, "registered"), highlight=False, soft_wrap=True)


@repository_app.command("list")
def repository_list_cmd(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """The registered repositories: where, encrypted or not, points, space used."""
    show_list(ctx, "/api/repositories", "repositories", json_out,
              ("name", "location", "encrypted", "points", "used", "capacity", "scanned"),
              lambda r: (r["name"], r["location"], "yes" if r["encrypted"] else "no", str(r["points"]),
                         human(r["used_bytes"]) if r["used_bytes"] is not None else "",
                         human(r["capacity_bytes"]) if r["capacity_bytes"] is not None else "",
                         (r["scanned_at"] or "")[:19]))


@repository_app.command("rebuild")
def repository_rebuild_cmd(ctx: typer.Context, name: Name, json_out: JsonOpt = False) -> None:
    """Import the repository's restore points again (it stays the source of truth).

    E.g. after `vmkeep repo prune` or `gc` ran on it directly."""
    report = client(ctx).call("POST", f"/api/repositories/{name}/rebuild")
    if json_out:
        emit_json(report)
    else:
        out_console.print(_imported(report, "rebuilt"), highlight=False, soft_wrap=True)


@repository_app.command("delete")
def repository_delete_cmd(ctx: typer.Context, name: Name, json_out: JsonOpt = False) -> None:
    """Remove a repository from the server's catalog; the repository itself is untouched.

    Registering it again brings its points back. Refused while a policy, a run or a restore uses
    it."""
    client(ctx).call("DELETE", f"/api/repositories/{name}")
    say(json_out, {"deleted": name}, f"repository {name} removed from the catalog (its data is untouched)")


def _maintained(ctx: typer.Context, name: str, kind: str, json_out: bool, body: dict[str, Any] | None = None,
                ) -> dict[str, Any]:
    """Start a maintenance run on the server (a proxy does it) and follow it to its end."""
    api = client(ctx)
    run = api.call("POST", f"/api/repositories/{name}/{kind}", **({"json": body} if body is not None else {}))
    # verify reports the bytes it has read into the run's row every second
    run = follow(api, f"/api/maintenance/{run['id']}", run, lambda r: f"{kind} of {name} on {r['proxy']}")
    if json_out:
        emit_json(run)
    if run["status"] != "succeeded":
        raise VmkeepError(f"the {kind} of {name} failed on proxy {run['proxy']} (run {run['id']}): {run['error']}")
    return run


@repository_app.command("verify")
def repository_verify_cmd(ctx: typer.Context, name: Name, json_out: JsonOpt = False) -> None:
    """Have a proxy re-read every chunk the repository's points use; names bad chunks and broken points."""
    run = _maintained(ctx, name, "verify", json_out)
    report = run["result"]
    if not json_out:
        out_console.print(f"run {run['id']}: checked {report['chunks_checked']} chunks "
                          f"({human(report['bytes_checked'])}) in {report['points']} points: "
                          + ("[green]intact[/green]" if report["ok"] else "[red]DAMAGED[/red]"))
        for cid, why in report["bad_chunks"].items():
            out_console.print(f"  bad chunk {cid}: {escape(why)}", highlight=False, soft_wrap=True)
        for point, whys in report["broken_points"].items():
            out_console.print(f"  broken point {point}: {escape('; '.join(whys))}", highlight=False, soft_wrap=True)
    if not report["ok"]:
        raise typer.Exit(1)


@repository_app.command("prune")
def repository_prune_cmd(
    ctx: typer.Context, name: Name,
    confirm: Annotated[int | None, typer.Option(help="Remove what this dry run (its run id) listed")] = None,
    json_out: JsonOpt = False,
) -> None:
    """List the points the retention of the policies backing up into it would remove (a dry run),
    or with --confirm RUN remove what that dry run listed. Run gc afterwards to free the space."""
    run = _maintained(ctx, name, "prune", json_out, {"dry_run": confirm is None, "confirm": confirm})
    report = run["result"]
    if json_out:
        return
    verb = "would remove" if report["dry_run"] else "removed"
    for vm, n in report["names"].items():
        out_console.print(f"{vm}: keep {len(n['keep'])}, {verb} {len(n['remove'])}: {' '.join(n['remove'])}")
    if report["unmanaged"]:
        out_console.print(f"left alone (no policy's retention covers them): {', '.join(report['unmanaged'])}")
    out_console.print(f"run {run['id']}: {verb} {report['points_removed']} points; gc then frees "
                      f"{human(report['frees_bytes'])}" + (f" — to do it: vmkeep repository prune {name} --confirm "
                                                            f"{run['id']}" if report["dry_run"] and
                                                           report["points_removed"] else ""))


@repository_app.command("gc")
def repository_gc_cmd(ctx: typer.Context, name: Name, json_out: JsonOpt = False) -> None:
    """Have a proxy delete the chunks no point uses (safe while backups run)."""
    run = _maintained(ctx, name, "gc", json_out)
    if not json_out:
        r = run["result"]
        out_console.print(f"run {run['id']}: freed {human(r['bytes_freed'])} in {r['chunks_deleted']} chunks "
                          f"({r['chunks_live']} live, {r['chunks_kept_recent']} kept for running backups)")


@repository_app.command("copy")
def repository_copy_cmd(
    ctx: typer.Context, name: Name,
    target: Annotated[str, typer.Argument(help="The registered repository to copy into")],
    names: Annotated[str | None, typer.Option("--name", help="Only points whose name matches this glob")] = None,
    point: Annotated[str | None, typer.Option(help="Only this point (id or unique id prefix)")] = None,
    latest: Annotated[int | None, typer.Option(min=1, help="Only the newest N points of each name")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Re-read what the copy wrote in the target")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Have a proxy copy restore points of this repository into another; only what the target lacks
    travels, and the catalog lists the copies (`vmkeep --server URL points`)."""
    run = _maintained(ctx, name, "copy", json_out, {"target": target, "names": names, "point": point,
                                                    "latest": latest, "verify": verify})
    if not json_out:
        r = run["result"]
        out_console.print(f"run {run['id']}: {len(r['points_copied'])} points copied into {target} "
                          f"({human(r['bytes_sent'])} sent, {r['mode']}), {len(r['points_present'])} there already"
                          + (f"; no longer in {name}: {', '.join(r['missing'])}" if r.get("missing") else ""))
