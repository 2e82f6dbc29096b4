"""Datastore files over HTTPS: the ``/folder`` URL of vCenter and ESXi, for reading a snapshot's
disk (byte ranges) and for uploading a restored one."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlencode

import httpx

from vmkeep.hypervisors.base import HypervisorError
from vmkeep.hypervisors.vmware.session import Session, Target

UPLOAD_CHUNK = 4 << 20


def folder_url(target: Target, datacenter: str, datastore: str, path: str) -> str:
    return (f"{target.base_url}/folder/{quote(path)}?"
            + urlencode({"dcPath": datacenter, "dsName": datastore}))


def upload(session: Session, datacenter: str, datastore: str, path: str, source: Path) -> None:
    """PUT ``source`` to ``[datastore] path``, streamed."""
    url = folder_url(session.target, datacenter, datastore, path)
    size = source.stat().st_size

    def body():  # type: ignore[no-untyped-def]
        with source.open("rb") as f:
            while block := f.read(UPLOAD_CHUNK):
                yield block

    verify: bool | object = session.context if session.context is not None else False
    try:
        with httpx.Client(verify=verify, timeout=httpx.Timeout(600, connect=30)) as client:  # type: ignore[arg-type]
            reply = client.put(url, content=body(), headers={"Cookie": session.cookie,
                                                               "Content-Type": "application/octet-stream",
                                                               "Content-Length": str(size)})
    except httpx.HTTPError as exc:
        raise HypervisorError(f"uploading {source.name} to [{datastore}] {path} failed: {exc}") from None
    if reply.status_code >= 300:
        raise HypervisorError(f"{session.target.host} refused the upload to [{datastore}] {path}: "
                              f"{reply.status_code} {reply.text[:200]}")
