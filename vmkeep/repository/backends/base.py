"""What the repository needs from a place to keep objects (a directory, an S3 bucket).

Keys are slash-separated relative names such as ``chunks/ab/ab12…``. Times are storage-side
clocks (file mtime, S3 LastModified) so that garbage collection never compares clocks of two
machines.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from vmkeep.errors import RepositoryError

# empty, absolute, an empty segment (also a trailing slash), '.' or '..' as a segment, or NUL
_BAD_KEY = re.compile(r"\A\Z|\A/|//|/\Z|(?:\A|/)\.\.?(?:/|\Z)|\x00")


def check_key(key: str, *, prefix: bool = False) -> str:
    """``key`` if it names an object inside the repository, else RepositoryError. A listing's
    ``prefix`` may also be empty or end with a slash. Keys come from names and from manifests,
    which in an unencrypted repository anyone who can write to it can forge."""
    name = key[:-1] if prefix and key.endswith("/") else key
    if (prefix and not key) or not _BAD_KEY.search(name):
        return key
    raise RepositoryError(
        f"refusing the object key {key!r}: keys are relative names inside the repository (no '..' or '.' "
        "segments, empty segments, leading '/' or NUL); a damaged or forged manifest may hold it, see "
        "`vmkeep repo verify`"
    )


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float


Data = bytes | bytearray | memoryview | list[bytes | bytearray | memoryview]  # parts are written back to back


class Backend(ABC):
    """A flat key → bytes store with atomic puts."""

    url: str
    immutable_days: int = 0  # objects written under retention for this many days (S3 Object Lock)
    supports_immutability = False

    @abstractmethod
    def put(self, key: str, data: Data, *, if_absent: bool = False, durable: bool = False) -> bool:
        """Store ``data`` atomically. With ``if_absent`` an existing object is kept and False returned.

        ``durable`` asks for the object to be on stable storage before returning (manifests);
        other objects are made durable together by :meth:`flush`.
        """

    def staging_buffer(self, size: int) -> memoryview | None:
        """A buffer of ``size`` bytes to encode a big object into, which :meth:`put` then writes
        without copying it (passed alone, from its start); None where that saves nothing.
        Valid until the calling thread asks again."""
        return None

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the object's bytes; raises ObjectMissing when absent."""

    def prefetch(self, keys: list[str]) -> None:
        """A hint that these objects will be read soon, so their reads may start now; backends
        without a cheap way to act on it ignore it."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size and mtime of an object, or None when absent."""

    @abstractmethod
    def touch(self, key: str) -> bool:
        """Set the object's mtime to now (it is in use); False when it does not exist."""

    def retain(self, key: str) -> None:
        """Keep ``key`` under retention for :attr:`immutable_days` from now: a new restore point
        refers to it, so it must stay as long as that point's own objects. Nothing to do where
        nothing is locked."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; absent objects are not an error."""

    @abstractmethod
    def delete_if_older(self, key: str, cutoff: float) -> int:
        """Delete the object only if its mtime is still before ``cutoff``; return bytes freed.

        The check and the delete must not let a concurrent :meth:`touch` slip between them
        unnoticed: this is what makes garbage collection safe while backups run.
        """

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``."""

    @abstractmethod
    def flush(self) -> None:
        """Make every object put so far durable (one syncfs instead of an fsync per chunk)."""

    @abstractmethod
    def now(self) -> float:
        """The storage's own clock, read by writing a marker object."""

    def close(self) -> None:
        """Release connections and file descriptors."""
