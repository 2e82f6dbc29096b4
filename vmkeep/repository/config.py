"""The repository's config object: format version, chunk size, compression and key material."""

from __future__ import annotations

import json
import os
import re
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
ID_RE = re.compile(r"^[0-9A-Za-z-]{1,64}$")  # vmkeep writes uuid4 hex; the catalog keeps 64 characters


@dataclass
class Credentials:
    """How to unlock an encrypted repository: a passphrase, or a key file."""

    passphrase: bytes | None = None
    key_file: Path | None = None

    @classmethod
    def from_env(cls, passphrase_file: Path | None = None, key_file: Path | None = None) -> Credentials:
        return cls(kdf.read_passphrase(passphrase_file), key_file)


RESTORE_HINT = ("restore config.json from a copy of the repository (on S3 with versioning, an earlier "
                "version of the object)")


def damaged(where: str, what: str) -> RepositoryError:
    return RepositoryError(f"the config.json of {where} is damaged ({what}); {RESTORE_HINT}")


def _get(raw: dict[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    """One field of a parsed config, of the expected type (a bool is no int)."""
    value = raw.get(key, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise damaged(where, f"{key!r} is {value!r}")
    return value


@dataclass
class RepoConfig:
    """The parsed config. ``body`` is exactly what was stored (less the MAC): the MAC covers every
    field, including any this vmkeep does not know."""

    repo_id: str
    chunk_size: int
    compression: int
    encryption: dict[str, Any]
    immutable_days: int
    created: str
    body: dict[str, Any]
    mac: str | None = None  # None: written before configs were authenticated
    bound: bool = False  # the key material says the config carries a MAC (known once unlocked)

    @property
    def encrypted(self) -> bool:
        return self.encryption["mode"] != "none"

    def canonical(self) -> bytes:
        """The bytes the MAC covers: the body as canonical JSON, independent of formatting."""
        return json.dumps(self.body, sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> bytes:
        return json.dumps(self.body if self.mac is None else {**self.body, "mac": self.mac}, indent=1).encode()

    @classmethod
    def from_body(cls, raw: dict[str, Any], where: str, mac: str | None = None) -> RepoConfig:
        """Check every field's type and range; a bad one is a damaged config, never a crash."""
        version = _get(raw, "format", int, where)
        if version > REPO_FORMAT:
            raise FormatTooNew(
                f"{where} was written by a newer vmkeep (repository format {version}, this vmkeep "
                f"reads up to {REPO_FORMAT}); upgrade vmkeep to use it"
            )
        compression = _get(raw, "compression", dict, where)
        level = _get(compression, "level", int, where)
        encryption = _get(raw, "encryption", dict, where)
        _get(encryption, "mode", str, where)
        config = cls(
            repo_id=_get(raw, "id", str, where), chunk_size=_get(raw, "chunk_size", int, where),
            compression=level, encryption=encryption, immutable_days=_get(raw, "immutable_days", int, where, 0),
            created=_get(raw, "created", str, where, ""), body=raw, mac=mac,
        )
        if not ID_RE.match(config.repo_id):
            raise damaged(where, f"id {config.repo_id!r}")
        if config.chunk_size not in CHUNK_SIZES:
            raise damaged(where, f"chunk size {config.chunk_size}")
        if not 0 <= level <= 22 or version < 1 or config.immutable_days < 0:
            raise damaged(where, f"format {version}, compression level {level}, {config.immutable_days} days")
        return config

    @classmethod
    def from_json(cls, data: bytes, where: str) -> RepoConfig:
        try:
            raw = json.loads(data)
            if raw.get("vmkeep") != "repository":
                raise ValueError
        except (ValueError, AttributeError):
            raise RepositoryError(f"{where} is not a vmkeep repository (its config is unreadable)") from None
        mac = raw.pop("mac", None)
        if mac is not None and not isinstance(mac, str):
            raise damaged(where, f"mac {mac!r}")
        return cls.from_body(raw, where, mac)

    @classmethod
    def create(
        cls, chunk_size: int, compression: int, encrypt: bool, credentials: Credentials, immutable_days: int,
        secret: bytes | None = None,
    ) -> tuple[RepoConfig, bytes]:
        """A new config (not yet authenticated: see :meth:`authenticate`) and its master secret:
        ``secret`` when given (a repository sharing another's keys), else a new one. A key file
        named in ``credentials`` is written."""
        if chunk_size not in CHUNK_SIZES:
            raise UsageError("chunk size must be 1M, 2M, 4M or 8M")
        secret = secret or crypto.new_secret()
        repo_id = uuid.uuid4().hex
        encryption: dict[str, Any]
        if not encrypt:
            encryption = {"mode": "none", "secret": secret.hex()}
        elif credentials.key_file is not None:
            write_key_file(credentials.key_file, repo_id, secret)
            encryption = {"mode": "keyfile", "key_check": crypto.key_check(secret)}
        elif credentials.passphrase:
            encryption = {"mode": "passphrase", **crypto.wrap_secret(secret, credentials.passphrase)}
        else:
            raise UsageError(
                "an encrypted repository needs a passphrase (VMKEEP_PASSPHRASE or --passphrase-file) or --key-file"
            )
        body = {
            "vmkeep": "repository", "format": REPO_FORMAT, "id": repo_id,
            "created": datetime.now(UTC).isoformat(timespec="seconds"), "chunk_size": chunk_size,
            "compression": {"algorithm": "zstd", "level": compression}, "encryption": encryption,
            "immutable_days": immutable_days,
        }
        config = cls.from_body(body, "the new repository")
        config.bound = encrypt
        return config, secret

    def unlock(self, credentials: Credentials, where: str) -> bytes:
        """The master secret, unwrapped with the given credentials.

        Credentials given to a repository whose config says it is unencrypted are refused: the
        config is not authenticated without a key, so "mode none" is exactly what someone who
        can write config.json would put there to make the next backup store plaintext.
        """
        mode = self.encryption["mode"]
        if mode == "none":
            if credentials.passphrase or credentials.key_file is not None:
                raise RepositoryError(
                    f"{where} claims to be unencrypted (its config.json says encryption mode 'none') but a "
                    "passphrase or key file was given; if it was created without encryption, run without "
                    "VMKEEP_PASSPHRASE, --passphrase-file and --key-file; otherwise its config.json has been "
                    f"tampered with: do not back up into it, and {RESTORE_HINT}"
                )
            try:
                return bytes.fromhex(str(self.encryption["secret"]))
            except (KeyError, ValueError) as exc:
                raise damaged(where, "its secret is unreadable") from exc
        if mode == "passphrase":
            if not credentials.passphrase:
                raise WrongPassphrase(
                    f"{where} is encrypted: set VMKEEP_PASSPHRASE or pass --passphrase-file"
                )
            secret, self.bound = crypto.unwrap_secret(self.encryption, credentials.passphrase)
            return secret
        if mode == "keyfile":
            if credentials.key_file is None:
                raise WrongPassphrase(f"{where} is encrypted with a key file: pass --key-file")
            secret = read_key_file(credentials.key_file, self.repo_id)
            bound = crypto.check_key_file_secret(secret, self.encryption.get("key_check"))
            if bound is None:
                raise WrongPassphrase(f"the key file {credentials.key_file} does not unlock {where}")
            self.bound = bound
            return secret
        raise FormatTooNew(f"{where} uses encryption mode {mode!r}; upgrade vmkeep")

    def sign(self, keys: crypto.RepositoryKeys) -> None:
        self.mac = keys.config_mac(self.canonical())

    def authenticate(self, keys: crypto.RepositoryKeys, secret: bytes, credentials: Credentials, where: str) -> bool:
        """Check the config's MAC under the repository key (after :meth:`unlock`). True when the
        config has none yet (a repository made before configs were authenticated): its key
        material is then sealed to an authenticated config and the MAC added, to be stored."""
        if self.mac is None:
            if self.bound:
                raise RepositoryError(
                    f"the config.json of {where} was modified: its MAC was removed (its key material belongs to "
                    f"an authenticated config); vmkeep will not use it, and nothing was written; {RESTORE_HINT}"
                )
            if self.encryption["mode"] == "passphrase" and credentials.passphrase:
                self.encryption.update(crypto.wrap_secret(secret, credentials.passphrase, like=self.encryption))
            elif self.encryption["mode"] == "keyfile":
                self.encryption["key_check"] = crypto.key_check(secret)
            self.bound = self.encrypted
            self.sign(keys)
            return True
        if not crypto.same_mac(keys.config_mac(self.canonical()), self.mac):
            raise RepositoryError(
                f"the config.json of {where} was modified (its MAC does not match under the repository key: "
                "chunk size, compression, id, retention or key parameters were changed); vmkeep will not use "
                f"it, and nothing was written; {RESTORE_HINT}"
            )
        return False


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
