"""`vmkeep logout|whoami`, `vmkeep token …` (through the server) and `vmkeep audit list|verify`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from vmkeep.cli.catalog_cmds import DatabaseOpt
from vmkeep.cli.client_cmds import client, say, show_list
from vmkeep.cli.common import JsonOpt
from vmkeep.cli.output import emit_json, out_console
from vmkeep.cli.user_cmds import through_server
from vmkeep.errors import UsageError

token_app = typer.Typer(help="Your API tokens on the server (an administrator's: everyone's).", no_args_is_help=True)
audit_app = typer.Typer(help="The master's audit log.", no_args_is_help=True)


def logout_cmd(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Revoke the token in use on the server and forget it here."""
    from vmkeep.client import forget_token

    api = client(ctx)
    api.call("POST", "/api/auth/logout")
    forgotten = forget_token(api.server)
    say(json_out, {"logged_out": api.server, "forgotten": forgotten},
        f"logged out of {api.server}" + ("" if forgotten else " (the token came from VMKEEP_TOKEN: it no longer "
                                                               "works)"))


def whoami_cmd(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Who the server takes you for: your name and role."""
    api = client(ctx)
    me = api.call("GET", "/api/me")
    say(json_out, {**me, "server": api.server}, f"{me['name']} ({me['role']}) on {api.server}")


def _write_new(path: Path, token: str) -> None:
    """``token`` into a new file only its owner reads (a proxy's --token-file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise UsageError(f"--output {path}: {exc.strerror}; name a new file") from None
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")


@token_app.command("create")
def token_create_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="What the token is for, e.g. proxy-p1 or nightly-report")],
    days: Annotated[int | None, typer.Option(min=1, max=3650, help="Lifetime [default: the server's longest, "
                                                                    "365 days unless it says otherwise]")] = None,
    user: Annotated[str | None, typer.Option(help="Make it for this account (e.g. a proxy's): logs in as it "
                                                  "with VMKEEP_PASSWORD, or asks")] = None,
    output: Annotated[Path | None, typer.Option(help="Write the token into this new file (0600) instead of "
                                                     "printing it: a proxy's --token-file")] = None,
    json_out: JsonOpt = False,
) -> None:
    """A named API token for a script or a proxy, shown (or written) once.

    The server keeps just its SHA-256."""
    api = client(ctx)
    if user is not None:  # the API makes tokens for the caller: be that account for a moment
        from vmkeep.client import ApiClient
        from vmkeep.settings import secret, settings

        password = secret(settings().password) or typer.prompt(f"password of {user}", hide_input=True)
        login = api.call("POST", "/api/auth/login", json={"name": user, "password": password})["token"]
        api = ApiClient(api.server, api.ca_file, token=login)
    try:
        made = api.call("POST", "/api/tokens", json={"name": name, "days": days})
    finally:
        if user is not None:
            api.call("POST", "/api/auth/logout")
    shown: dict[str, Any] = {"name": name, "user": user or api.call("GET", "/api/me")["name"],
                             "expires": made["expires"], "token": made["token"]}
    if output is not None:
        _write_new(output, made["token"])
        shown = {**shown, "token": None, "file": str(output)}
    if json_out:
        emit_json(shown)
        return
    where = f"written to {output}" if output else made["token"]
    out_console.print(f"token {name} of {shown['user']}, valid until {made['expires'][:19]}: {where}",
                      highlight=False, soft_wrap=True)
    out_console.print("It is shown only this once: keep it now (the server stores only its hash).", highlight=False)


@token_app.command("list")
def token_list_cmd(ctx: typer.Context, everyone: Annotated[bool, typer.Option(
        "--all", help="Every user's tokens (administrators)")] = False, json_out: JsonOpt = False) -> None:
    """Unexpired tokens: id, name, user, when made, when they expire, last used."""
    show_list(ctx, "/api/tokens", "tokens", json_out, ("id", "name", "user", "created", "expires", "last used", ""),
              lambda t: (str(t["id"]), t["name"], t["user"], t["created"][:19], t["expires"][:19],
                         (t["last_used"] or "never")[:19], "this one" if t["current"] else ""),
              params={"all": everyone})


@token_app.command("revoke")
def token_revoke_cmd(ctx: typer.Context, token_id: Annotated[int, typer.Argument(help="Id from `token list`")],
                     json_out: JsonOpt = False) -> None:
    """Revoke a token: it stops working at once."""
    client(ctx).call("DELETE", f"/api/tokens/{token_id}")
    say(json_out, {"revoked": token_id}, f"token {token_id} revoked")


@audit_app.command("list")
def audit_list_cmd(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option(help="Only this user's entries")] = None,
    action: Annotated[str | None, typer.Option(help="Only this action, e.g. login-failed, user-delete")] = None,
    since: Annotated[str | None, typer.Option(help="From this time on, ISO 8601: 2026-12-01 or "
                                                   "2026-12-01T08:00:00Z")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 100,
    json_out: JsonOpt = False,
) -> None:
    """The audit log through the server (administrators and auditors), newest first."""
    show_list(ctx, "/api/audit", "entries", json_out, ("at", "user", "action", "target", "client", "detail"),
              lambda e: (e["at"][:19], e["user"], e["action"], e["target"], e["client"] or "",
                         ", ".join(f"{k}={v}" for k, v in e["detail"].items())),
              params={"user": user, "action": action, "since": since, "limit": limit})


@audit_app.command("verify")
def audit_verify_cmd(ctx: typer.Context, database_url: DatabaseOpt = None, json_out: JsonOpt = False) -> None:
    """Check the audit log's hash chain; exit 1 when it does not hold.

    Names every entry altered, and where entries were removed. Through --server (administrators
    and auditors), else on the master's catalog."""
    if through_server(ctx, database_url):
        report = client(ctx).call("GET", "/api/audit/verify")
    else:
        from vmkeep.catalog.audit_chain import verify_chain
        from vmkeep.catalog.db import database_url as resolve
        from vmkeep.catalog.db import sessions
        from vmkeep.server.audit import chain_rows

        with sessions(resolve(database_url))() as session:
            checked = verify_chain(chain_rows(session))
        report = {"entries": checked.entries, "ok": checked.ok, "problems": checked.problems, "head": checked.head}
    if json_out:
        emit_json(report)
    else:
        for problem in report["problems"]:
            out_console.print(f"[red]{escape(problem)}[/red]", highlight=False)
        out_console.print(f"{report['entries']} audit entries: " + ("the chain holds" if report["ok"] else
                                                                    f"{len(report['problems'])} problems")
                          + f"; newest hash {report['head']}")
    if not report["ok"]:
        raise typer.Exit(1)
