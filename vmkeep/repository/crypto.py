"""Keys and authenticated encryption of the repository.

One random 32-byte master secret per repository. Independent sub-keys are derived from it
with BLAKE3's key-derivation mode, so the chunk-id key, the data-encryption key and the
manifest MAC key never coincide. The master secret is kept in the repository config in the
clear (unencrypted repositories), wrapped with a passphrase-derived key (scrypt), or only in
a key file the administrator keeps elsewhere.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmkeep.errors import ObjectCorrupt, RepositoryError, WrongPassphrase
from vmkeep.repository import kdf

NONCE_SIZE = 12
TAG_SIZE = 16
SECRET_SIZE = 32


@dataclass(frozen=True)
class RepositoryKeys:
    """The sub-keys derived from one repository's master secret."""

    chunk_id_key: bytes
    data_key: bytes | None  # None: chunks are stored unencrypted
    mac_key: bytes
    config_key: bytes

    @classmethod
    def derive(cls, secret: bytes, encrypted: bool) -> RepositoryKeys:
        def sub(context: str) -> bytes:
            return blake3.blake3(secret, derive_key_context=f"vmkeep 2026 {context}").digest()

        return cls(
            chunk_id_key=sub("chunk id"),
            data_key=sub("chunk data") if encrypted else None,
            mac_key=sub("manifest mac"),
            config_key=sub("config mac"),
        )

    def chunk_id(self, data: bytes | bytearray | memoryview) -> bytes:
        """Keyed BLAKE3 of the plaintext: the chunk's name, which leaks nothing without the key."""
        return blake3.blake3(data, key=self.chunk_id_key).digest()

    def mac(self, data: bytes) -> str:
        return blake3.blake3(data, key=self.mac_key).hexdigest()

    def config_mac(self, data: bytes) -> str:
        """The MAC of the repository config's canonical JSON (a key of its own, so that no
        manifest MAC can ever pass for a config's)."""
        return blake3.blake3(data, key=self.config_key).hexdigest()


def same_mac(expected: str | bytes, given: object) -> bool:
    """Compare a MAC (or keyed hash) with what an object claims, in constant time so that the
    time taken reveals nothing of the right value; a claim of the wrong type is not equal."""
    if isinstance(expected, str):
        return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())
    return isinstance(given, bytes | bytearray | memoryview) and hmac.compare_digest(expected, given)


def seal_into(key: bytes, plaintext: bytes | bytearray | memoryview, aad: bytes, out: memoryview) -> bytes:
    """AES-256-GCM of ``plaintext`` as ciphertext | tag written into ``out``; returns the nonce.

    Writing into a buffer the caller keeps (``encrypt_into``) spares the zero-filling, with the
    GIL held, of a fresh 4 MiB bytes object per chunk that is overwritten right after.
    """
    nonce = os.urandom(NONCE_SIZE)
    AESGCM(key).encrypt_into(nonce, plaintext, aad, out[: len(plaintext) + TAG_SIZE])
    return nonce


def seal(key: bytes, plaintext: bytes | bytearray | memoryview, aad: bytes) -> bytes:
    """AES-256-GCM: nonce | ciphertext | tag (small objects: manifests, wrapped keys)."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, sealed: bytes | memoryview, aad: bytes, what: str) -> bytes:
    """Reverse of :func:`seal`; raises ObjectCorrupt when the tag does not verify."""
    view = memoryview(sealed)
    if len(view) < NONCE_SIZE + TAG_SIZE:
        raise ObjectCorrupt(f"{what} is truncated ({len(view)} bytes)")
    try:
        return AESGCM(key).decrypt(bytes(view[:NONCE_SIZE]), view[NONCE_SIZE:], aad)
    except InvalidTag:
        raise ObjectCorrupt(f"{what} failed authentication: it was modified or damaged") from None


# What the key material is sealed to. A repository whose config carries a MAC seals its master
# secret (or, with a key file, its key check) to the second context, so a config with the MAC
# removed no longer passes for one written before configs were authenticated.
_WRAP_AAD = {False: b"vmkeep master secret", True: b"vmkeep master secret; config.json carries a MAC"}
_KEY_CHECK = {False: b"check", True: b"check; config.json carries a MAC"}


def key_check(secret: bytes, bound: bool = True) -> str:
    """What a key-file repository's config keeps to recognise its key file."""
    return RepositoryKeys.derive(secret, True).mac(_KEY_CHECK[bound])


def check_key_file_secret(secret: bytes, claimed: object) -> bool | None:
    """Whether ``claimed`` (the config's key check) is bound to an authenticated config; None when
    ``secret`` does not match it at all."""
    for bound in (True, False):
        if same_mac(key_check(secret, bound), claimed):
            return bound
    return None


def wrap_secret(secret: bytes, passphrase: bytes, like: dict[str, object] | None = None) -> dict[str, object]:
    """Wrap the master secret with a key derived from the passphrase (scrypt), with a new salt,
    or with the salt and cost of ``like`` (re-sealing an existing record: no new derivation)."""
    salt, n, r, p = kdf.parameters(like) if like else (os.urandom(16), kdf.SCRYPT_N, kdf.SCRYPT_R, kdf.SCRYPT_P)
    wrapping_key = kdf.derive(passphrase, salt, n, r, p)
    return {
        "kdf": "scrypt",
        "n": n,
        "r": r,
        "p": p,
        "salt": salt.hex(),
        "wrapped": seal(wrapping_key, secret, _WRAP_AAD[True]).hex(),
    }


def unwrap_secret(wrapped: dict[str, object], passphrase: bytes) -> tuple[bytes, bool]:
    """The master secret, and whether it was sealed to an authenticated config. The config's key
    parameters are checked before any derivation, so a modified config cannot make scrypt take
    all memory or run for hours."""
    if wrapped.get("kdf") != "scrypt":
        raise WrongPassphrase(f"unknown key derivation {wrapped.get('kdf')!r}")
    try:
        params = kdf.parameters(wrapped)
        sealed = bytes.fromhex(str(wrapped["wrapped"]))
    except (KeyError, ValueError) as exc:
        raise RepositoryError(
            f"the repository's config.json has unusable scrypt parameters ({exc}); it was modified or "
            "damaged: restore config.json from a copy of the repository"
        ) from exc
    wrapping_key = kdf.derive(passphrase, *params)
    for bound in (True, False):
        try:
            return open_sealed(wrapping_key, sealed, _WRAP_AAD[bound], "key"), bound
        except ObjectCorrupt:
            continue
    raise WrongPassphrase(
        "the passphrase does not unlock this repository; check VMKEEP_PASSPHRASE or --passphrase-file "
        "(if it is right, the key parameters in the repository's config.json were modified: restore "
        "config.json from a copy of the repository)"
    )


def new_secret() -> bytes:
    return os.urandom(SECRET_SIZE)
