"""Options shared by commands that open a repository."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vmkeep.repository.backends import open_backend
from vmkeep.repository.backends.readonly import ReadOnlyBackend
from vmkeep.repository.config import Credentials
from vmkeep.repository.repo import Repository

RepoArg = Annotated[str, typer.Argument(help="Repository: a directory or s3://BUCKET/PREFIX")]
RepoOpt = Annotated[str, typer.Option("--repo", "-r", help="Repository: a directory or s3://BUCKET/PREFIX")]
PassFile = Annotated[
    Path | None, typer.Option(help="File holding the passphrase (else VMKEEP_PASSPHRASE)", show_default=False)
]
KeyFile = Annotated[Path | None, typer.Option(help="Key file of a key-file-encrypted repository")]


def _s3_endpoint(value: str | None) -> str | None:
    """--s3-endpoint, else VMKEEP_S3_ENDPOINT (quick: every repository command reads it)."""
    from vmkeep.settings import quick

    return value or quick("s3_endpoint")


S3Endpoint = Annotated[
    str | None, typer.Option(help="S3 endpoint URL (else VMKEEP_S3_ENDPOINT, else AWS_ENDPOINT_URL)",
                             callback=_s3_endpoint)
]
S3Profile = Annotated[str | None, typer.Option(
    help="AWS profile (AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials) whose credentials reach the S3 bucket "
         "(else the default credentials)", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object with the figures")]
Workers = Annotated[int, typer.Option(min=1, max=64, help="Parallel chunk workers")]


def open_repository(location: str, passphrase_file: Path | None, key_file: Path | None,
                    s3_endpoint: str | None, s3_profile: str | None = None) -> Repository:
    backend = open_backend(location, s3_endpoint=s3_endpoint, s3_profile=s3_profile)
    return Repository.open(backend, Credentials.from_env(passphrase_file, key_file))


def open_read_only(location: str, credentials: Credentials, s3_endpoint: str | None,
                   s3_profile: str | None) -> Repository:
    """A repository vmkeep only reads (the source of a copy, the model of ``repo init --like``):
    nothing is written to it, whatever the credentials would allow."""
    backend = ReadOnlyBackend(open_backend(location, s3_endpoint=s3_endpoint, s3_profile=s3_profile))
    return Repository.open(backend, credentials)
