"""The audit log: one row for every change, login, backup start and restore."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from sqlalchemy.orm import Session

from vmkeep.catalog.models import AuditEntry


def record(session: Session, request: Request | None, user: str, action: str, target: str,
           **detail: Any) -> None:
    """Add the entry to the caller's transaction, so it lands exactly when the change does."""
    client = request.client.host if request is not None and request.client else None
    session.add(AuditEntry(user=user, action=action, target=target, client=client, detail=detail))
