"""Who may be removed: never one's own account, never the last administrator.

Shared by DELETE /api/users/{name} and `vmkeep user delete` on the catalog, so both refuse alike.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import User
from vmkeep.server.auth import ADMIN


def removal_refused(session: Session, target: User, caller: str | None) -> str | None:
    """Why ``target`` may not be removed by ``caller`` (None: a local command), or None.

    The administrators' rows stay locked until the caller's transaction ends, so two
    administrators removing each other at once cannot leave the server without one."""
    if caller is not None and target.name == caller:
        return "nobody removes their own account: ask another administrator"
    if target.role != ADMIN:
        return None
    admins = session.scalars(select(User).where(User.role == ADMIN).order_by(User.id).with_for_update()).all()
    if caller is not None and caller not in {a.name for a in admins}:
        return f"{caller} is no longer an administrator"
    if not any(a.id != target.id and not a.disabled for a in admins):
        return f"{target.name} is the last administrator: add another one first (vmkeep user add NAME --role admin)"
    return None
