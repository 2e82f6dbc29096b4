"""The FastAPI application of the master: routers, health, Prometheus metrics and the web console.

OpenAPI is served at ``/openapi.json`` and ``/docs``; the console (vmkeep.server.console) at ``/``.
``/metrics`` and ``/api/health`` are open (scrapers and load balancers); everything under ``/api``
needs a bearer token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session, sessionmaker

from vmkeep import __version__
from vmkeep.catalog.db import sessions
from vmkeep.catalog.models import RepositoryRecord, RestorePointRecord, VirtualMachine
from vmkeep.jobs.queue import make_app
from vmkeep.server import (
    routes_access,
    routes_files,
    routes_inventory,
    routes_jobs,
    routes_maintenance,
    routes_proxies,
    routes_replicas,
    routes_restore,
)
from vmkeep.server.auth import TOKEN_MAX_DAYS, get_session
from vmkeep.server.console import install as install_console
from vmkeep.server.copies import copy_after_backups, run_due_copies
from vmkeep.server.dispatch import dispatch_waiting, rescue_queued, rescue_stalled
from vmkeep.server.endpoints import EndpointPolicy, Network
from vmkeep.server.login_guard import LoginGuard
from vmkeep.server.maintenance import rescue_maintenance
from vmkeep.server.notify import Mailer
from vmkeep.server.replicas import replicate_after_backups
from vmkeep.server.request_log import RequestLog
from vmkeep.server.request_size import RequestSizeLimit
from vmkeep.server.schedule import discover_due, notify_finished, run_due_policies
from vmkeep.server.validation import validation_failed

log = logging.getLogger("vmkeep.server")


class CatalogCollector:
    """Gauges read from the catalog at each scrape."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory

    def collect(self):  # type: ignore[no-untyped-def]
        with self.factory() as session:
            vms = GaugeMetricFamily("vmkeep_vms", "VMs discovered and present", labels=[])
            vms.add_metric([], session.scalar(select(func.count()).select_from(VirtualMachine)
                                              .where(VirtualMachine.present.is_(True))) or 0)
            points = GaugeMetricFamily("vmkeep_restore_points", "Restore points in the catalog", labels=["repository"])
            used = GaugeMetricFamily("vmkeep_repository_used_bytes", "Bytes the repository's chunks take",
                                     labels=["repository"])
            rows = session.execute(select(RepositoryRecord.name, func.count(RestorePointRecord.id))
                                   .outerjoin(RestorePointRecord).group_by(RepositoryRecord.name)).tuples()
            counts = {name: n for name, n in rows}
            for repo in session.scalars(select(RepositoryRecord)):
                points.add_metric([repo.name], counts.get(repo.name, 0))
                used.add_metric([repo.name], repo.used_bytes or 0)
        yield from (vms, points, used)


RESCUE_EVERY_SECONDS = 1.0  # a few indexed queries: a run's copies, replica syncs and moves start at once
STALLED_AFTER_SECONDS = 8.0  # a proxy worker silent this long is dead; its tasks move


async def rescue_loop(app: FastAPI) -> None:
    """The master's own work, for as long as it runs: move the tasks of proxies that died, start
    scheduled runs and the copies of ended or scheduled ones, send run notices, refresh inventories."""
    while True:
        await asyncio.sleep(RESCUE_EVERY_SECONDS)
        try:
            with app.state.sessions() as session:
                await rescue_stalled(session, app.state.queue, STALLED_AFTER_SECONDS)
                await rescue_queued(session, app.state.queue)
                await rescue_maintenance(session, app.state.queue, STALLED_AFTER_SECONDS)
                await dispatch_waiting(session, app.state.queue)
                await run_due_policies(session, app.state.queue, datetime.now(UTC))
                await copy_after_backups(session, app.state.queue)
                await replicate_after_backups(session, app.state.queue)
                await run_due_copies(session, app.state.queue, datetime.now(UTC))
                await notify_finished(session, app.state.mailer, app.state.endpoints)
            await discover_due(app.state.sessions, datetime.now(UTC))
        except Exception:  # a database hiccup must not end the loop
            log.exception("the master's periodic work failed; retrying")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with app.state.queue.open_async():
        rescuer = asyncio.create_task(rescue_loop(app))
        log.info("vmkeep server %s up: catalog and task queue open, periodic work started", __version__)
        try:
            yield
        finally:
            rescuer.cancel()
            log.info("vmkeep server stopping")


def create_app(database_url: str, mailer: Mailer | None = None, proxy_database_url: str | None = None,
               endpoints: EndpointPolicy = EndpointPolicy(), trusted_proxies: tuple[Network, ...] = ()) -> FastAPI:
    """``proxy_database_url``: the catalog as proxies on other machines reach it (the master's
    own URL may name a local socket or loopback); the master's URL when not given. ``endpoints``:
    where webhooks and S3 requests may go; ``trusted_proxies``: whose X-Forwarded-For counts."""
    app = FastAPI(title="vmkeep", version=__version__, lifespan=lifespan,
                  description="Agentless VM backup: catalog, inventory, proxies, policies, jobs, repositories, "
                              "users and audit.")
    app.state.database_url = database_url
    app.state.token_max_days = TOKEN_MAX_DAYS  # `vmkeep server --token-max-days`
    app.state.login_guard = LoginGuard()
    app.state.proxy_database_url = proxy_database_url or database_url
    app.state.mailer = mailer
    app.state.endpoints, app.state.trusted_proxies = endpoints, trusted_proxies
    app.state.sessions = sessions(database_url)
    app.state.queue = make_app(database_url)
    registry = CollectorRegistry()
    registry.register(CatalogCollector(app.state.sessions))  # type: ignore[arg-type]
    app.add_middleware(RequestSizeLimit)  # 413 before any route reads a large body
    app.add_middleware(RequestLog)  # outermost: every request's line, a refused one too
    app.include_router(routes_access.router)
    app.include_router(routes_inventory.router)
    app.include_router(routes_proxies.router)
    app.include_router(routes_jobs.router)
    app.include_router(routes_restore.router)
    routes_files.install(app)  # file-level restore, its sessions closed with the server
    app.include_router(routes_maintenance.router)
    app.include_router(routes_replicas.router)
    app.add_exception_handler(RequestValidationError, validation_failed)
    install_console(app)  # the web console at /, its files at /static

    @app.exception_handler(DataError)
    async def bad_value(_request: Request, exc: DataError) -> JSONResponse:
        # the database refused a value the schema let through (a NUL byte in a string, say)
        return JSONResponse({"detail": f"a value is not acceptable: {exc.orig}"}, status_code=400)

    @app.get("/api/health", tags=["operations"])
    def health(session: Session = Depends(get_session)) -> dict[str, str]:
        session.execute(select(1))
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
