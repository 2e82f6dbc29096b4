"""The client address the audit log records.

A proxy header (``X-Forwarded-For``) is only a claim of whoever sent the request: any client
could name another address and have the audit log blame it. It is believed only when the
connection comes from a reverse proxy the administrator named (`vmkeep server --trusted-proxy
ADDR`); otherwise the client is the connection's peer. uvicorn's own proxy-header handling is
turned off (vmkeep.cli.server_cmds), so this is the one place the header is read.
"""

from __future__ import annotations

import logging
from ipaddress import ip_address

from starlette.requests import Request

from vmkeep.server.endpoints import Network

log = logging.getLogger(__name__)


def _within(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        parsed = ip_address(address)
    except ValueError:
        return False
    return any(parsed in n for n in networks if n.version == parsed.version)


def client_address(request: Request | None) -> str | None:
    """The peer; behind trusted proxies, the nearest address in X-Forwarded-For that no trusted
    proxy added (each proxy appends the address it received the request from)."""
    if request is None or request.client is None:
        return None
    client = request.client.host
    trusted: tuple[Network, ...] = getattr(request.app.state, "trusted_proxies", ())
    if not _within(client, trusted):
        return client
    hops = [h.strip() for h in ",".join(request.headers.getlist("x-forwarded-for")).split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            ip_address(hop)
        except ValueError:  # not an address: nothing further left can be vouched for
            log.warning("ignored X-Forwarded-For entry %r from trusted proxy %s", hop[:100], client)
            break
        client = hop
        if not _within(hop, trusted):
            break
    return client
