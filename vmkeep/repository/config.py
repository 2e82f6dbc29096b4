"""The repository's config object: format version, chunk size, compression and key material."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmkeep.errors import FormatTooNew, RepositoryError, UsageError, WrongPassphrase
from vmkeep.repository import crypto, kdf

REPO_FORMAT = 1
CONFIG_KEY = "config.json"
CHUNK_SIZES = {1 << 20, 2 << 20, 4 << 20, 8 << 20}
DEFAULT_CHUNK_SIZE = 4 << 20
DEFAULT_COMPRESSION = 1  # zstd level; 0 stores chunks uncompressed


@dataclass
class Credentials:
    """How to unlock an encrypted repository: a passphrase, or a key file."""

    passphrase: bytes | None = None
    key_file: Path | None = None

    @classmethod
    def from_env(cls, passphrase_file: Path | None = None, key_file: Path | None = None) -> Credentials:
        return cls(kdf.read_passphrase(passphrase_file), key_file)


@dataclass
class RepoConfig:
    repo_id: str
    chunk_size: int
    compression: int
    encryption: dict[str, Any]
    immutable_days: int = 0
    created: str = ""

    @property
    def encrypted(self) -> bool:
        return self.encryption["mode"] != "none"

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "vmkeep": "repository",
                "format": REPO_FORMAT,
                "id": self.repo_id,
                "created": self.created,
                "chunk_size": self.chunk_size,
                "compression": {"algorithm": "zstd", "level": self.compression},
                "encryption": self.encryption,
                "immutable_days": self.immutable_days,
            },
            indent=1,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> RepoConfig:
        try:
            raw = json.loads(data)
            if raw.get("vmkeep") != "repository":
                raise ValueError
        except (ValueError, AttributeError):
            raise RepositoryError(f"{where} is not a vmkeep repository (its config is unreadable)") from None
        if raw["format"] > REPO_FORMAT:
            raise FormatTooNew(
                f"{where} was written by a newer vmkeep (repository format {raw['format']}, this vmkeep "
                f"reads up to {REPO_FORMAT}); upgrade vmkeep to use it"
            )
        return cls(
            repo_id=raw["id"],
            chunk_size=raw["chunk_size"],
            compression=raw["compression"]["level"],
            encryption=raw["encryption"],
            immutable_days=raw.get("immutable_days", 0),
            created=raw.get("created", ""),
        )

    @classmethod
    def create(
        cls, chunk_size: int, compression: int, encrypt: bool, credentials: Credentials, immutable_days: int
    ) -> tuple[RepoConfig, bytes]:
        """A new config and its master secret. A key file named in ``credentials`` is written."""
        if chunk_size not in CHUNK_SIZES:
            raise UsageError("chunk size must be 1M, 2M, 4M or 8M")
        secret = crypto.new_secret()
        repo_id = uuid.uuid4().hex
        encryption: dict[str, Any]
        if not encrypt:
            encryption = {"mode": "none", "secret": secret.hex()}
        elif credentials.key_file is not None:
            write_key_file(credentials.key_file, repo_id, secret)
            encryption = {"mode": "keyfile", "key_check": crypto.RepositoryKeys.derive(secret, True).mac(b"check")}
        elif credentials.passphrase:
            encryption = {"mode": "passphrase", **crypto.wrap_secret(secret, credentials.passphrase)}
        else:
            raise UsageError(
                "an encrypted repository needs a passphrase (VMKEEP_PASSPHRASE or --passphrase-file) or --key-file"
            )
        config = cls(repo_id, chunk_size, compression, encryption, immutable_days,
                     datetime.now(UTC).isoformat(timespec="seconds"))
        return config, secret

    def unlock(self, credentials: Credentials, where: str) -> bytes:
        """The master secret, unwrapped with the given credentials."""
        mode = self.encryption["mode"]
        if mode == "none":
            return bytes.fromhex(self.encryption["secret"])
        if mode == "passphrase":
            if not credentials.passphrase:
                raise WrongPassphrase(
                    f"{where} is encrypted: set VMKEEP_PASSPHRASE or pass --passphrase-file"
                )
            return crypto.unwrap_secret(self.encryption, credentials.passphrase)
        if mode == "keyfile":
            if credentials.key_file is None:
                raise WrongPassphrase(f"{where} is encrypted with a key file: pass --key-file")
            secret = read_key_file(credentials.key_file, self.repo_id)
            if crypto.RepositoryKeys.derive(secret, True).mac(b"check") != self.encryption["key_check"]:
                raise WrongPassphrase(f"the key file {credentials.key_file} does not unlock {where}")
            return secret
        raise FormatTooNew(f"{where} uses encryption mode {mode!r}; upgrade vmkeep")


def write_key_file(path: Path, repo_id: str, secret: bytes) -> None:
    if path.exists():
        raise UsageError(f"the key file {path} already exists; choose another path")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"vmkeep": "key", "repository": repo_id, "secret": secret.hex()}, f)


def read_key_file(path: Path, repo_id: str) -> bytes:
    try:
        raw = json.loads(path.read_text())
        secret = bytes.fromhex(raw["secret"])
    except (OSError, ValueError, KeyError) as exc:
        raise WrongPassphrase(f"cannot read the key file {path}: {exc}") from None
    if raw.get("repository") != repo_id:
        raise WrongPassphrase(f"the key file {path} belongs to another repository")
    return secret
