"""The proxies' own PostgreSQL role: the task queue and the rows of the work they do, nothing else.

A proxy works procrastinate's queue in the catalog's database, so it needs a database login. It
gets a role of its own (``<database>_proxy``) rather than the master's: no rights on users,
tokens, hypervisors, policies, repositories, VMs or the audit log. Its work orders come from two
views (migrations 0010, 0011); it writes only the outcome and progress columns of backup and
restore rows still in progress (a trigger keeps ended rows the master's), closes policy runs,
writes the catalog's restore points (new backups, retention, prunes) and adds its backups' log
lines; it runs repository maintenance (verify, prune, GC) the same way (migration 0015), and backup
copies: the target repository of a copy through a view, the copied points' rows written for the
target, a restore's copies of its point through another view (migration 0019); and VM replica
syncs: the replica's row, its host's login and repository through a view, the sync's outcome
written into the row (migration 0020). It cannot put work on the queue.

``vmkeep db upgrade`` creates the role and (re)states every grant, so the grants follow the
schema. The catalog's own login needs CREATEROLE for that.
"""

from __future__ import annotations

import logging
import re

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, ProgrammingError

from vmkeep.errors import VmkeepError

log = logging.getLogger(__name__)

# what a procrastinate worker does to its queue: fetch, finish and abort jobs (never defer new
# ones: only the master sends work), log their events (procrastinate's triggers), register and
# heartbeat as a worker
QUEUE = {
    "procrastinate_jobs": "SELECT, UPDATE, DELETE",
    "procrastinate_events": "SELECT, INSERT",
    "procrastinate_workers": "SELECT, INSERT, UPDATE, DELETE",
}
READ = ("alembic_version", "jobs", "job_vms", "restore_jobs", "proxies", "proxy_backup_work", "proxy_restore_work",
        "maintenance_runs", "proxy_maintenance_work", "proxy_copy_work", "proxy_restore_sources", "replicas",
        "proxy_replica_work")
OUTCOME = {  # the columns a proxy writes: status, outcome, progress
    "job_vms": ("proxy", "status", "attempts", "mode", "mode_reason", "transport", "read_bytes", "stored_bytes",
                "progress_bytes", "total_bytes", "duration_seconds", "point_id", "verified", "disks", "boot_check",
                "warnings", "error", "started", "finished"),
    "restore_jobs": ("proxy", "status", "attempts", "warnings", "progress_bytes", "total_bytes", "error", "disks",
                     "finished", "source_repository"),
    "jobs": ("status", "finished"),
    "maintenance_runs": ("proxy", "status", "attempts", "progress_bytes", "total_bytes", "result", "error", "started",
                         "finished"),
    "replicas": ("proxy", "status", "attempts", "state", "point_id", "mode", "bytes_written", "progress_bytes",
                 "total_bytes", "error", "updated"),
}
POINTS = "restore_points"  # cataloged after each backup, pruned by the policy's retention
LOG_LINES = "job_vm_logs"  # a backup's log lines, added while it runs (never read back or changed)
IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,50}$")


class ProxyRoleError(VmkeepError):
    """The proxies' database role cannot be created or granted its rights."""


def proxy_role_name(database_url: str) -> str:
    """One role per catalog database, so a proxy of one catalog cannot enter another."""
    database = (make_url(database_url).database or "").lower()
    role = f"{database}_proxy"
    if not IDENTIFIER.match(role):
        raise ProxyRoleError(f"the catalog database name {database!r} does not make a role name (letters, digits, _)")
    return role


def proxy_database_url(base_url: str, role: str, password: str) -> str:
    """``base_url`` (as proxies reach the catalog) with the proxy role's login instead of the master's."""
    return make_url(base_url).set(username=role, password=password).render_as_string(hide_password=False)


