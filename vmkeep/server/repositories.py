"""Opening a registered repository with its sealed passphrase."""

from __future__ import annotations

from vmkeep.catalog.models import RepositoryRecord
from vmkeep.repository.backends import open_backend
from vmkeep.repository.config import Credentials
from vmkeep.repository.repo import Repository
from vmkeep.server.keys import open_secret


def passphrase_context(name: str) -> str:
    return f"repository {name}"


def open_registered(record: RepositoryRecord) -> Repository:
    passphrase = (open_secret(record.passphrase_sealed, passphrase_context(record.name)).encode()
                  if record.passphrase_sealed else None)
    return Repository.open(open_backend(record.location, s3_endpoint=record.s3_endpoint), Credentials(passphrase))
