"""`vmkeep proxy`: register with the master, heartbeat, and work this proxy's task queue."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import httpx

from vmkeep.catalog.db import sessions
from vmkeep.client import server_verify
from vmkeep.errors import VmkeepError
from vmkeep.jobs.queue import make_app, queue_name
from vmkeep.proxy import backup_task, maintenance_task, replica_task, restore_task  # noqa: F401 - their tasks go on the queue's blueprint

HEARTBEAT_SECONDS = 3.0
WORKER_HEARTBEAT_SECONDS = 2.0  # procrastinate's own, which the master's rescue loop watches

log = logging.getLogger("vmkeep.proxy")


def register(client: httpx.Client, name: str, transports: list[str], reaches: list[str], concurrency: int,
             storage: list[str]) -> str:
    """Announce this proxy to the master; returns the database URL of the task queue."""
    try:
        reply = client.post("/api/proxies/register", json={"name": name, "transports": transports,
                                                          "reaches": reaches, "storage": storage,
                                                          "concurrency": concurrency})
    except httpx.HTTPError as exc:
        raise VmkeepError(f"cannot reach the master at {client.base_url}: {exc}") from exc
    if reply.status_code != 200:
        raise VmkeepError(f"the master refused the registration ({reply.status_code}): {reply.text}")
    return str(reply.json()["database_url"])


class Refusal:
    """Why the master stopped taking this proxy's heartbeats (its account or token is gone)."""

    def __init__(self) -> None:
        self.reason: str | None = None


def _heartbeat(client: httpx.Client, name: str, stop: threading.Event, refusal: Refusal) -> None:
    """Beat until stopped; a master that no longer accepts the token stops the proxy: it would
    otherwise go on taking work the master cannot see it do."""
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            reply = client.post(f"/api/proxies/{name}/heartbeat")
        except httpx.HTTPError as exc:  # the master may be restarting: keep working, keep trying
            log.warning("heartbeat to the master failed: %s", exc)
            continue
        log.debug("heartbeat: %s", reply.status_code)
        if reply.status_code in (401, 403):
            refusal.reason = (f"the master refuses this proxy's token ({reply.status_code}: "
                              f"{_detail(reply)}): its account was removed or its token revoked or expired; "
                              "create a new token for the proxy's account (POST /api/tokens as that user) and "
                              "restart the proxy with it")
            log.error("%s; stopping once the running tasks end", refusal.reason)
            os.kill(os.getpid(), signal.SIGTERM)  # the worker's own graceful stop
            return
        if reply.status_code >= 400:
            log.warning("heartbeat refused (%s): %s", reply.status_code, _detail(reply))


def _detail(reply: httpx.Response) -> str:
    try:
        return str(reply.json().get("detail", reply.text))
    except ValueError:
        return reply.text[:200]


def run_proxy(server: str, token: str, name: str, transports: list[str], reaches: list[str],
              concurrency: int, max_rate: float | None = None, storage: list[str] | None = None,
              ca_file: Path | None = None) -> None:
    """Blocks until interrupted (SIGINT/SIGTERM finish the running backups first). ``max_rate``:
    MiB/s each backup may read and each restore may write (none: as fast as it goes). ``ca_file``:
    the CA of the master's certificate (default: the system's)."""
    client = httpx.Client(base_url=server, headers={"Authorization": f"Bearer {token}"}, timeout=30,
                          verify=server_verify(ca_file))
    database_url = register(client, name, transports, reaches, concurrency, storage or [])
    log.info("proxy %s registered with %s (transports %s, reaches %s, %d at once%s); working its queue", name,
             server, ":".join(transports), ",".join(reaches) or "-", concurrency,
             f", {max_rate:g} MiB/s each" if max_rate else "", extra={"proxy": name})
    stop, refusal = threading.Event(), Refusal()
    beat = threading.Thread(target=_heartbeat, args=(client, name, stop, refusal), daemon=True)
    beat.start()
    app = make_app(database_url)
    try:
        with app.open():
            app.run_worker(queues=[queue_name(name)], name=name, concurrency=concurrency, wait=True,
                           update_heartbeat_interval=WORKER_HEARTBEAT_SECONDS, abort_job_polling_interval=1.0,
                           additional_context={"sessions": sessions(database_url), "proxy": name,
                                               "max_rate": max_rate})
    finally:
        stop.set()
        client.close()
    if refusal.reason:
        raise VmkeepError(refusal.reason)
