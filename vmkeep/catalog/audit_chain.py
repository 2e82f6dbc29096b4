"""The audit log's hash chain: each entry carries the hash of the one before it.

The database refuses UPDATE, DELETE and TRUNCATE on ``audit_log`` (a trigger), but whoever owns
the tables can drop a trigger. The chain makes what they did afterwards visible: an altered entry
no longer matches its own hash, a removed one breaks the link of the entry after it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64  # the "previous hash" of the first entry


def canonical_time(at: datetime) -> str:
    """One spelling of an instant, whatever zone the database hands it back in."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_hash(prev_hash: str, at: datetime, user: str, action: str, target: str, client: str | None,
               detail: dict[str, Any]) -> str:
    """SHA-256 over the previous hash and every field of the entry, in a fixed encoding."""
    body = json.dumps([prev_hash, canonical_time(at), user, action, target, client, detail],
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass
class ChainRow:
    id: int
    at: datetime
    user: str
    action: str
    target: str
    client: str | None
    detail: dict[str, Any]
    prev_hash: str | None
    hash: str | None


@dataclass
class ChainReport:
    entries: int
    problems: list[str]
    head: str  # the newest entry's hash: kept elsewhere, it shows a rewrite of the whole chain too

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(rows: Iterable[ChainRow]) -> ChainReport:
    """Walk the entries in id order; name each one that was altered, or after which one went missing."""
    problems: list[str] = []
    previous = GENESIS
    count = 0
    for row in rows:
        count += 1
        if row.prev_hash != previous:
            problems.append(f"entry {row.id} ({row.action} {row.target} at {canonical_time(row.at)}): the entry "
                            "before it was removed or altered (its link does not match)")
        expected = entry_hash(row.prev_hash or "", row.at, row.user, row.action, row.target, row.client,
                              row.detail)
        if row.hash != expected:
            problems.append(f"entry {row.id} ({row.action} {row.target}): its content was altered (hash mismatch)")
        previous = row.hash or ""
    return ChainReport(count, problems, previous)
