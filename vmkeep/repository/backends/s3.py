"""Repository in S3-compatible object storage (AWS S3, SeaweedFS, MinIO, Ceph RGW …).

Puts are atomic by nature; ``if_absent`` uses a conditional write (``If-None-Match: *``) so two
writers of one chunk never race. With ``immutable_days`` every chunk, index and manifest is
written under S3 Object Lock in COMPLIANCE mode: nobody, vmkeep included, can delete it before
the retention date. ``touch`` copies an object onto itself, which refreshes LastModified.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, ProfileNotFound

from vmkeep.errors import BackendError, ObjectMissing, UsageError
from vmkeep.repository.backends.base import Backend, Data, ObjectInfo, check_key

log = logging.getLogger(__name__)

LOCKED_PREFIXES = ("chunks/", "indexes/", "points/")
_MISSING = {"404", "NoSuchKey", "NotFound"}
_PRECONDITION = {"412", "PreconditionFailed", "ConditionalRequestConflict", "409"}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _retries(response: dict[str, Any]) -> int:
    """How many times botocore retried the request (throttling, 5xx, a dropped connection)."""
    return int(response.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)


class S3Backend(Backend):
    supports_immutability = True

    def __init__(self, url: str, *, endpoint: str | None = None, workers: int = 16,
                 immutable_days: int = 0, profile: str | None = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise UsageError(f"{url!r} is not an S3 location: use s3://BUCKET/PREFIX")
        self.url = url
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.immutable_days = immutable_days
        self.endpoint = endpoint
        try:
            session = boto3.session.Session(profile_name=profile) if profile else boto3.session.Session()
        except ProfileNotFound as exc:
            raise UsageError(f"the S3 profile {profile!r} is not in the AWS credentials or config file "
                             "(AWS_SHARED_CREDENTIALS_FILE, ~/.aws/credentials); add it or name another") from exc
        self.client = session.client(
            "s3",
            endpoint_url=endpoint,
            config=Config(
                max_pool_connections=max(workers * 2, 10),
                retries={"max_attempts": 4, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                s3={"addressing_style": "path"},
            ),
        )
        log.debug("S3 client for %s: endpoint %s, profile %s, %d connections, up to 4 attempts per request", url,
                  endpoint or "AWS default", profile or "default", max(workers * 2, 10))

    def _key(self, key: str, *, prefix: bool = False) -> str:
        key = check_key(key, prefix=prefix)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        try:
            reply = fn(Bucket=self.bucket, **kwargs)
        except EndpointConnectionError as exc:
            log.debug("S3 %s on %s: endpoint unreachable (%s)", what, self.url, exc)
            raise BackendError(
                f"cannot reach the S3 endpoint for {self.url} ({exc}); check --s3-endpoint / "
                "VMKEEP_S3_ENDPOINT / AWS_ENDPOINT_URL and that the server is up"
            ) from exc
        except ClientError as exc:
            code = _code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            log.debug("S3 %s on %s: %s (HTTP %s, %d retries)", what, self.url, code or "error", status,
                      _retries(exc.response))
            if code in _MISSING or code in _PRECONDITION:
                raise
            if code == "NoSuchBucket":
                raise BackendError(
                    f"the bucket {self.bucket!r} does not exist; create it or run `vmkeep repo init`"
                ) from exc
            message = str(exc.response.get("Error", {}).get("Message", ""))
            if "object lock" in message.lower() or "retention" in message.lower():
                raise BackendError(
                    f"S3 refused {what} on {self.url} because of Object Lock ({code}: {message}); an object under "
                    "retention cannot be deleted or replaced before its date, and an immutable repository needs a "
                    "bucket made with Object Lock enabled (as `vmkeep repo init --immutable-days` makes it)"
                ) from exc
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise BackendError(f"S3 refused {what} on {self.url}: {code}; check the credentials (for two "
                                   "repositories with different identities: --s3-profile)") from exc
            raise BackendError(f"S3 failed {what} on {self.url}: {code or exc}") from exc
        except BotoCoreError as exc:
            log.debug("S3 %s on %s: %s", what, self.url, exc)
            raise BackendError(f"S3 failed {what} on {self.url}: {exc}") from exc
        retries = _retries(reply)
        if retries:
            log.info("S3 %s on %s succeeded after %d retries", what, self.url, retries)
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("S3 %s on %s: HTTP %s", what, self.url,
                      reply.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        return reply

    def ensure_bucket(self) -> None:
        """Create the bucket if needed (with Object Lock enabled when the repository is immutable)."""
        try:
            self._call("head bucket", self.client.head_bucket)
            return
        except (ClientError, BackendError) as exc:
            log.info("bucket %s not usable as it is (%s): creating it", self.bucket,
                     _code(exc) if isinstance(exc, ClientError) else exc)
        kwargs: dict[str, Any] = {}
        if self.immutable_days:
            kwargs["ObjectLockEnabledForBucket"] = True
        self._call("create bucket", self.client.create_bucket, **kwargs)

    def put(self, key: str, data: Data, *, if_absent: bool = False, durable: bool = False) -> bool:
        body = b"".join(data) if isinstance(data, list) else bytes(data)
        kwargs: dict[str, Any] = {"Key": self._key(key), "Body": body}
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        kwargs.update(self._lock(key))
        try:
            self._call(f"writing {key}", self.client.put_object, **kwargs)
        except ClientError as exc:
            if _code(exc) in _PRECONDITION:
                log.debug("S3 already holds %s (%s): not written again", key, _code(exc))
                return False
            raise BackendError(f"S3 failed writing {key}: {_code(exc)}") from exc
        return True

    def get(self, key: str) -> bytes:
        try:
            body = self._call(f"reading {key}", self.client.get_object, Key=self._key(key))["Body"]
            return bytes(body.read())
        except ClientError as exc:
            if not self.immutable_days:
                raise ObjectMissing(f"{key} is missing from the repository at {self.url}") from exc
            log.debug("S3 has no current version of %s (%s): looking for a locked one", key, _code(exc))
        # On an immutable repository a plain DELETE only hides an object behind a delete marker:
        # the locked version is still there, so read it.
        for version_id in self._versions(key) if self.immutable_days else []:
            try:
                body = self._call(f"reading {key}", self.client.get_object, Key=self._key(key),
                                  VersionId=version_id)["Body"]
                return bytes(body.read())
            except ClientError as exc:
                log.debug("S3 version %s of %s unreadable (%s)", version_id, key, _code(exc))
                continue
        raise ObjectMissing(f"{key} is missing from the repository at {self.url}")

    def _versions(self, key: str) -> list[str]:
        """Version ids of ``key`` that hold data, newest first."""
        try:
            page = self._call(f"listing versions of {key}", self.client.list_object_versions, Prefix=self._key(key))
        except ClientError as exc:
            log.warning("S3 cannot list the versions of %s (%s): taken as none", key, _code(exc))
            return []
        versions = [v for v in page.get("Versions", []) if v["Key"] == self._key(key)]
        versions.sort(key=lambda v: v["LastModified"], reverse=True)
        return [v["VersionId"] for v in versions]

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            head = self._call(f"looking up {key}", self.client.head_object, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) not in _MISSING:
                log.warning("S3 cannot look up %s (%s): taken as missing", key, _code(exc))
            return None
        return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"].timestamp())

    def _lock(self, key: str) -> dict[str, Any]:
        """The Object Lock arguments of a write of ``key`` (none unless the repository is immutable)."""
        if not self.immutable_days or not key.startswith(LOCKED_PREFIXES):
            return {}
        return {"ObjectLockMode": "COMPLIANCE",
                "ObjectLockRetainUntilDate": datetime.now(UTC) + timedelta(days=self.immutable_days)}

    def touch(self, key: str) -> bool:
        """The copy onto itself is a new version on an immutable repository: it gets the full
        retention, as a fresh write would."""
        try:
            self._call(
                f"refreshing {key}", self.client.copy_object, Key=self._key(key),
                CopySource={"Bucket": self.bucket, "Key": self._key(key)},
                MetadataDirective="REPLACE", Metadata={"vmkeep-touched": str(time.time())}, **self._lock(key),
            )
            return True
        except ClientError as exc:
            if _code(exc) not in _MISSING:
                log.warning("S3 cannot refresh %s (%s): taken as missing", key, _code(exc))
            return False

    def retain(self, key: str) -> None:
        """Extend the current version's COMPLIANCE retention to the full term from now (S3 allows
        extending, never shortening, it)."""
        lock = self._lock(key)
        if lock:
            self._call(f"extending the retention of {key}", self.client.put_object_retention, Key=self._key(key),
                       Retention={"Mode": "COMPLIANCE", "RetainUntilDate": lock["ObjectLockRetainUntilDate"]})

    def delete(self, key: str) -> None:
        """Remove an object; on an immutable repository every version whose retention has ended."""
        try:
            self._call(f"deleting {key}", self.client.delete_object, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) not in _MISSING:
                log.warning("S3 did not delete %s (%s)", key, _code(exc))
        if self.immutable_days:
            for version_id in self._versions(key):
                try:
                    self.client.delete_object(Bucket=self.bucket, Key=self._key(key), VersionId=version_id)
                except ClientError as exc:  # expected while under retention
                    log.debug("S3 keeps version %s of %s (%s)", version_id, key, _code(exc))

    def delete_if_older(self, key: str, cutoff: float) -> int:
        info = self.stat(key)
        if info is None or info.mtime >= cutoff:
            return 0
        if self.immutable_days and info.mtime > time.time() - self.immutable_days * 86400:
            return 0  # still under retention: S3 would refuse
        self.delete(key)
        return info.size

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        full = self._key(prefix, prefix=True)
        strip = len(self.prefix) + 1 if self.prefix else 0
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": full}
            if token:
                kwargs["ContinuationToken"] = token
            try:
                page = self._call(f"listing {prefix}", self.client.list_objects_v2, **kwargs)
            except ClientError as exc:
                raise BackendError(f"S3 failed listing {prefix}: {_code(exc)}") from exc
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"][strip:], int(obj["Size"]), obj["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def flush(self) -> None:
        """A successful PUT is already durable."""

    def now(self) -> float:
        self.put("clock", str(time.time()).encode())
        info = self.stat("clock")
        if info is None:
            raise BackendError(f"S3 lost the clock object just written to {self.url}")
        return info.mtime

    def close(self) -> None:
        self.client.close()
