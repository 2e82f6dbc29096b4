"""The repository facade: chunks, indexes and restore points over one backend."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

import zstandard

from vmkeep.errors import BackendError, ObjectCorrupt, ObjectMissing, PointNotFound, RepositoryError, UsageError
from vmkeep.repository.backends.base import Backend
from vmkeep.repository.chunks import decode_chunk, encode_chunk_into, encode_chunk_parts, max_stored_size
from vmkeep.repository.config import CONFIG_KEY, Credentials, RepoConfig
from vmkeep.repository.crypto import RepositoryKeys, open_sealed, same_mac, seal
from vmkeep.repository.index import DiskIndex
from vmkeep.repository.points import (
    Manifest,
    check_key,
    check_name,
    decode_manifest,
    encode_manifest,
    manifest_key,
    point_stamp,
)

log = logging.getLogger(__name__)


def _no_points(name: str) -> PointNotFound:
    return PointNotFound(f"the repository has no restore points for {name!r}; see `vmkeep points`")


def _creation(manifest: Manifest) -> tuple[str, str]:
    """Points in the order they were committed."""
    return manifest.created, manifest.point_id


def _refuse_damaged(damaged: list[tuple[str, str]]) -> None:
    if damaged:
        raise ObjectCorrupt(f"{damaged[0][1]}; run `vmkeep repo verify`")


def _store_upgraded(backend: Backend, config: RepoConfig) -> None:
    """Store a config that just got its MAC. The config is outside S3 Object Lock, so this works
    on immutable repositories too; where it cannot be written (read-only storage, a policy that
    forbids it) the repository is used anyway and the next open tries again."""
    try:
        backend.put(CONFIG_KEY, config.to_json(), durable=True)
    except BackendError as exc:
        log.warning("could not add the MAC to the config of %s (%s); it stays unauthenticated until a "
                    "later open can write it", backend.url, exc)
        return
    log.info("added a MAC to the config of %s", backend.url)


def chunk_key(chunk_id: bytes) -> str:
    h = chunk_id.hex()
    return f"chunks/{h[:2]}/{h}"


class Repository:
    def __init__(self, backend: Backend, config: RepoConfig, keys: RepositoryKeys, secret: bytes) -> None:
        self.backend = backend
        self.config = config
        self.keys = keys
        self.secret = secret  # the master secret: only for a repository made to share these keys

    # -- lifecycle -------------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        backend: Backend,
        *,
        chunk_size: int,
        compression: int,
        encrypt: bool,
        credentials: Credentials,
        immutable_days: int = 0,
        secret: bytes | None = None,
    ) -> Repository:
        """A new repository; ``secret``: the master secret of one it is to share keys with (see
        :meth:`init_like`), else a new one."""
        if immutable_days and not backend.supports_immutability:
            raise UsageError("--immutable-days needs an S3 repository (it relies on S3 Object Lock)")
        backend.immutable_days = immutable_days
        if backend.stat(CONFIG_KEY) is not None:
            raise UsageError(f"{backend.url} is already a vmkeep repository")
        config, secret = RepoConfig.create(chunk_size, compression, encrypt, credentials, immutable_days, secret)
        keys = RepositoryKeys.derive(secret, encrypt)
        config.sign(keys)
        if not backend.put(CONFIG_KEY, config.to_json(), if_absent=True, durable=True):
            raise UsageError(f"{backend.url} is already a vmkeep repository")
        return cls(backend, config, keys, secret)

    @classmethod
    def init_like(cls, backend: Backend, like: Repository, *, credentials: Credentials,
                  immutable_days: int = 0) -> Repository:
        """A repository sharing ``like``'s key material, chunk size, compression and encryption: the
        same plaintext has the same chunk id and stored form in both, so a backup copy between them
        moves chunks as they are stored, never decrypted. Its own id, credentials (the same secret
        wrapped with its own passphrase or key file) and retention."""
        return cls.init(backend, chunk_size=like.config.chunk_size, compression=like.config.compression,
                        encrypt=like.config.encrypted, credentials=credentials, immutable_days=immutable_days,
                        secret=like.secret)

    @classmethod
    def open(cls, backend: Backend, credentials: Credentials,
             expect: Callable[[RepoConfig], None] | None = None) -> Repository:
        """Open with ``credentials``; ``expect`` may refuse the config (by raising) before it is
        unlocked or anything is written. The config's MAC is checked under the repository key;
        a config written before configs were authenticated gets its MAC now."""
        try:
            raw = backend.get(CONFIG_KEY)
        except ObjectMissing:
            raise RepositoryError(
                f"{backend.url} is not a vmkeep repository (no {CONFIG_KEY}); create one with `vmkeep repo init`"
            ) from None
        config = RepoConfig.from_json(raw, backend.url)
        if expect is not None:
            expect(config)
        secret = config.unlock(credentials, backend.url)
        keys = RepositoryKeys.derive(secret, config.encrypted)
        if config.authenticate(keys, secret, credentials, backend.url):
            _store_upgraded(backend, config)
        backend.immutable_days = config.immutable_days
        return cls(backend, config, keys, secret)

    def close(self) -> None:
        self.backend.close()

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    # -- chunks ----------------------------------------------------------------------------------
    def store_chunk(self, chunk_id: bytes, plaintext: bytes | bytearray | memoryview) -> int:
        """Store a chunk unless the repository has it; return the bytes written (0 on a dedup hit).

        A hit refreshes the chunk's mtime, which is what keeps a concurrent garbage collection
        from sweeping a chunk this backup is about to reference.
        """
        key = chunk_key(chunk_id)
        if self.backend.touch(key):
            return 0
        level = self.config.compression
        staging = self.backend.staging_buffer(max_stored_size(len(plaintext)))
        data: list[bytes | bytearray | memoryview]
        if staging is not None:
            data = [staging[: encode_chunk_into(self.keys, chunk_id, plaintext, level, staging)]]
        else:
            data = encode_chunk_parts(self.keys, chunk_id, plaintext, level)
        if not self.backend.put(key, data, if_absent=True):
            return 0
        return sum(len(p) for p in data)

    def prefetch_chunks(self, chunk_ids: list[bytes]) -> None:
        """Let the backend start reading chunks that :meth:`load_chunk` will ask for soon."""
        self.backend.prefetch([chunk_key(cid) for cid in chunk_ids])

    def load_chunk(self, chunk_id: bytes, size: int) -> bytes:
        key = chunk_key(chunk_id)
        try:
            stored = self.backend.get(key)
        except ObjectMissing:
            raise ObjectMissing(f"chunk {chunk_id.hex()} is missing from the repository") from None
        return decode_chunk(self.keys, chunk_id, stored, size)

    # -- restore points --------------------------------------------------------------------------
    def _read_manifest(self, key: str) -> Manifest:
        """The manifest stored at ``key``, which must be that point's own key: the MAC proves
        only that this repository wrote it, not that it was written there."""
        manifest = decode_manifest(self.backend.get(key), self.keys.mac, key)
        if manifest_key(manifest.name, manifest.point_id) != key:
            raise ObjectCorrupt(f"{key} is damaged: it holds the manifest of {manifest.name}@{manifest.point_id} "
                                "(copied or moved there), so it is not used")
        return manifest

    def _read_points(self, keys: Iterable[str]) -> tuple[list[Manifest], list[tuple[str, str]]]:
        """The readable manifests among ``keys`` (one deleted meanwhile by a prune is passed over),
        and the damaged ones as (key, reason)."""
        points, damaged = [], []
        for key in keys:
            try:
                points.append(self._read_manifest(key))
            except ObjectMissing:
                continue
            except (ObjectCorrupt, RepositoryError) as exc:
                damaged.append((key, str(exc)))
        return points, damaged

    def scan_points(self, name: str | None = None) -> tuple[list[Manifest], list[tuple[str, str]]]:
        """One pass over the manifests: the readable points oldest first, and the damaged ones as
        (key, reason)."""
        prefix = f"points/{check_name(name)}/" if name else "points/"
        points, damaged = self._read_points(info.key for info in self.backend.list(prefix)
                                            if info.key.endswith(".json"))
        return sorted(points, key=_creation), damaged

    def list_points(self, name: str | None = None) -> list[Manifest]:
        """Every committed restore point (optionally of one name), oldest first; a damaged manifest
        is an error here (verify and gc report it instead)."""
        points, damaged = self.scan_points(name)
        _refuse_damaged(damaged)
        return points

    def point_ids(self, name: str) -> list[str]:
        """The ids of ``name``'s committed points, from one listing (no manifest is read)."""
        prefix = f"points/{check_name(name)}/"
        return sorted(info.key[len(prefix):-len(".json")] for info in self.backend.list(prefix)
                      if info.key.endswith(".json"))

    def latest_point(self, name: str) -> Manifest | None:
        """The newest point of ``name`` (what ``list_points(name)[-1]`` gives), reading only the
        manifests that began in the newest second.

        A point's id begins with its backup's start, and one VM's backups run one after another
        (libvirt runs one backup job per VM), so the newest point is among the ids with the
        greatest stamp. Every backup needs its parent: in object storage, reading a VM's months
        of manifests would cost a request per point. Ids without a stamp are read in full.
        """
        by_stamp: dict[str, list[str]] = {}
        for point_id in self.point_ids(name):
            stamp = point_stamp(point_id)
            if stamp is None:
                points = self.list_points(name)
                return points[-1] if points else None
            by_stamp.setdefault(stamp, []).append(point_id)
        for stamp in sorted(by_stamp, reverse=True):
            newest, damaged = self._read_points(manifest_key(name, point_id) for point_id in by_stamp[stamp])
            _refuse_damaged(damaged)
            if newest:
                return max(newest, key=_creation)
        return None

    def load_point(self, name: str, point_id: str) -> Manifest | None:
        """The point ``point_id`` of ``name`` read directly (one request), None when it is not there."""
        try:
            return self._read_manifest(manifest_key(check_name(name), point_id))
        except ObjectMissing:
            return None

    def find_point(self, name: str, point: str | None = None) -> Manifest:
        """The point ``point`` of ``name`` (an id, a unique id prefix, or None/'latest')."""
        if point in (None, "latest"):
            latest = self.latest_point(name)
            if latest is None:
                raise _no_points(name)
            return latest
        if point_stamp(point) is not None:  # a whole id is read directly: other points' damage is no matter
            direct = self.load_point(name, point)
            if direct is not None:
                return direct
        points = self.list_points(name)
        if not points:
            raise _no_points(name)
        matches = [m for m in points if m.point_id.startswith(point)]
        if len(matches) != 1:
            which = "no" if not matches else "more than one"
            raise PointNotFound(f"{which} restore point of {name!r} matches {point!r}; see `vmkeep points {name}`")
        return matches[0]

    def load_index(self, manifest: Manifest, disk: str) -> DiskIndex:
        return self.load_index_data(manifest, disk)[0]

    def load_index_data(self, manifest: Manifest, disk: str) -> tuple[DiskIndex, bytes]:
        """The index of ``disk`` in ``manifest`` and its bytes as stored, once its MAC is checked
        (a copy between repositories sharing keys stores those same bytes)."""
        entry = manifest.disks.get(disk)
        if entry is None:
            raise PointNotFound(
                f"point {manifest.point_id} of {manifest.name} has no disk {disk!r} "
                f"(it has {', '.join(sorted(manifest.disks))})"
            )
        what = f"the index of disk {disk} in point {manifest.name}@{manifest.point_id}"
        try:
            data = self.backend.get(entry.index_key)
        except ObjectMissing:
            raise ObjectMissing(f"{what} is missing from the repository") from None
        if not same_mac(self.keys.mac(data), entry.index_mac):
            raise ObjectCorrupt(f"{what} is damaged or truncated (its MAC does not match the manifest)")
        index = DiskIndex.decode(data, what)
        if index.size != entry.size or index.chunk_size != manifest.chunk_size:
            raise ObjectCorrupt(f"{what} does not match its manifest")
        return index, data

    def write_index(self, key: str, index: DiskIndex) -> str:
        """Store an index object and return its MAC for the manifest."""
        data = index.encode()
        self.backend.put(key, data)
        return self.keys.mac(data)

    def seal_record(self, record: dict[str, Any], context: str) -> str:
        """A JSON record to keep in a manifest, compressed, and encrypted when the repository is.

        VM configurations go this way: domain XML carries passwords, and firmware variables are
        the guest's; a manifest itself is only authenticated.
        """
        data = zstandard.ZstdCompressor(level=9).compress(json.dumps(record).encode())
        if self.keys.data_key is not None:
            data = seal(self.keys.data_key, data, context.encode())
        return base64.b64encode(data).decode()

    def open_record(self, text: str, context: str) -> dict[str, Any]:
        """Reverse :meth:`seal_record`; a damaged record raises ObjectCorrupt."""
        what = f"the sealed record ({context})"
        try:
            data = base64.b64decode(text, validate=True)
        except ValueError:
            raise ObjectCorrupt(f"{what} is not valid base64") from None
        if self.keys.data_key is not None:
            data = open_sealed(self.keys.data_key, data, context.encode(), what)
        try:
            record = json.loads(zstandard.ZstdDecompressor().decompress(data))
        except (zstandard.ZstdError, ValueError):
            raise ObjectCorrupt(f"{what} does not decode") from None
        if not isinstance(record, dict):
            raise ObjectCorrupt(f"{what} is not a record")
        return record

    def commit_point(self, manifest: Manifest) -> None:
        """Make the point visible: chunks and indexes durable first, then the manifest."""
        self.backend.flush()
        key = manifest_key(manifest.name, manifest.point_id)
        self.backend.put(key, encode_manifest(manifest, self.keys.mac), if_absent=True, durable=True)

    def delete_points(self, manifests: Iterable[Manifest]) -> None:
        """Remove manifests only; their indexes and chunks are reclaimed by garbage collection."""
        for m in manifests:
            self.backend.delete(manifest_key(m.name, m.point_id))
            if self.backend.stat(check_key(m.name, m.point_id)) is not None:
                self.backend.delete(check_key(m.name, m.point_id))

    def record_check(self, manifest: Manifest, result: dict[str, Any]) -> None:
        """Keep the outcome of a boot check of ``manifest`` (sealed like a VM configuration)."""
        text = self.seal_record(result, f"boot check of {manifest.name}@{manifest.point_id}")
        self.backend.put(check_key(manifest.name, manifest.point_id), text.encode(), durable=True)

    def load_check(self, manifest: Manifest) -> dict[str, Any] | None:
        """The last boot check of ``manifest``, or None when it was never checked."""
        key = check_key(manifest.name, manifest.point_id)
        if self.backend.stat(key) is None:
            return None
        return self.open_record(self.backend.get(key).decode(), f"boot check of {manifest.name}@{manifest.point_id}")
