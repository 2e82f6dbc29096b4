"""Where a restore as a new VM may go on a hypervisor (its networks, hosts, VM folders), asked of
the hypervisor itself so the console offers lists rather than a name to type.

The master connects as discovery does (``connector_for``), in a worker thread with a short time
limit: a hypervisor that does not answer in time leaves the lists empty with the reason, and
the console falls back to a text field. A call that overruns finishes in its thread on its own
(a connection cannot be abandoned midway) and is then closed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from pydantic import BaseModel, Field

from vmkeep.catalog.models import Hypervisor
from vmkeep.errors import VmkeepError
from vmkeep.hypervisors.base import DISCONNECTED, RestoreChoices
from vmkeep.jobs.registered import connector_for

log = logging.getLogger(__name__)

TIMEOUT = 8.0  # seconds: a wizard waits no longer for its lists


class ChoicesOut(BaseModel):
    hypervisor: str
    networks: list[str] = Field(description="where every network card of the new VM may go; plus "
                                            f"{DISCONNECTED!r}: no network cards")
    hosts: list[str] = Field(description="hosts the new VM may run on (empty: the hypervisor is one host)")
    folders: list[str] = Field(description="VM folders (empty: the hypervisor has none)")
    disconnected: str = DISCONNECTED
    error: str | None = Field(default=None, description="why the lists are empty: the hypervisor did not answer, "
                                                        "or cannot list them; type the names instead")


@dataclass(frozen=True)
class _Access:
    """What connecting takes, copied off the catalog row: the thread never touches the session."""

    name: str
    kind: str
    uri: str
    username: str | None
    secret_sealed: bytes | None
    allow_plain_tcp: bool
    allow_unsafe_options: bool


def _ask(access: _Access) -> dict[str, list[str]] | str:
    """The hypervisor's lists, or why it has none (a message for the user)."""
    connector = connector_for(access)
    try:
        if not isinstance(connector, RestoreChoices):
            return f"a {access.kind} hypervisor does not list its networks: type the network's name"
        found = connector.restore_choices()
        log.info("restore choices of %s: %d networks, %d hosts, %d folders", access.name,
                 len(found.get("networks", [])), len(found.get("hosts", [])), len(found.get("folders", [])))
        return found
    finally:
        connector.close()


async def restore_choices(h: Hypervisor, timeout: float = TIMEOUT) -> ChoicesOut:
    """The lists of ``h``, or empty lists with ``error`` set when it cannot say in ``timeout`` s."""
    access = _Access(h.name, h.kind, h.uri, h.username, h.secret_sealed, h.allow_plain_tcp, h.allow_unsafe_options)
    log.debug("asking %s (%s) for its restore choices", h.name, h.uri)
    try:
        found = await asyncio.wait_for(asyncio.to_thread(_ask, access), timeout)
    except TimeoutError:
        log.warning("restore choices of %s: no answer within %.0f s", h.name, timeout)
        found = f"{h.name} did not answer within {timeout:.0f} s: type the names instead"
    except Exception as exc:  # noqa: BLE001 -- any failure of the hypervisor is the user's to read, not a 500
        log.warning("restore choices of %s: %s", h.name, exc, exc_info=not isinstance(exc, VmkeepError))
        found = f"cannot ask {h.name} ({exc}): type the names instead"
    if isinstance(found, str):
        return ChoicesOut(hypervisor=h.name, networks=[], hosts=[], folders=[], error=found)
    return ChoicesOut(hypervisor=h.name, networks=found.get("networks", []), hosts=found.get("hosts", []),
                      folders=found.get("folders", []))
