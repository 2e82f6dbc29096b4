"""Where a restore may write on a hypervisor: only inside the locations an administrator registered.

A restore runs as root on the VM's host; without this, whoever may restore could have disks
written into any directory there (``/etc``, another VM's images).
"""

from __future__ import annotations

import posixpath


def normalized_location(location: str) -> str:
    """A registered location as stored: an absolute directory without ``..``, or a datastore or
    pool name (no slash at all)."""
    if not location or any(c in location for c in "\x00\r\n"):
        raise ValueError(f"{location!r} is not a storage location")
    if "/" not in location:
        return location  # a datastore or storage pool name
    if not location.startswith("/") or ".." in location.split("/"):
        raise ValueError(f"{location!r}: a directory location is an absolute path without '..'")
    return posixpath.normpath(location)


def storage_allowed(storage: str, locations: list[str]) -> bool:
    """Whether ``storage`` (what a restore asks for) is one of ``locations`` or below one of them."""
    try:
        wanted = normalized_location(storage)
    except ValueError:
        return False
    return any(wanted == loc or (loc.startswith("/") and wanted.startswith(loc.rstrip("/") + "/"))
               for loc in locations)
