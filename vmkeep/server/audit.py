"""The audit log: one row for every change, login, backup start and restore.

Entries are hash-chained (vmkeep.catalog.audit_chain) and the database refuses to change or
remove them (migration 0010). Writers take one transaction-scoped advisory lock before reading
the newest hash, so concurrent transactions chain one after the other in the order of their ids.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vmkeep.catalog.audit_chain import GENESIS, ChainRow, entry_hash
from vmkeep.catalog.models import AuditEntry
from vmkeep.server.client_address import client_address

CHAIN_LOCK = 0x766D6B6175646974  # "vmkaudit": the advisory lock that orders the chain


def record(session: Session, request: Request | None, user: str, action: str, target: str,
           **detail: Any) -> None:
    """Add the entry to the caller's transaction, so it lands exactly when the change does."""
    client = client_address(request)
    session.execute(select(func.pg_advisory_xact_lock(CHAIN_LOCK)))  # held until this transaction ends
    previous = session.scalar(select(AuditEntry.hash).order_by(AuditEntry.id.desc()).limit(1)) or GENESIS
    at = datetime.now(UTC)
    session.add(AuditEntry(at=at, user=user, action=action, target=target, client=client, detail=detail,
                           prev_hash=previous, hash=entry_hash(previous, at, user, action, target, client, detail)))
    session.flush()  # the id comes from the sequence while the lock is held


def chain_rows(session: Session) -> list[ChainRow]:
    """Every entry, oldest first, as the chain check reads them."""
    return [ChainRow(e.id, e.at, e.user, e.action, e.target, e.client, e.detail, e.prev_hash, e.hash)
            for e in session.scalars(select(AuditEntry).order_by(AuditEntry.id))]
