"""Opening what the catalog registered: a hypervisor with its sealed login, on the address terms an
administrator set, and a repository with its sealed passphrase, pinned to what was recorded.
The master (discovery, rebuilds) and the proxies (backups, restores) both do it."""

from __future__ import annotations

import logging
from typing import Protocol

from vmkeep.catalog.rebuild import Pinned, check_pinned
from vmkeep.hypervisors.address import Allowance
from vmkeep.hypervisors.base import Connector, HypervisorError, NbdTls
from vmkeep.hypervisors.connect import KINDS, kind_of, open_connector, uses_stored_password
from vmkeep.jobs.keys import open_secret
from vmkeep.repository.backends import open_backend
from vmkeep.repository.backends.readonly import ReadOnlyBackend
from vmkeep.repository.config import Credentials
from vmkeep.repository.repo import Repository


class RegisteredRepository(Pinned, Protocol):
    """A registered repository as the catalog recorded it: its row, or a proxy's work order."""

    @property
    def s3_endpoint(self) -> str | None: ...
    @property
    def passphrase_sealed(self) -> bytes | None: ...


log = logging.getLogger(__name__)


def passphrase_context(name: str) -> str:
    return f"repository {name}"


def open_registered(record: RegisteredRepository, *, read_only: bool = False) -> Repository:
    """Open the repository the catalog registered, refusing one whose id or encryption differs
    from what was recorded then (before it is unlocked or written to); ``read_only``: every write
    refused (the source of a copy)."""
    passphrase = (open_secret(record.passphrase_sealed, passphrase_context(record.name)).encode()
                  if record.passphrase_sealed else None)
    log.debug("opening repository %s at %s (%s)", record.name, record.location,
              "stored passphrase" if passphrase else "no passphrase")
    backend = open_backend(record.location, s3_endpoint=record.s3_endpoint)
    return Repository.open(ReadOnlyBackend(backend) if read_only else backend, Credentials(passphrase),
                           expect=lambda config: check_pinned(record, config))


def secret_context(name: str) -> str:
    return f"hypervisor {name}"


class HypervisorAccess(Protocol):
    """What connecting to a registered hypervisor takes: its catalog row, or a proxy's work order."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def uri(self) -> str: ...
    @property
    def username(self) -> str | None: ...
    @property
    def secret_sealed(self) -> bytes | None: ...
    @property
    def allow_plain_tcp(self) -> bool: ...
    @property
    def allow_unsafe_options(self) -> bool: ...


def connector_for(h: HypervisorAccess, nbd_tls: NbdTls = "require") -> Connector:
    """A live connection to the hypervisor with its stored credentials, on the address terms an
    administrator registered it with (checked again here: a row may predate the check)."""
    if h.kind not in KINDS or kind_of(h.uri) != h.kind:
        raise HypervisorError(f"hypervisor {h.name}: kind {h.kind!r} with address {h.uri} has no connector (have: "
                              f"{', '.join(KINDS)}; vsphere addresses start vsphere://, xen ones xapi://)")
    credentials = None
    if h.secret_sealed and uses_stored_password(h.uri, h.username):
        credentials = (h.username or "", open_secret(h.secret_sealed, secret_context(h.name)))
    log.debug("connecting to hypervisor %s at %s (%s)", h.name, h.uri,
              f"stored password of {h.username}" if credentials else "no stored password")
    return open_connector(h.uri, credentials=credentials, nbd_tls=nbd_tls,
                          allowance=Allowance(plain_tcp=h.allow_plain_tcp, unsafe_options=h.allow_unsafe_options))
