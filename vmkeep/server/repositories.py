"""Opening a registered repository with its sealed passphrase."""

from __future__ import annotations

from typing import Protocol

from vmkeep.catalog.rebuild import Pinned, check_pinned
from vmkeep.repository.backends import open_backend
from vmkeep.repository.config import Credentials
from vmkeep.repository.repo import Repository
from vmkeep.server.keys import open_secret


class RegisteredRepository(Pinned, Protocol):
    """A registered repository as the catalog recorded it: its row, or a proxy's work order."""

    @property
    def s3_endpoint(self) -> str | None: ...
    @property
    def passphrase_sealed(self) -> bytes | None: ...


def passphrase_context(name: str) -> str:
    return f"repository {name}"


def open_registered(record: RegisteredRepository) -> Repository:
    """Open the repository the catalog registered, refusing one whose id or encryption differs
    from what was recorded then (before it is unlocked or written to)."""
    passphrase = (open_secret(record.passphrase_sealed, passphrase_context(record.name)).encode()
                  if record.passphrase_sealed else None)
    return Repository.open(open_backend(record.location, s3_endpoint=record.s3_endpoint), Credentials(passphrase),
                           expect=lambda config: check_pinned(record, config))
