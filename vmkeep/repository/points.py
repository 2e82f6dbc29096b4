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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vmkeep.errors import FormatTooNew, ObjectCorrupt, UsageError

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


def encode_manifest(manifest: Manifest, mac: Any) -> bytes:
    body = json.dumps(manifest.body(), sort_keys=True, separators=(",", ":"))
    return json.dumps({"manifest": json.loads(body), "mac": mac(body.encode())}, indent=1).encode()


def decode_manifest(data: bytes, mac: Any, what: str) -> Manifest:
    try:
        outer = json.loads(data)
        body = outer["manifest"]
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    except (ValueError, KeyError, TypeError):
        raise ObjectCorrupt(f"{what} is not a readable manifest (truncated or damaged)") from None
    if body.get("format", 0) > MANIFEST_FORMAT:
        raise FormatTooNew(f"{what} uses manifest format {body['format']}; upgrade vmkeep to read it")
    if mac(canonical.encode()) != outer.get("mac"):
        raise ObjectCorrupt(f"{what} failed authentication: it was modified, or belongs to another repository")
    return Manifest(
        name=body["name"],
        point_id=body["id"],
        created=body["created"],
        parent=body.get("parent"),
        chunk_size=body["chunk_size"],
        disks={
            d: DiskEntry(e["size"], e["index"], e["index_mac"], e.get("stats", {}))
            for d, e in body["disks"].items()
        },
        meta=body.get("meta", {}),
        stats=body.get("stats", {}),
    )


@dataclass(frozen=True)
class DiskRef:
    """One disk of one restore point, for reports."""

    name: str
    point_id: str
    disk: str

    def __str__(self) -> str:
        return f"{self.name}@{self.point_id}:{self.disk}"
