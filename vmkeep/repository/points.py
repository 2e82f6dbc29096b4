"""Restore points: an authenticated JSON manifest plus one index object per disk.

The manifest is the commit record: it is written last, durably, after every chunk and index it
references is on stable storage. Readers list manifests only, so a half-written point is never
visible. The manifest carries a keyed MAC (repository key) and the MAC of each index, so a
damaged or swapped index is detected before it is used.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vmkeep.errors import FormatTooNew, ObjectCorrupt, UsageError
from vmkeep.repository.crypto import same_mac

MANIFEST_FORMAT = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
POINT_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


def check_name(name: str, what: str = "name") -> str:
    if not NAME_RE.match(name):
        raise UsageError(
            f"{what} {name!r} is not usable: use letters, digits, '.', '_' and '-', starting with a "
            "letter or digit (at most 128 characters)"
        )
    return name


POINT_STAMP = re.compile(r"\d{8}T\d{6}Z-")  # how every point id vmkeep makes begins


def new_point_id(now: datetime | None = None) -> str:
    """A new point id: the backup's start (UTC, to the second, so ids sort by it) and a random tail."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def point_stamp(point_id: str) -> str | None:
    """The start stamp ``point_id`` begins with, None for an id vmkeep did not make."""
    return point_id[:16] if POINT_STAMP.match(point_id) else None


def check_key(name: str, point_id: str) -> str:
    """Where a boot check of a point is recorded (beside, never inside, its immutable manifest)."""
    return f"checks/{name}/{point_id}.json"


def manifest_key(name: str, point_id: str) -> str:
    return f"points/{name}/{point_id}.json"


def index_key(name: str, point_id: str, disk: str) -> str:
    return f"indexes/{name}/{point_id}/{disk}.idx"


@dataclass
class DiskEntry:
    """One disk of a restore point."""

    size: int
    index_key: str
    index_mac: str
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    name: str
    point_id: str
    created: str
    parent: str | None
    disks: dict[str, DiskEntry]
    chunk_size: int
    meta: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def created_at(self) -> datetime:
        return datetime.fromisoformat(self.created)

    def body(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "id": self.point_id,
            "created": self.created,
            "parent": self.parent,
            "chunk_size": self.chunk_size,
            "disks": {
                d: {"size": e.size, "index": e.index_key, "index_mac": e.index_mac, "stats": e.stats}
                for d, e in self.disks.items()
            },
            "meta": self.meta,
            "stats": self.stats,
        }

    @property
    def logical_size(self) -> int:
        return sum(e.size for e in self.disks.values())


def encode_manifest(manifest: Manifest, mac: Callable[[bytes], str]) -> bytes:
    body = json.dumps(manifest.body(), sort_keys=True, separators=(",", ":"))
    return json.dumps({"manifest": json.loads(body), "mac": mac(body.encode())}, indent=1).encode()


def _typed(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    value = body[key] if default is ... else body.get(key, default)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{key!r} is {value!r}")
    return value


def _disk(entry: Any) -> DiskEntry:
    if not isinstance(entry, dict):
        raise TypeError(f"a disk entry is {entry!r}")
    return DiskEntry(_typed(entry, "size", int), _typed(entry, "index", str), _typed(entry, "index_mac", str),
                     _typed(entry, "stats", dict, {}))


def _manifest(body: dict[str, Any]) -> Manifest:
    created = _typed(body, "created", str)
    datetime.fromisoformat(created)  # ValueError when it is not a time
    return Manifest(
        name=_typed(body, "name", str),
        point_id=_typed(body, "id", str),
        created=created,
        parent=_typed(body, "parent", (str, type(None)), None),
        chunk_size=_typed(body, "chunk_size", int),
        disks={d: _disk(e) for d, e in _typed(body, "disks", dict).items()},
        meta=_typed(body, "meta", dict, {}),
        stats=_typed(body, "stats", dict, {}),
    )


def decode_manifest(data: bytes, mac: Callable[[bytes], str], what: str) -> Manifest:
    """The manifest in ``data`` after its MAC is checked; anything malformed, before or after the
    check, is ObjectCorrupt (a damaged manifest), never a crash."""
    try:
        outer = json.loads(data)
        body = outer["manifest"]
        version = body["format"]
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    except (ValueError, KeyError, TypeError):
        raise ObjectCorrupt(f"{what} is not a readable manifest (truncated or damaged)") from None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ObjectCorrupt(f"{what} is damaged: unknown manifest format {version!r}")
    if version > MANIFEST_FORMAT:
        raise FormatTooNew(f"{what} uses manifest format {version}; upgrade vmkeep to read it")
    if not same_mac(mac(canonical.encode()), outer.get("mac")):
        raise ObjectCorrupt(f"{what} failed authentication: it was modified, or belongs to another repository")
    try:
        return _manifest(body)
    except (KeyError, TypeError, ValueError) as exc:
        raise ObjectCorrupt(f"{what} is damaged: its MAC is right but its content is not a manifest ({exc})") from exc


@dataclass(frozen=True)
class DiskRef:
    """One disk of one restore point, for reports."""

    name: str
    point_id: str
    disk: str

    def __str__(self) -> str:
        return f"{self.name}@{self.point_id}:{self.disk}"
