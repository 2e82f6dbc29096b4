"""Storage backends and the choice between them from a repository location."""

from __future__ import annotations

import os
from pathlib import Path

from vmkeep.repository.backends.base import Backend
from vmkeep.repository.backends.fs import FilesystemBackend


def open_backend(location: str, *, s3_endpoint: str | None = None, immutable_days: int = 0,
                 workers: int = 16, s3_profile: str | None = None) -> Backend:
    """A backend for a path or an ``s3://bucket/prefix`` URL; ``s3_profile``: the AWS profile whose
    credentials reach this bucket (two repositories of a copy may need two identities)."""
    if location.startswith("s3://"):
        from vmkeep.repository.backends.s3 import S3Backend

        return S3Backend(location, endpoint=s3_endpoint or os.environ.get("AWS_ENDPOINT_URL"),
                         immutable_days=immutable_days, workers=workers, profile=s3_profile)
    if s3_profile:
        from vmkeep.errors import UsageError

        raise UsageError(f"an S3 profile was given for {location}, which is not an S3 repository (s3://BUCKET/PREFIX)")
    return FilesystemBackend(Path(location))


__all__ = ["Backend", "FilesystemBackend", "open_backend"]
