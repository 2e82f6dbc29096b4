"""Encoding of one stored chunk: compress, then encrypt, then checksum.

Stored layout::

    b"VKC" version(1) | flags(1) | reserved(3) | xxh3-128 of payload (16) | payload

flags bit 0: payload is zstd-compressed; bit 1: payload is AES-256-GCM sealed with the chunk
id as associated data, so a chunk cannot be swapped for another. The xxh3 checksum covers the
stored bytes, which lets `verify --no-key`-style scans and the restore path spot bit rot
cheaply before any decryption.
"""

from __future__ import annotations

import struct
import threading

import xxhash
import zstandard

from vmkeep.buffers import copy_into
from vmkeep.errors import FormatTooNew, ObjectCorrupt
from vmkeep.repository.crypto import NONCE_SIZE, TAG_SIZE, RepositoryKeys, open_sealed, same_mac, seal_into

CHUNK_MAGIC = b"VKC"
CHUNK_VERSION = 1
FLAG_ZSTD = 1
FLAG_AESGCM = 2
HEADER = struct.Struct("<3sBB3x16s")

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


SAMPLE = 32 * 1024
SAMPLE_SHRINK = 0.9


def worth_compressing(plaintext: bytes | bytearray | memoryview, level: int) -> bool:
    """Compress three small samples first: incompressible chunks (media, encrypted or already
    compressed data) then skip zstd entirely, which is most of its cost on such data."""
    n = len(plaintext)
    if n <= 4 * SAMPLE:
        return True
    view = memoryview(plaintext)
    compressor = _compressor(level)
    for start in (0, n // 3, (2 * n) // 3):
        if len(compressor.compress(view[start : start + SAMPLE])) < SAMPLE * SAMPLE_SHRINK:
            return True
    return False


def _compressed(plaintext: bytes | bytearray | memoryview, level: int) -> tuple[bytes | bytearray | memoryview, int]:
    """The payload before encryption and its flags: zstd output when it is smaller, else the plaintext."""
    if level > 0 and worth_compressing(plaintext, level):
        compressed = _compressor(level).compress(plaintext)
        if len(compressed) < len(plaintext):
            return compressed, FLAG_ZSTD
    return plaintext, 0


def max_stored_size(plaintext_size: int) -> int:
    """The most bytes a chunk of this size can take once stored (header, nonce and tag added)."""
    return HEADER.size + NONCE_SIZE + plaintext_size + TAG_SIZE


def encode_chunk_into(keys: RepositoryKeys, chunk_id: bytes, plaintext: bytes | bytearray | memoryview, level: int,
                      out: memoryview) -> int:
    """Encode a chunk straight into ``out`` (at least :func:`max_stored_size` long); return its length.

    Used where the backend hands out the buffer it writes from, so the ciphertext is never copied.
    """
    payload, flags = _compressed(plaintext, level)
    start = HEADER.size
    if keys.data_key is not None:
        out[start : start + NONCE_SIZE] = seal_into(keys.data_key, payload, chunk_id, out[start + NONCE_SIZE :])
        end = start + NONCE_SIZE + len(payload) + TAG_SIZE
        flags |= FLAG_AESGCM
    else:
        copy_into(out[start:], payload)
        end = start + len(payload)
    out[:start] = _header(flags, out[start:end])
    return end


def _header(flags: int, payload: bytes | bytearray | memoryview) -> bytes:
    return HEADER.pack(CHUNK_MAGIC, CHUNK_VERSION, flags, xxhash.xxh3_128_digest(payload))


def encode_chunk_parts(
    keys: RepositoryKeys, chunk_id: bytes, plaintext: bytes | bytearray | memoryview, level: int
) -> list[bytes | bytearray | memoryview]:
    """The bytes stored under a chunk id, as parts to be written back to back (no 4 MiB copy).

    Encrypted chunks are encoded into a buffer the thread keeps (valid until the thread encodes
    again); a plain chunk is its header and the payload itself.
    """
    if keys.data_key is not None:
        needed = max_stored_size(len(plaintext))
        buf: bytearray | None = getattr(_local, "encoded", None)
        if buf is None or len(buf) < needed:
            buf = _local.encoded = bytearray(needed)  # a new one: views of the old may live on
        view = memoryview(buf)
        return [view[: encode_chunk_into(keys, chunk_id, plaintext, level, view)]]
    payload, flags = _compressed(plaintext, level)
    return [_header(flags, payload), payload]


def encode_chunk(keys: RepositoryKeys, chunk_id: bytes, plaintext: bytes | bytearray | memoryview, level: int) -> bytes:
    """Turn a plaintext chunk into the bytes stored under its id."""
    return b"".join(encode_chunk_parts(keys, chunk_id, plaintext, level))


def check_stored(stored: bytes | memoryview, what: str) -> tuple[int, memoryview]:
    """Check the stored bytes against their checksum (no key needed); return flags and payload."""
    view = memoryview(stored)
    if len(view) < HEADER.size:
        raise ObjectCorrupt(f"{what} is truncated ({len(view)} bytes)")
    magic, version, flags, checksum = HEADER.unpack_from(view)
    if magic != CHUNK_MAGIC:
        raise ObjectCorrupt(f"{what} is not a vmkeep chunk (bad magic)")
    if version > CHUNK_VERSION:
        raise FormatTooNew(f"{what} uses chunk format {version}; upgrade vmkeep to read it")
    payload = view[HEADER.size :]
    if xxhash.xxh3_128_digest(payload) != checksum:
        raise ObjectCorrupt(f"{what} is damaged: its stored bytes do not match their checksum")
    return flags, payload


def decode_chunk(keys: RepositoryKeys, chunk_id: bytes, stored: bytes, expected_size: int) -> bytes:
    """Reverse :func:`encode_chunk` and prove the result is the plaintext named by ``chunk_id``."""
    what = f"chunk {chunk_id.hex()}"
    flags, payload = check_stored(stored, what)
    data: bytes | memoryview = payload
    if flags & FLAG_AESGCM:
        if keys.data_key is None:
            raise ObjectCorrupt(f"{what} is encrypted but the repository is not")
        data = open_sealed(keys.data_key, payload, chunk_id, what)
    if flags & FLAG_ZSTD:
        try:
            data = _decompressor().decompress(data, max_output_size=expected_size)
        except zstandard.ZstdError as exc:
            raise ObjectCorrupt(f"{what} does not decompress: {exc}") from None
    if len(data) != expected_size or not same_mac(keys.chunk_id(data), chunk_id):
        raise ObjectCorrupt(f"{what} does not hash to its id: its content is wrong")
    return bytes(data) if isinstance(data, memoryview) else data
