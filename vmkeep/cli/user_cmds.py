"""`vmkeep user add|list|delete`: accounts of the master server.

Through the server's API when one is named (--server or VMKEEP_SERVER) and no --database-url is
given, with an administrator's login; otherwise directly on the catalog, as root on the master
does for the first administrator (or to let someone in again who lost every admin login).
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from rich.table import Table

from vmkeep.cli.catalog_cmds import DatabaseOpt
from vmkeep.cli.client_cmds import client, say, server_options
from vmkeep.cli.common import JsonOpt
from vmkeep.cli.output import emit_json, out_console
from vmkeep.errors import UsageError

user_app = typer.Typer(help="Accounts of the master server: through --server (an administrator's login), or on "
                            "the catalog with --database-url (the first administrator).", no_args_is_help=True)
Name = Annotated[str, typer.Argument(help="Login name")]


def through_server(ctx: typer.Context, database_url: str | None) -> bool:
    """Whether to use the API: a server is named and the catalog is not."""
    return database_url is None and bool(server_options(ctx)[0])


def _local_actor() -> str:
    return f"local:{os.environ.get('USER', 'root')}"


@user_app.command("add")
def user_add_cmd(
    ctx: typer.Context,
    name: Name,
    role: Annotated[str, typer.Option(
        help="admin, operator, restore-only, auditor, or proxy (for `vmkeep proxy`)")] = "admin",
    database_url: DatabaseOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Create an account; password from VMKEEP_NEW_PASSWORD or asked for.

    A proxy's account then gets its token from `vmkeep token create NAME --user ACCOUNT`."""
    from vmkeep.server.auth import ROLES
    from vmkeep.settings import secret, settings

    if role not in ROLES:
        raise UsageError(f"--role must be one of {', '.join(ROLES)}")
    password = secret(settings().new_password) or typer.prompt("password", hide_input=True, confirmation_prompt=True)
    if len(password) < 8:
        raise UsageError("the password needs at least 8 characters")
    if through_server(ctx, database_url):
        client(ctx).call("POST", "/api/users", json={"name": name, "password": password, "role": role})
    else:
        _add_to_catalog(database_url, name, role, password)
    say(json_out, {"user": name, "role": role}, f"user {name} ({role}) created")


def _add_to_catalog(database_url: str | None, name: str, role: str, password: str) -> None:
    from sqlalchemy import select

    from vmkeep.catalog.db import database_url as resolve
    from vmkeep.catalog.db import sessions
    from vmkeep.catalog.models import User
    from vmkeep.server.audit import record
    from vmkeep.server.auth import hash_password

    with sessions(resolve(database_url))() as session:
        if session.scalar(select(User).where(User.name == name)) is not None:
            raise UsageError(f"user {name} exists")
        session.add(User(name=name, role=role, password_hash=hash_password(password)))
        record(session, None, _local_actor(), "user-create", name, role=role)
        session.commit()


@user_app.command("list")
def user_list_cmd(ctx: typer.Context, database_url: DatabaseOpt = None, json_out: JsonOpt = False) -> None:
    """The accounts and their roles."""
    if through_server(ctx, database_url):
        users: list[dict[str, Any]] = client(ctx).call("GET", "/api/users")
    else:
        from sqlalchemy import select

        from vmkeep.catalog.db import database_url as resolve
        from vmkeep.catalog.db import sessions
        from vmkeep.catalog.models import User

        with sessions(resolve(database_url))() as session:
            users = [{"name": u.name, "role": u.role, "disabled": u.disabled, "created": u.created.isoformat()}
                     for u in session.scalars(select(User).order_by(User.name))]
    if json_out:
        emit_json({"users": users})
        return
    table = Table("name", "role", "created", "")
    for u in users:
        table.add_row(u["name"], u["role"], u["created"][:19], "disabled" if u["disabled"] else "")
    out_console.print(table)


@user_app.command("delete")
def user_delete_cmd(ctx: typer.Context, name: Name, database_url: DatabaseOpt = None,
                    json_out: JsonOpt = False) -> None:
    """Remove an account; its tokens stop working at once.

    An administrator may remove another one, never their own account nor the last administrator."""
    if through_server(ctx, database_url):
        client(ctx).call("DELETE", f"/api/users/{name}")
    else:
        _delete_from_catalog(database_url, name)
    say(json_out, {"deleted": name}, f"user {name} deleted")


def _delete_from_catalog(database_url: str | None, name: str) -> None:
    from sqlalchemy import select

    from vmkeep.catalog.db import database_url as resolve
    from vmkeep.catalog.db import sessions
    from vmkeep.catalog.models import User
    from vmkeep.server.accounts import removal_refused
    from vmkeep.server.audit import record

    with sessions(resolve(database_url))() as session:
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            raise UsageError(f"no user {name}")
        refused = removal_refused(session, user, None)
        if refused:
            raise UsageError(f"user {name} stays: {refused}")
        session.delete(user)
        record(session, None, _local_actor(), "user-delete", name)
        session.commit()
