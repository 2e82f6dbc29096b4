"""Failed-login throttling, per user name and per client address.

Password guessing against one account, or against many accounts from one address, slows down
exponentially after a few free failures: the login answers 429 with ``Retry-After`` without
checking the password at all until the wait is over. An attempt counts as a failure from the
moment it is let through, so guesses sent in parallel are throttled too; a right password takes
its count back. IPv6 clients are counted per /64 (one host holds a whole /64). State lives in the
master's memory (one master process serves the API); a restart forgets it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address, ip_network

WINDOW_SECONDS = 3600.0  # failures older than this are forgotten: longer than the longest wait
MAX_DELAY_SECONDS = 900.0
MAX_KEYS = 100_000  # per kind: the least recently failed keys go first


@dataclass
class _Failures:
    count: int
    last: float


class LoginGuard:
    """``free_per_user`` failures of one name (``free_per_address`` from one address) pass;
    each one after that doubles the wait, from 1 s up to 15 minutes."""

    def __init__(self, free_per_user: int = 5, free_per_address: int = 20) -> None:
        self.free = {"user": free_per_user, "address": free_per_address}
        self._failures: dict[str, OrderedDict[str, _Failures]] = {"user": OrderedDict(), "address": OrderedDict()}
        self._lock = threading.Lock()

    def attempt(self, user: str, address: str | None, now: float | None = None) -> int:
        """Seconds to wait before this login may be tried (then nothing is counted), or 0: go
        ahead, and the attempt counts as failed until :meth:`succeeded` says otherwise."""
        now = time.monotonic() if now is None else now
        keys = self._keys(user, address)
        with self._lock:
            wait = max(self._wait(kind, key, now) for kind, key in keys)
            if wait:
                return wait
            for kind, key in keys:
                table = self._failures[kind]
                entry = table.pop(key, None)
                if entry is None or now - entry.last > WINDOW_SECONDS:
                    entry = _Failures(0, now)
                entry.count, entry.last = entry.count + 1, now
                table[key] = entry
                while len(table) > MAX_KEYS:
                    table.popitem(last=False)
        return 0

    def succeeded(self, user: str, address: str | None) -> None:
        """A right password clears the name's failures and takes back the address's count of this
        attempt (the address's earlier failures stay: one valid account must not reset the count of
        guesses against the others)."""
        with self._lock:
            self._failures["user"].pop(user, None)
            if address is not None and (entry := self._failures["address"].get(_network_of(address))):
                entry.count = max(0, entry.count - 1)

    @staticmethod
    def _keys(user: str, address: str | None) -> list[tuple[str, str]]:
        return [("user", user)] + ([("address", _network_of(address))] if address else [])

    def _wait(self, kind: str, key: str, now: float) -> int:
        entry = self._failures[kind].get(key)
        if entry is None or now - entry.last > WINDOW_SECONDS:
            return 0
        over = entry.count - self.free[kind]
        if over < 0:
            return 0
        delay = min(2.0 ** over, MAX_DELAY_SECONDS)
        left = entry.last + delay - now
        return max(0, int(left + 0.999))


def _network_of(address: str) -> str:
    """What one client is: its IPv4 address, or the /64 of its IPv6 address."""
    try:
        parsed = ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ip_network(f"{parsed}/64", strict=False))
    return str(parsed)
