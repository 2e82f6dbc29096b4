"""`vmkeep copy SOURCE TARGET`: restore points into a second repository (offsite, S3 under Object Lock).

The source is opened read-only: a copy run by the offsite side (pull mode) with credentials that
can only read the source works, and nothing of the source is ever changed by it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vmkeep.cli.common import JsonOpt, KeyFile, PassFile, RepoArg, S3Endpoint, S3Profile, open_read_only
from vmkeep.cli.output import RichProgress, emit_json, human, out_console
from vmkeep.engine.copy import DEFAULT_WORKERS, RAW, CopyReport, choose_points, copy_points
from vmkeep.errors import UsageError, WrongPassphrase
from vmkeep.repository.backends import open_backend
from vmkeep.repository.config import CONFIG_KEY, Credentials, RepoConfig
from vmkeep.repository.kdf import read_passphrase
from vmkeep.repository.repo import Repository


def _target_credentials(location: str, config: RepoConfig, passphrase_file: Path | None, key_file: Path | None,
                        source: Credentials) -> Credentials:
    """The target's own credentials when given (--target-passphrase-file, VMKEEP_TARGET_PASSPHRASE,
    --target-key-file); else, for a passphrase repository, the source's passphrase."""
    from vmkeep.settings import quick

    given = (read_passphrase(passphrase_file) if passphrase_file else None) or \
        (quick("target_passphrase") or "").encode() or None
    if given or key_file is not None:
        return Credentials(given, key_file)
    if config.encryption["mode"] == "passphrase":
        return Credentials(source.passphrase)
    if config.encryption["mode"] == "keyfile":
        raise UsageError(f"{location} is encrypted with a key file: pass --target-key-file")
    return Credentials()


def open_target(location: str, source_url: str, passphrase_file: Path | None, key_file: Path | None,
                source: Credentials, s3_endpoint: str | None, s3_profile: str | None) -> Repository:
    backend = open_backend(location, s3_endpoint=s3_endpoint, s3_profile=s3_profile)
    if backend.stat(CONFIG_KEY) is None:
        raise UsageError(f"{location} is not a vmkeep repository: create it with `vmkeep repo init {location} "
                         f"--like {source_url}` (the copy then moves chunks as they are stored), or with its own "
                         "keys by `vmkeep repo init`")
    config = RepoConfig.from_json(backend.get(CONFIG_KEY), backend.url)
    credentials = _target_credentials(location, config, passphrase_file, key_file, source)
    try:
        return Repository.open(backend, credentials)
    except WrongPassphrase as exc:
        raise WrongPassphrase(f"the target {location}: {exc} (the target's own credentials: --target-passphrase-file, "
                              "VMKEEP_TARGET_PASSPHRASE or --target-key-file)") from exc


def _say(report: CopyReport, target: str) -> None:
    how = ("chunks copied as stored (the repositories share keys)" if report.mode == RAW else
           "chunks re-encrypted for the target (its keys differ from the source's; `repo init --like` avoids it)")
    out_console.print(f"copied {len(report.points_copied)} point(s) into {target}"
                      + (f", {len(report.points_present)} already there" if report.points_present else "")
                      + f": sent {human(report.bytes_sent)} in {report.chunks_sent} chunks, "
                      f"{report.chunks_present} the target had, in {report.seconds:.1f} s; {how}"
                      + ("; every chunk read back and checked" if report.verified and report.points_copied else ""))
    for label in report.points_copied:
        out_console.print(f"  {label}")


def copy_cmd(
    source: RepoArg,
    target: Annotated[str, typer.Argument(help="Target repository: a directory or s3://BUCKET/PREFIX")],
    name: Annotated[str | None, typer.Option(help="Only names matching this glob (e.g. 'web-*')")] = None,
    point: Annotated[str | None, typer.Option(help="Only this point (id or unique id prefix)")] = None,
    latest: Annotated[int | None, typer.Option(min=0, help="Only the newest N points of each name")] = None,
    max_rate: Annotated[float | None, typer.Option(
        min=0.1, help="Move at most this many MiB/s (read from the source, written to the target)")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Read every copied point back from the target and "
                                                          "check it before committing it")] = False,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Chunks moved at once")] = DEFAULT_WORKERS,
    passphrase_file: PassFile = None,
    key_file: KeyFile = None,
    s3_endpoint: S3Endpoint = None,
    s3_profile: S3Profile = None,
    target_passphrase_file: Annotated[Path | None, typer.Option(
        help="Passphrase of the target (else VMKEEP_TARGET_PASSPHRASE, else the source's)",
        show_default=False)] = None,
    target_key_file: Annotated[Path | None, typer.Option(help="Key file of the target")] = None,
    target_s3_endpoint: Annotated[str | None, typer.Option(
        help="S3 endpoint of the target (else the source's)")] = None,
    target_s3_profile: Annotated[str | None, typer.Option(help="AWS profile reaching the target bucket")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Copy restore points into a second repository; only what it lacks travels. Points already
    there are skipped, a point appears there only once complete, and an interrupted copy resumes."""
    credentials = Credentials.from_env(passphrase_file, key_file)
    src = open_read_only(source, credentials, s3_endpoint, s3_profile)
    try:
        dst = open_target(target, source, target_passphrase_file, target_key_file, credentials,
                          target_s3_endpoint or s3_endpoint, target_s3_profile)
    except BaseException:
        src.close()
        raise
    try:
        points = choose_points(src, names=name, point=point, latest=latest)
        report = copy_points(src, dst, points, workers=workers, max_rate=max_rate, verify=verify,
                             progress=RichProgress(not json_out))
    finally:
        src.close()
        dst.close()
    if json_out:
        emit_json(report.as_dict())
    else:
        _say(report, target)
