"""Where the catalog lives and how to reach it: the database URL, engines, schema upgrades."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from vmkeep.errors import VmkeepError

log = logging.getLogger(__name__)

DATABASE_URL_FILE = Path("/etc/vmkeep/database.url")  # written by the lab set-up (vmkeep.lab.postgres)
MIGRATIONS = Path(__file__).with_name("migrations")


class CatalogError(VmkeepError):
    """The catalog database is unreachable or not at the schema this version needs."""


def database_url(explicit: str | None = None) -> str:
    """``--database-url``, else ``$VMKEEP_DATABASE_URL``, else the set-up's file."""
    from vmkeep.settings import secret, settings

    url = explicit or secret(settings().database_url)
    if not url and DATABASE_URL_FILE.exists():
        url = DATABASE_URL_FILE.read_text().strip()
    if not url:
        raise CatalogError("no catalog database: pass --database-url postgresql+psycopg://USER:PASS@HOST/DB, set "
                           f"VMKEEP_DATABASE_URL, or run scripts/setup for a local one ({DATABASE_URL_FILE})")
    return url


def make_engine(url: str) -> Engine:
    log.debug("catalog engine for %s", hidden_password(url))
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def hidden_password(url: str) -> str:
    """The database URL with its password masked, for a log line or a message."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: show nothing of it
        return "(a database URL SQLAlchemy cannot parse)"


def _alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> str:
    """Bring the schema to ``revision`` (Alembic) and create the task queue's tables (procrastinate);
    returns the revision now in place."""
    from vmkeep.catalog.queue_schema import ensure_schema

    log.info("upgrading the catalog schema at %s to %s", hidden_password(url), revision)
    try:
        command.upgrade(_alembic_config(url), revision)
    except OperationalError as exc:
        raise CatalogError(f"cannot reach the catalog database: {exc.orig}") from exc
    ensure_schema(url)  # the task queue shares the database
    return current_revision(make_engine(url)) or "base"


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(url: str) -> str | None:
    """The newest schema revision this vmkeep knows."""
    return ScriptDirectory.from_config(_alembic_config(url)).get_current_head()


def sessions(url: str) -> sessionmaker[Session]:
    """A session factory for a catalog whose schema is current; says what to run when it is not."""
    engine = make_engine(url)
    head = head_revision(url)
    try:
        current = current_revision(engine)
    except OperationalError as exc:
        raise CatalogError(f"cannot reach the catalog database: {exc.orig}") from exc
    log.debug("catalog schema at %s (this vmkeep needs %s)", current, head)
    if current != head:
        raise CatalogError(f"the catalog schema is at {current or 'nothing'}, this vmkeep needs {head}: run "
                           "`vmkeep db upgrade`")
    return sessionmaker(engine, expire_on_commit=False)
