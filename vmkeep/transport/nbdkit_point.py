"""nbdkit Python plugin: one disk of a restore point as a read-only NBD export.

nbdkit loads this file itself (``nbdkit python vmkeep/transport/nbdkit_point.py …``), in its own
embedded interpreter: the ``site=`` parameters put vmkeep and its dependencies on its path. The
repository's passphrase, when there is one, comes from ``VMKEEP_PASSPHRASE`` in nbdkit's
environment or a ``passphrase-file=``, never from the command line. Reads go through
:class:`vmkeep.repository.point_reader.PointReader` (chunk cache, read-ahead); zero chunks show as
holes, so a client copying the disk skips them.
"""

# ruff: noqa: A001 - nbdkit calls these functions by their names (open, …)
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit's python plugin

API_VERSION = 2
settings: dict[str, str] = {}
sites: list[str] = []
reader: Any = None


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)  # chunk decoding releases the GIL


def config(key: str, value: str) -> None:
    if key == "site":
        sites.append(value)
    else:
        settings[key] = value


def config_complete() -> None:
    global reader
    for site in reversed(sites):
        if site not in sys.path:
            sys.path.insert(0, site)
    from vmkeep.repository.backends import open_backend
    from vmkeep.repository.config import Credentials
    from vmkeep.repository.point_reader import PointReader
    from vmkeep.repository.repo import Repository

    missing = [k for k in ("repo", "name", "disk") if k not in settings]
    if missing:
        raise RuntimeError(f"nbdkit_point needs {', '.join(missing)}=")
    passphrase_file = settings.get("passphrase-file")
    key_file = settings.get("key-file")
    # plain=1: the caller knows the repository is unencrypted (a registered one, pinned so in the
    # catalog): a VMKEEP_PASSPHRASE in nbdkit's environment must not be offered to it
    credentials = (Credentials() if settings.get("plain") == "1" else
                   Credentials.from_env(Path(passphrase_file) if passphrase_file else None,
                                        Path(key_file) if key_file else None))
    repo = Repository.open(open_backend(settings["repo"], s3_endpoint=settings.get("s3-endpoint")), credentials)
    manifest = repo.find_point(settings["name"], settings.get("point") or None)
    reader = PointReader(repo, manifest, settings["disk"], cache_chunks=int(settings.get("cache-chunks", "32")),
                         read_ahead=int(settings.get("read-ahead", "4")))


def open(readonly: bool) -> int:
    return 1


def get_size(h: int) -> int:
    return int(reader.size)


def can_write(h: int) -> bool:
    return False


def can_multi_conn(h: int) -> bool:
    return True  # read-only: every connection sees the same bytes


def can_extents(h: int) -> bool:
    return True


def is_rotational(h: int) -> bool:
    return False


def pread(h: int, buf: Any, offset: int, flags: int) -> None:
    reader.pread_into(memoryview(buf), offset)


def extents(h: int, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    zero = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    return [(o, n, zero if is_zero else 0) for o, n, is_zero in reader.extents(offset, count)]


def cleanup() -> None:
    if reader is not None:
        reader.close()
