"""Keys and authenticated encryption of the repository.

One random 32-byte master secret per repository. Independent sub-keys are derived from it
with BLAKE3's key-derivation mode, so the chunk-id key, the data-encryption key and the
manifest MAC key never coincide. The master secret is kept in the repository config in the
clear (unencrypted repositories), wrapped with a passphrase-derived key (scrypt), or only in
a key file the administrator keeps elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmkeep.errors import ObjectCorrupt, WrongPassphrase
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

    @classmethod
    def derive(cls, secret: bytes, encrypted: bool) -> RepositoryKeys:
        def sub(context: str) -> bytes:
            return blake3.blake3(secret, derive_key_context=f"vmkeep 2026 {context}").digest()

        return cls(
            chunk_id_key=sub("chunk id"),
            data_key=sub("chunk data") if encrypted else None,
            mac_key=sub("manifest mac"),
        )

    def chunk_id(self, data: bytes | bytearray | memoryview) -> bytes:
        """Keyed BLAKE3 of the plaintext: the chunk's name, which leaks nothing without the key."""
        return blake3.blake3(data, key=self.chunk_id_key).digest()

    def mac(self, data: bytes) -> str:
        return blake3.blake3(data, key=self.mac_key).hexdigest()


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


def wrap_secret(secret: bytes, passphrase: bytes) -> dict[str, object]:
    """Wrap the master secret with a key derived from the passphrase (scrypt)."""
    salt = os.urandom(16)
    wrapping_key = kdf.derive(passphrase, salt)
    return {
        "kdf": "scrypt",
        "n": kdf.SCRYPT_N,
        "r": kdf.SCRYPT_R,
        "p": kdf.SCRYPT_P,
        "salt": salt.hex(),
        "wrapped": seal(wrapping_key, secret, b"vmkeep master secret").hex(),
    }


def unwrap_secret(wrapped: dict[str, object], passphrase: bytes) -> bytes:
    if wrapped.get("kdf") != "scrypt":
        raise WrongPassphrase(f"unknown key derivation {wrapped.get('kdf')!r}")
    wrapping_key = kdf.derive(passphrase, *kdf.parameters(wrapped))
    try:
        return open_sealed(wrapping_key, bytes.fromhex(str(wrapped["wrapped"])), b"vmkeep master secret", "key")
    except ObjectCorrupt:
        raise WrongPassphrase(
            "the passphrase does not unlock this repository; check VMKEEP_PASSPHRASE or --passphrase-file"
        ) from None


def new_secret() -> bytes:
    return os.urandom(SECRET_SIZE)
