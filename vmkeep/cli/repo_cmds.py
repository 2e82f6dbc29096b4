"""`vmkeep repo …`: create, inspect, verify, prune and garbage-collect repositories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vmkeep.cli.common import (
    JsonOpt,
    KeyFile,
    PassFile,
    RepoArg,
    S3Endpoint,
    S3Profile,
    Workers,
    open_read_only,
    open_repository,
)
from vmkeep.cli.output import RichProgress, emit_json, human, out_console
from vmkeep.engine.backup import DEFAULT_WORKERS
from vmkeep.engine.image import split_point_spec
from vmkeep.errors import UsageError
from vmkeep.repository.backends import open_backend
from vmkeep.repository.config import DEFAULT_CHUNK_SIZE, Credentials
from vmkeep.repository.gc import collect
from vmkeep.repository.info import repository_info
from vmkeep.repository.kdf import read_passphrase
from vmkeep.repository.prune import RetentionPolicy, prune
from vmkeep.repository.repo import Repository
from vmkeep.repository.verify import verify

app = typer.Typer(help="Create and maintain repositories.", no_args_is_help=True)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        return int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except ValueError:
        raise UsageError(f"{text!r} is not a size (e.g. 4M)") from None


@app.command("init")
def init_cmd(
    repo: RepoArg,
    encrypt: Annotated[bool, typer.Option("--encrypt", help="Encrypt chunks with AES-256-GCM")] = False,
    chunk_size: Annotated[str, typer.Option(help="1M, 2M, 4M or 8M")] = f"{DEFAULT_CHUNK_SIZE >> 20}M",
    compression: Annotated[int, typer.Option(min=0, max=19, help="zstd level, 0 = none")] = 1,
    immutable_days: Annotated[int, typer.Option(min=0, help="S3 Object Lock retention in days")] = 0,
    passphrase_file: PassFile = None,
    key_file: KeyFile = None,
    s3_endpoint: S3Endpoint = None,
    s3_profile: S3Profile = None,
    like: Annotated[str | None, typer.Option(
        help="Share the key material, chunk size, compression and encryption of this repository, so that "
             "`vmkeep copy` moves chunks between them as stored (never decrypted)", show_default=False)] = None,
    like_passphrase_file: Annotated[Path | None, typer.Option(
        help="Passphrase of the --like repository (else the one of this repository)", show_default=False)] = None,
    like_key_file: Annotated[Path | None, typer.Option(help="Key file of the --like repository")] = None,
    like_s3_profile: Annotated[str | None, typer.Option(help="AWS profile reaching the --like repository")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a repository. The passphrase comes from VMKEEP_PASSPHRASE or --passphrase-file."""
    credentials = Credentials.from_env(passphrase_file, key_file)
    source = None
    if like is not None:
        source = open_read_only(like, Credentials(read_passphrase(like_passphrase_file) if like_passphrase_file
                                                  else credentials.passphrase, like_key_file),
                                s3_endpoint, like_s3_profile)
    backend = open_backend(repo, s3_endpoint=s3_endpoint, immutable_days=immutable_days, s3_profile=s3_profile)
    ensure = getattr(backend, "ensure_bucket", None)
    if ensure is not None:
        ensure()
    if source is not None:
        r = Repository.init_like(backend, source, credentials=credentials, immutable_days=immutable_days)
    else:
        r = Repository.init(backend, chunk_size=parse_size(chunk_size), compression=compression, encrypt=encrypt,
                            credentials=credentials, immutable_days=immutable_days)
    result = {"repository": backend.url, "id": r.config.repo_id, "encryption": r.config.encryption["mode"],
              "chunk_size": r.chunk_size, "immutable_days": immutable_days, "keys_of": like}
    if json_out:
        emit_json(result)
    else:
        out_console.print(f"created repository {backend.url} (encryption: {result['encryption']}, "
                          f"chunks: {human(r.chunk_size)}" + (f", keys shared with {like}" if like else "") + ")")
        if key_file is not None:
            out_console.print(f"[bold]keep {key_file} safe: without it nothing can be restored[/bold]")


