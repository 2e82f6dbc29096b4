"""The FastAPI application of the master: routers, health and Prometheus metrics.

OpenAPI is served at ``/openapi.json`` and ``/docs``. ``/metrics`` and ``/api/health`` are open
(scrapers and load balancers); everything under ``/api`` needs a bearer token.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from vmkeep import __version__
from vmkeep.catalog.db import sessions
from vmkeep.catalog.models import RepositoryRecord, RestorePointRecord, VirtualMachine
from vmkeep.server import routes_access, routes_inventory
from vmkeep.server.auth import get_session


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


def create_app(database_url: str) -> FastAPI:
    app = FastAPI(title="vmkeep", version=__version__,
                  description="Agentless VM backup: catalog, inventory, repositories, users and audit.")
    app.state.sessions = sessions(database_url)
    registry = CollectorRegistry()
    registry.register(CatalogCollector(app.state.sessions))  # type: ignore[arg-type]
    app.include_router(routes_access.router)
    app.include_router(routes_inventory.router)

    @app.get("/api/health", tags=["operations"])
    def health(session: Session = Depends(get_session)) -> dict[str, str]:
        session.execute(select(1))
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
