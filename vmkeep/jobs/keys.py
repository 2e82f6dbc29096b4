"""The server's master key: seals hypervisor and repository credentials kept in the catalog.

The key lives in a root-only file beside the server (``/etc/vmkeep/master.key``, or
``$VMKEEP_MASTER_KEY_FILE``), never in the database, so a copy of the database alone reveals no
password. Each sealed value is bound to what it belongs to (AES-GCM associated data), so a
value moved to another row does not open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from vmkeep.errors import VmkeepError
from vmkeep.repository.crypto import open_sealed, seal

DEFAULT_KEY_FILE = Path("/etc/vmkeep/master.key")
KEY_SIZE = 32


def key_file() -> Path:
    from vmkeep.settings import settings

    return settings().master_key_file or DEFAULT_KEY_FILE


def master_key(create: bool = True) -> bytes:
    """The master key, made on first use (root-only file)."""
    path = key_file()
    if not path.exists():
        if not create:
            raise VmkeepError(f"no master key at {path}: sealed credentials cannot be opened on this server")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(KEY_SIZE))
    key = path.read_bytes()
    if len(key) != KEY_SIZE:
        raise VmkeepError(f"{path} is not a vmkeep master key ({len(key)} bytes, expected {KEY_SIZE})")
    return key


def proxy_role_password(role: str) -> str:
    """The password of the proxies' database role, derived from the master key: ``vmkeep db upgrade``
    sets it and the master hands it to registering proxies, and neither has to store it."""
    return hmac.new(master_key(), f"vmkeep proxy database role {role}".encode(), hashlib.sha256).hexdigest()


def seal_secret(secret: str, context: str) -> bytes:
    return seal(master_key(), secret.encode(), context.encode())


def open_secret(sealed: bytes, context: str) -> str:
    return open_sealed(master_key(create=False), sealed, context.encode(), f"the sealed secret of {context}").decode()
