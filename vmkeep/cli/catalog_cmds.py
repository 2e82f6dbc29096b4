"""`vmkeep db …` and `vmkeep catalog …`: the master's catalog database.

SQLAlchemy and Alembic load inside the commands, so the local commands start without them.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from vmkeep.cli.common import JsonOpt, KeyFile, PassFile, RepoOpt, S3Endpoint, open_repository
from vmkeep.cli.output import emit_json, human, out_console, uncut

DatabaseOpt = Annotated[str | None, typer.Option(
    "--database-url",  # else catalog.db.database_url reads VMKEEP_DATABASE_URL
    help="postgresql+psycopg://USER:PASS@HOST/DB (else VMKEEP_DATABASE_URL, else the set-up's local one)")]

db_app = typer.Typer(help="The catalog database's schema.", no_args_is_help=True)
catalog_app = typer.Typer(help="The catalog of restore points across repositories.", no_args_is_help=True)


@db_app.command("upgrade")
def upgrade_cmd(revision: Annotated[str, typer.Argument(help="Target revision")] = "head",
                database_url: DatabaseOpt = None, json_out: JsonOpt = False) -> None:
    """Create or migrate the catalog schema (Alembic), idempotently."""
    from vmkeep.catalog.db import database_url as resolve
    from vmkeep.catalog.db import head_revision, upgrade
    from vmkeep.catalog.proxy_role import ensure_proxy_role, proxy_role_name
    from vmkeep.jobs.keys import proxy_role_password

    url = resolve(database_url)
    now = upgrade(url, revision)
    role = None
    if now == head_revision(url):  # the grants name the newest schema's tables and views
        role = ensure_proxy_role(url, proxy_role_password(proxy_role_name(url)))
    if json_out:
        emit_json({"revision": now, "proxy_role": role})
    else:
        out_console.print(f"catalog schema at revision {now}" + (f"; proxies log in as {role}" if role else ""))


@db_app.command("proxy-role-sql")
def proxy_role_sql_cmd(database_url: DatabaseOpt = None) -> None:
    """Print the statement that creates the proxies' database role, for a superuser to run once
    (`… | runuser -u postgres -- psql -d DB`), so the catalog's login needs no CREATEROLE."""
    from vmkeep.catalog.db import database_url as resolve
    from vmkeep.catalog.proxy_role import create_role_sql, proxy_role_name
    from vmkeep.jobs.keys import proxy_role_password

    role = proxy_role_name(resolve(database_url))
    print(create_role_sql(role, proxy_role_password(role)))


@catalog_app.command("rebuild")
def rebuild_cmd(repo: RepoOpt, name: Annotated[str | None, typer.Option(help="Name for the repository")] = None,
                passphrase_file: PassFile = None, key_file: KeyFile = None, s3_endpoint: S3Endpoint = None,
                database_url: DatabaseOpt = None, json_out: JsonOpt = False) -> None:
    """Re-import a repository's restore points into the catalog (the repository is authoritative)."""
    from vmkeep.catalog.db import database_url as resolve
    from vmkeep.catalog.db import sessions
    from vmkeep.catalog.rebuild import rebuild

    r = open_repository(repo, passphrase_file, key_file, s3_endpoint)
    with sessions(resolve(database_url))() as session:
        report = rebuild(session, r, name, s3_endpoint)
    result = {"repository": report.repository, "points": report.points, "removed": report.removed,
              "damaged": [{"key": k, "reason": why} for k, why in report.damaged]}
    if json_out:
        emit_json(result)
        return
    out_console.print(f"{report.repository}: {report.points} restore points in the catalog, {report.removed} "
                      "removed that the repository no longer holds")
    for key, why in report.damaged:
        out_console.print(f"[red]not imported[/red] {key}: {why}")


@catalog_app.command("points")
def points_cmd(
    vm: Annotated[str | None, typer.Argument(help="Only this VM or image (a * glob is allowed)")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000, help="At most this many, newest first")] = 100,
    database_url: DatabaseOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Restore points from the catalog, newest first, across every registered repository."""
    from vmkeep.catalog.db import database_url as resolve
    from vmkeep.catalog.db import sessions
    from vmkeep.catalog.queries import find_points

    with sessions(resolve(database_url))() as session:
        rows = find_points(session, vm, limit)
    if json_out:
        emit_json({"points": rows})
        return
    table = Table("VM", "point", "created", "mode", "transport", "size", "stored", "repository")
    for p in rows:
        table.add_row(p["name"], p["point_id"], p["created"][:19], p["mode"] or "", p["transport"] or "",
                      human(p["logical_bytes"]), human(p["stored_bytes"] or 0), p["repository"])
    out_console.print(uncut(table))