def ensure_proxy_role(database_url: str, password: str) -> str:
    """Create or update the proxies' role and state its grants from scratch; its name."""
    role = proxy_role_name(database_url)
    database = make_url(database_url).database
    ready = _logs_in(database_url, role, password)  # made by a superuser, or by an earlier upgrade
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:  # all of it or nothing
            if not ready:
                _create_or_update(conn, role, password)
            _grant(conn, role, str(database))
    except ProgrammingError as exc:
        raise ProxyRoleError(
            f"cannot create or grant the proxies' database role {role}: {exc.orig}; either have a superuser "
            "create it (`vmkeep db proxy-role-sql | psql` as the postgres user), or give the catalog's login "
            "CREATEROLE; then run `vmkeep db upgrade` again") from exc
    finally:
        engine.dispose()
    log.info("proxy database role %s granted the queue and its work rows", role)
    return role


def _logs_in(database_url: str, role: str, password: str) -> bool:
    """Whether the role exists and takes this password (then the catalog's login needs no right to
    manage roles: the grants are the tables' owner's to give)."""
    engine = create_engine(proxy_database_url(database_url, role, password))
    try:
        with engine.connect():
            return True
    except OperationalError as exc:
        code = getattr(exc.orig, "sqlstate", None)
        if code in ("28P01", "28000"):  # invalid_password, invalid_authorization_specification
            log.debug("role %s does not log in (%s): creating or updating it", role, code)
        else:
            log.warning("cannot log in as role %s (%s): creating or updating it", role, exc.orig)
        return False
    finally:
        engine.dispose()


def create_role_sql(role: str, password: str) -> str:
    """The statement a superuser runs once so that the catalog's login needs no CREATEROLE."""
    quoted = "'" + password.replace("'", "''") + "'"
    return f'CREATE ROLE "{role}" WITH LOGIN NOCREATEDB NOCREATEROLE NOINHERIT PASSWORD {quoted};'


def _create_or_update(conn: Connection, role: str, password: str) -> None:
    exists = conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first()
    verb = "ALTER" if exists else "CREATE"
    # a password cannot be a bind parameter in DDL: quote it as a literal the server escapes
    literal = conn.execute(text("SELECT quote_literal(:p)"), {"p": password}).scalar_one()
    conn.execute(text(f'{verb} ROLE "{role}" WITH LOGIN NOCREATEDB NOCREATEROLE NOINHERIT '
                      f"PASSWORD {literal}"))


def _grant(conn: Connection, role: str, database: str) -> None:
    quoted = f'"{role}"'
    conn.execute(text(f'REVOKE CONNECT, TEMPORARY ON DATABASE "{database}" FROM PUBLIC'))
    conn.execute(text(f'GRANT CONNECT ON DATABASE "{database}" TO {quoted}'))
    conn.execute(text(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {quoted}"))
    conn.execute(text(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {quoted}"))
    # no one but the owner creates objects in the schema (before PostgreSQL 15 PUBLIC could): a
    # function a proxy made there could stand in for one the master calls
    conn.execute(text("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
    conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {quoted}"))
    for table, rights in QUEUE.items():
        conn.execute(text(f"GRANT {rights} ON {table} TO {quoted}"))
        if "INSERT" in rights:
            conn.execute(text(f"GRANT USAGE, SELECT ON SEQUENCE {table}_id_seq TO {quoted}"))
    for table in READ:
        conn.execute(text(f"GRANT SELECT ON {table} TO {quoted}"))
    for table, columns in OUTCOME.items():
        conn.execute(text(f"GRANT UPDATE ({', '.join(columns)}) ON {table} TO {quoted}"))
    conn.execute(text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {POINTS} TO {quoted}"))
    conn.execute(text(f"GRANT USAGE, SELECT ON SEQUENCE {POINTS}_id_seq TO {quoted}"))
    conn.execute(text(f"GRANT INSERT ON {LOG_LINES} TO {quoted}"))
    conn.execute(text(f"GRANT USAGE ON SEQUENCE {LOG_LINES}_id_seq TO {quoted}"))
