"""Where the master may send the requests API users point it at (policy webhooks, S3 endpoints).

Whoever may change a policy or register a repository chooses these URLs. Pointed at a
link-local or cloud-metadata address (169.254.169.254 and friends), the master's own request
would fetch the instance's credentials and echo them back in an error or a job's notice error.
Those addresses are refused unless the administrator allowed them
(`vmkeep server --allow-endpoint CIDR`); loopback and private networks stay allowed. The check
runs when a URL is stored and again, on a fresh resolution, each time a request goes out: DNS
can change in between.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from urllib.parse import urlsplit

import httpx
from fastapi import HTTPException

from vmkeep.errors import UsageError

log = logging.getLogger(__name__)

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address
# link-local (where every cloud's instance metadata lives) and AWS's IPv6 metadata address
BLOCKED: tuple[Network, ...] = tuple(ip_network(n) for n in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128"))


class EndpointRefused(UsageError):
    """A URL the master will not send requests to; the message says why and what to do."""


def parse_networks(values: Iterable[str], option: str) -> tuple[Network, ...]:
    """``ADDR`` or ``ADDR/PREFIX`` values of a server option; a UsageError naming the option."""
    networks = []
    for value in values:
        try:
            networks.append(ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise UsageError(f"{option} {value!r}: give an IP address or a network like 10.0.0.0/8 "
                             f"({exc})") from exc
    return tuple(networks)


def _plain(address: Address) -> Address:
    """IPv4 written as IPv6 (``::ffff:169.254.169.254``) is that IPv4 address."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class EndpointPolicy:
    """The networks the administrator allowed beyond the default (``--allow-endpoint``)."""

    allowed: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, cidrs: Iterable[str]) -> EndpointPolicy:
        return cls(parse_networks(cidrs, "--allow-endpoint"))

    def refused(self, address: Address) -> bool:
        plain = _plain(address)
        if any(plain in n for n in self.allowed if n.version == plain.version):
            return False
        return any(plain in n for n in BLOCKED if n.version == plain.version)

    def check(self, url: str, what: str) -> tuple[httpx.URL, str]:
        """Resolve ``url``'s host now; raise :class:`EndpointRefused` if any of its addresses is
        refused. Returns the parsed URL and the address to connect to (its first)."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise EndpointRefused(f"{what} {url!r} is not a URL: {exc}") from exc
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise EndpointRefused(f"{what} {url!r}: give an http:// or https:// URL with a host name or address")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            found = socket.getaddrinfo(parsed.host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise EndpointRefused(f"{what} {url!r}: cannot resolve {parsed.host} ({exc}); give a name this "
                                  "server resolves, or an address") from exc
        addresses = [str(info[4][0]) for info in found]
        for text in addresses:
            if self.refused(ip_address(text)):
                log.warning("refused %s %s: %s is link-local or cloud metadata", what, url, text)
                raise EndpointRefused(
                    f"{what} {url!r} reaches {text}, a link-local or cloud metadata address; the server sends "
                    "nothing there unless its administrator allows it (vmkeep server --allow-endpoint CIDR)")
        return parsed, addresses[0]


def refuse_link_local_host(endpoints: EndpointPolicy, address: str, what: str) -> None:
    """400 when the host of ``address`` (any URI) is, or resolves to, a refused address. A name
    that does not resolve here passes: the connection to it fails on its own."""
    host = urlsplit(address).hostname
    if not host:
        return
    try:
        found = {str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError) as exc:
        log.debug("%s %s: %s does not resolve here (%s); the connection to it fails on its own", what, address,
                  host, exc)
        return
    for text in sorted(found):
        if endpoints.refused(ip_address(text)):
            log.warning("refused %s %s: %s is link-local or cloud metadata", what, address, text)
            raise HTTPException(400, f"{what} {address!r} reaches {text}, a link-local or cloud metadata address; "
                                     "refused unless the server's administrator allows it (vmkeep server "
                                     "--allow-endpoint CIDR)")


def refuse_with_400(endpoints: EndpointPolicy, url: str | None, what: str) -> None:
    """The API's check of a URL it is given: 400 with the reason when it is refused."""
    if not url:
        return
    try:
        endpoints.check(url, what)
    except EndpointRefused as exc:
        raise HTTPException(400, str(exc)) from None