@app.command("info")
def info_cmd(repo: RepoArg, passphrase_file: PassFile = None, key_file: KeyFile = None,
             s3_endpoint: S3Endpoint = None, json_out: JsonOpt = False) -> None:
    """Logical and stored sizes, dedup and compression ratios, unique and shared bytes per name."""
    info = repository_info(open_repository(repo, passphrase_file, key_file, s3_endpoint))
    if json_out:
        emit_json(info.as_dict())
        return
    out_console.print(
        f"{info.location}: {info.points} points, logical {human(info.logical_bytes)}, data "
        f"{human(info.referenced_bytes)}, stored {human(info.stored_bytes)} in {info.chunks} chunks; "
        f"dedup {info.dedup_ratio:.2f}x, compression {info.compression_ratio:.2f}x"
    )
    table = Table("name", "points", "logical", "unique stored", "shared stored")
    for name, s in sorted(info.names.items()):
        table.add_row(name, str(s.points), human(s.logical_bytes), human(s.unique_stored), human(s.shared_stored))
    out_console.print(table)


@app.command("verify")
def verify_cmd(
    repo: RepoArg,
    sample: Annotated[float, typer.Option(min=0.01, max=100, help="Percent of chunks to check")] = 100.0,
    point: Annotated[list[str] | None, typer.Option(
        help="Only this restore point, NAME@POINT (NAME alone: its latest); repeatable")] = None,
    workers: Workers = DEFAULT_WORKERS,
    passphrase_file: PassFile = None,
    key_file: KeyFile = None,
    s3_endpoint: S3Endpoint = None,
    json_out: JsonOpt = False,
) -> None:
    """Read, decrypt and re-hash the chunks live points use; name the points a bad chunk breaks."""
    r = open_repository(repo, passphrase_file, key_file, s3_endpoint)
    only = [r.find_point(*split_point_spec(p)) for p in point] if point else None
    report = verify(r, sample, workers, RichProgress(not json_out), only=only)
    if json_out:
        emit_json(report.as_dict())
    else:
        out_console.print(f"checked {report.chunks_checked} of {report.chunks_total} chunks "
                          f"({human(report.bytes_checked)}) in {report.points} points: "
                          + ("[green]OK[/green]" if report.ok else "[red]PROBLEMS[/red]"))
        for cid, why in report.bad_chunks.items():
            out_console.print(f"  bad chunk {cid}: {why}")
        for broken, whys in report.broken_points.items():
            more = f" (+{len(whys) - 1} more)" if len(whys) > 1 else ""
            out_console.print(f"  broken point {broken}: {whys[0]}{more}")
    if not report.ok:
        raise typer.Exit(1)


@app.command("prune")
def prune_cmd(
    repo: RepoArg,
    name: Annotated[str | None, typer.Option(help="Only this name")] = None,
    keep_last: Annotated[int, typer.Option(min=0)] = 0,
    keep_hourly: Annotated[int, typer.Option(min=0)] = 0,
    keep_daily: Annotated[int, typer.Option(min=0)] = 0,
    keep_weekly: Annotated[int, typer.Option(min=0)] = 0,
    keep_monthly: Annotated[int, typer.Option(min=0)] = 0,
    keep_yearly: Annotated[int, typer.Option(min=0)] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be removed")] = False,
    passphrase_file: PassFile = None,
    key_file: KeyFile = None,
    s3_endpoint: S3Endpoint = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove the restore points a retention policy does not keep, per name. Run gc to free space."""
    policy = RetentionPolicy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly)
    results = prune(open_repository(repo, passphrase_file, key_file, s3_endpoint), policy, name, dry_run)
    summary = {n: {"keep": r.keep, "remove": [m.point_id for m in r.remove]} for n, r in results.items()}
    if json_out:
        emit_json({"dry_run": dry_run, "names": summary})
        return
    verb = "would remove" if dry_run else "removed"
    for n, s in summary.items():
        out_console.print(f"{n}: keep {len(s['keep'])}, {verb} {len(s['remove'])}")
        for pid in s["remove"]:
            out_console.print(f"  {verb} {n}@{pid}")


@app.command("gc")
def gc_cmd(
    repo: RepoArg,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
    passphrase_file: PassFile = None,
    key_file: KeyFile = None,
    s3_endpoint: S3Endpoint = None,
    json_out: JsonOpt = False,
) -> None:
    """Delete chunks no restore point uses. Safe while backups run; frees at once when none do."""
    report = collect(open_repository(repo, passphrase_file, key_file, s3_endpoint), dry_run)
    if json_out:
        emit_json(report.as_dict())
    else:
        out_console.print(
            f"{'would free' if dry_run else 'freed'} {human(report.bytes_freed)} in {report.chunks_deleted} chunks "
            f"({report.chunks_live} live, {report.chunks_kept_recent} kept for running backups)"
        )
