"""One log line per request (API and console): method, path, status, time, and the client (behind
a trusted reverse proxy, the one it names), so an administrator can follow who did what without
the audit log. Polling (heartbeats, metrics, health, the dashboard's running jobs) goes to debug,
or it would drown the rest."""

from __future__ import annotations

import logging
import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vmkeep.server.client_address import client_address

log = logging.getLogger(__name__)

QUIET = ("/api/health", "/metrics", "/dashboard/running")  # the last: the console's dashboard polls it
QUIET_SUFFIX = "/heartbeat"


class RequestLog:
    """Pure ASGI (no body buffering): the status comes from the response's start message."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope.get("path", "")
            quiet = path in QUIET or path.endswith(QUIET_SUFFIX)
            # the path as sent (still percent-encoded: a decoded %0a would start a forged line)
            shown = scope.get("raw_path", path.encode()).decode("latin-1")
            log.log(logging.DEBUG if quiet and status < 400 else logging.INFO, "%s %s → %d (%.0f ms) from %s",
                    scope.get("method", "?"), shown, status, (time.monotonic() - started) * 1000,
                    client_address(Request(scope)) or "?")
