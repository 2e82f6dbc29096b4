"""Failed-login throttling, per user name and per client address.

Password guessing against one account, or against many accounts from one address, slows down
exponentially after a few free failures: the login answers 429 with ``Retry-After`` without
checking the password at all until the wait is over. State lives in the master's memory (one
master process serves the API); a restart forgets it, which costs an attacker a master restart
they cannot cause through the API.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

WINDOW_SECONDS = 900.0  # failures older than this are forgotten
MAX_DELAY_SECONDS = 900.0
MAX_KEYS = 100_000  # bound on memory: the least recently failed keys go first


@dataclass
class _Failures:
    count: int
    last: float


class LoginGuard:
    """``free_per_user`` failures of one name (``free_per_address`` from one address) pass;
    each one after that doubles the wait, from 1 s up to 15 minutes."""

    def __init__(self, free_per_user: int = 5, free_per_address: int = 20) -> None:
        self.free = {"user": free_per_user, "address": free_per_address}
        self._failures: OrderedDict[tuple[str, str], _Failures] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, user: str, address: str | None, now: float | None = None) -> int:
        """Seconds the caller must wait before this login may be tried (0: go ahead)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            waits = [self._wait(key, now) for key in self._keys(user, address)]
        return max(waits)

    def failed(self, user: str, address: str | None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for key in self._keys(user, address):
                entry = self._failures.pop(key, None)
                if entry is None or now - entry.last > WINDOW_SECONDS:
                    entry = _Failures(0, now)
                entry.count, entry.last = entry.count + 1, now
                self._failures[key] = entry
            while len(self._failures) > MAX_KEYS:
                self._failures.popitem(last=False)

    def succeeded(self, user: str) -> None:
        """A right password clears the name's failures; the address's stay (one valid account
        must not reset the count of guesses against the others)."""
        with self._lock:
            self._failures.pop(("user", user), None)

    @staticmethod
    def _keys(user: str, address: str | None) -> list[tuple[str, str]]:
        return [("user", user)] + ([("address", address)] if address else [])

    def _wait(self, key: tuple[str, str], now: float) -> int:
        entry = self._failures.get(key)
        if entry is None or now - entry.last > WINDOW_SECONDS:
            return 0
        over = entry.count - self.free[key[0]]
        if over < 0:
            return 0
        delay = min(2.0 ** over, MAX_DELAY_SECONDS)
        left = entry.last + delay - now
        return max(0, int(left + 0.999))
