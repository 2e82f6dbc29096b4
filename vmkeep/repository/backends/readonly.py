"""A backend opened for reading only: the source of a backup copy.

A copy run by the offsite side (pull mode) holds credentials that can only read the source;
this wrapper makes vmkeep itself keep to that, whatever the credentials allow, so a copy can
never write, touch or delete anything in the repository it copies from.
"""

from __future__ import annotations

from collections.abc import Iterator

from vmkeep.errors import BackendError
from vmkeep.repository.backends.base import Backend, Data, ObjectInfo


class ReadOnlyBackend(Backend):
    """Reads go to ``inner``; every write is refused before it reaches the storage."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.url = inner.url

    @property
    def immutable_days(self) -> int:
        return self.inner.immutable_days

    @immutable_days.setter
    def immutable_days(self, days: int) -> None:
        """Repository.open learns the retention from the config: the inner backend must know it,
        since an S3 read of an immutable repository falls back to the locked versions."""
        self.inner.immutable_days = days

    def _refuse(self, what: str, key: str) -> BackendError:
        return BackendError(f"{self.url} is opened read-only (the source of a copy): {what} {key} refused")

    def put(self, key: str, data: Data, *, if_absent: bool = False, durable: bool = False) -> bool:
        raise self._refuse("writing", key)

    def touch(self, key: str) -> bool:
        raise self._refuse("refreshing", key)

    def delete(self, key: str) -> None:
        raise self._refuse("deleting", key)

    def delete_if_older(self, key: str, cutoff: float) -> int:
        raise self._refuse("deleting", key)

    def now(self) -> float:
        raise self._refuse("writing the clock object", "clock")

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def prefetch(self, keys: list[str]) -> None:
        self.inner.prefetch(keys)

    def stat(self, key: str) -> ObjectInfo | None:
        return self.inner.stat(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def flush(self) -> None:
        """Nothing was written."""

    def close(self) -> None:
        self.inner.close()
