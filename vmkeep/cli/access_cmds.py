"""`vmkeep token …` (through the server) and `vmkeep audit verify` (on the master's catalog)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from vmkeep.cli.catalog_cmds import DatabaseOpt
from vmkeep.cli.client_cmds import client
from vmkeep.cli.common import JsonOpt
from vmkeep.cli.output import emit_json, out_console, uncut

token_app = typer.Typer(help="Your API tokens on the server (an administrator's: everyone's).", no_args_is_help=True)
audit_app = typer.Typer(help="The master's audit log.", no_args_is_help=True)


@token_app.command("list")
def token_list_cmd(ctx: typer.Context, everyone: Annotated[bool, typer.Option(
        "--all", help="Every user's tokens (administrators)")] = False, json_out: JsonOpt = False) -> None:
    """Unexpired tokens: id, name, user, when made, when they expire, last used."""
    tokens = client(ctx).call("GET", "/api/tokens", params={"all": everyone})
    if json_out:
        emit_json({"tokens": tokens})
        return
    table = Table("id", "name", "user", "created", "expires", "last used", "")
    for t in tokens:
        table.add_row(str(t["id"]), t["name"], t["user"], t["created"][:19], t["expires"][:19],
                      (t["last_used"] or "never")[:19], "this one" if t["current"] else "")
    out_console.print(uncut(table))


@token_app.command("revoke")
def token_revoke_cmd(ctx: typer.Context, token_id: Annotated[int, typer.Argument(help="Id from `token list`")],
                     json_out: JsonOpt = False) -> None:
    """Revoke a token: it stops working at once."""
    client(ctx).call("DELETE", f"/api/tokens/{token_id}")
    if json_out:
        emit_json({"revoked": token_id})
    else:
        out_console.print(f"token {token_id} revoked")


@audit_app.command("verify")
def audit_verify_cmd(database_url: DatabaseOpt = None, json_out: JsonOpt = False) -> None:
    """Check the audit log's hash chain: names every entry altered, and where entries were removed.
    Exit 1 when it does not hold."""
    from vmkeep.catalog.audit_chain import verify_chain
    from vmkeep.catalog.db import database_url as resolve
    from vmkeep.catalog.db import sessions
    from vmkeep.server.audit import chain_rows

    with sessions(resolve(database_url))() as session:
        report = verify_chain(chain_rows(session))
    if json_out:
        emit_json({"entries": report.entries, "ok": report.ok, "problems": report.problems, "head": report.head})
    else:
        for problem in report.problems:
            out_console.print(f"[red]{problem}[/red]", highlight=False)
        out_console.print(f"{report.entries} audit entries: " + ("the chain holds" if report.ok else
                                                                 f"{len(report.problems)} problems")
                          + f"; newest hash {report.head}")
    if not report.ok:
        raise typer.Exit(1)
