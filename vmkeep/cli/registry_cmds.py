"""`vmkeep --server URL repository list|add|rebuild|delete`: the repositories a server backs up into
(`vmkeep repo …` works on a repository itself, without a server)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from vmkeep.cli.client_cmds import client, say, show_list
from vmkeep.cli.common import JsonOpt, PassFile, S3Endpoint
from vmkeep.cli.output import emit_json, human, out_console

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
