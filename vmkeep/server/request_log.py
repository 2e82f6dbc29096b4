"""One log line per API request: method, path, status, time, and the client, so an administrator
can follow who did what without the audit log. Polling (heartbeats, metrics, health) goes to
debug, or it would drown the rest."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

QUIET = ("/api/health", "/metrics")
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
            client = scope.get("client") or ("?", 0)
            log.log(logging.DEBUG if quiet and status < 400 else logging.INFO, "%s %s → %d (%.0f ms) from %s",
                    scope.get("method", "?"), path, status, (time.monotonic() - started) * 1000, client[0])
