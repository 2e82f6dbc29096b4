"""`vmkeep disk …` and `vmkeep points`: back up and restore disk images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from vmkeep.cli.common import JsonOpt, KeyFile, PassFile, RepoOpt, S3Endpoint, Workers, open_repository
from vmkeep.cli.output import RichProgress, emit_json, human, out_console, rate, uncut
from vmkeep.engine.backup import DEFAULT_WORKERS
from vmkeep.engine.image import DEFAULT_DISK, backup_image, restore_image, split_point_spec
from vmkeep.repository.points import Manifest, check_key
from vmkeep.repository.repo import Repository

app = typer.Typer(help="Back up and restore disk images (any format qemu opens).", no_args_is_help=True)


@app.command("backup")
def backup_cmd(
    image: Annotated[Path, typer.Argument(help="Disk image: qcow2, raw, vmdk, … (probed by qemu-img)")],
    repo: RepoOpt,
    name: Annotated[str, typer.Option(help="Name the restore points are kept under")],
    disk: Annotated[str, typer.Option(help="Disk name inside the point")] = DEFAULT_DISK,
    fmt: Annotated[str | None, typer.Option("--format", help="Image format (default: probe)")] = None,
    since: Annotated[
        str | None, typer.Option(help="Previous point (id, prefix or 'latest') for an incremental")
    ] = None,
    bitmap: Annotated[str | None, typer.Option(help="qcow2 persistent dirty bitmap holding the changes")] = None,
    changed: Annotated[Path | None, typer.Option(help="File of 'OFFSET LENGTH' lines that changed")] = None,
    workers: Workers = DEFAULT_WORKERS,
    passphrase_file: PassFile = None,
    key_file: KeyFile = None,
    s3_endpoint: S3Endpoint = None,
    json_out: JsonOpt = False,
) -> None:
    """Back up a disk image; only allocated (and, with --since, changed) extents are read."""
    r = open_repository(repo, passphrase_file, key_file, s3_endpoint)
    m = backup_image(r, image, name, disk=disk, fmt=fmt, since=since, bitmap=bitmap, changed_file=changed,
                     workers=workers, progress=RichProgress(not json_out))
    s = m.stats
    d = m.disks[disk].stats
    result = {"point": m.point_id, "name": m.name, "mode": d["mode"], "parent": m.parent,
              "size": s["size"], "bytes_read": s["bytes_read"], "bytes_zero": s["bytes_zero"],
              "bytes_reused": s["bytes_reused"], "bytes_new": s["bytes_new"], "bytes_stored": s["bytes_stored"],
              "chunks_new": s["chunks_new"], "duration": s["seconds"]}
    if json_out:
        emit_json(result)
        return
    out_console.print(
        f"{m.name}@{m.point_id} ({d['mode']}): read {human(s['bytes_read'])} at {rate(s['bytes_read'], s['seconds'])}, "
        f"new {human(s['bytes_new'])}, stored {human(s['bytes_stored'])}, skipped zero {human(s['bytes_zero'])}, "
        f"reused {human(s['bytes_reused'])} in {s['seconds']:.2f} s"
    )


@app.command("restore")
def restore_cmd(
    spec: Annotated[str, typer.Argument(metavar="NAME[@POINT]", help="What to restore (default: latest point)")],
    repo: RepoOpt,
    output: Annotated[Path, typer.Option(help="Image file to create")],
    fmt: Annotated[str, typer.Option("--format", help="qcow2 or raw")] = "qcow2",
    disk: Annotated[str | None, typer.Option(help="Disk of a multi-disk point")] = None,
    workers: Workers = DEFAULT_WORKERS,
    passphrase_file: PassFile = None,
    key_file: KeyFile = None,
    s3_endpoint: S3Endpoint = None,
    json_out: JsonOpt = False,
) -> None:
    """Restore one disk of a point into a new sparse image; no chain is replayed."""
    r = open_repository(repo, passphrase_file, key_file, s3_endpoint)
    name, point = split_point_spec(spec)
    m, st = restore_image(r, name, point, output, disk=disk, fmt=fmt, workers=workers,
                          progress=RichProgress(not json_out))
    result = {"point": m.point_id, "name": m.name, "output": str(output), "format": fmt, "size": st.size,
              "bytes_written": st.bytes_written, "duration": round(st.seconds, 3)}
    if json_out:
        emit_json(result)
    else:
        out_console.print(f"restored {m.name}@{m.point_id} to {output} ({fmt}): wrote {human(st.bytes_written)} "
                          f"at {rate(st.bytes_written, st.seconds)}")


def points_cmd(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Only this name")] = None,
    repo: Annotated[str | None, typer.Option("--repo", "-r", help="Repository: a directory or "
                                             "s3://BUCKET/PREFIX (without it: the --server's catalog)")] = None,
    passphrase_file: PassFile = None,
    key_file: KeyFile = None,
    s3_endpoint: S3Endpoint = None,
    json_out: JsonOpt = False,
) -> None:
    """List restore points: of one repository (--repo), or across all of a server's (--server)."""
    if repo is None:
        from vmkeep.cli.client_cmds import server_points

        server_points(ctx, name, json_out)
        return
    r = open_repository(repo, passphrase_file, key_file, s3_endpoint)
    points = r.list_points(name)
    checked = {o.key for o in r.backend.list("checks/")}
    rows = [{"name": m.name, "point": m.point_id, "created": m.created, "parent": m.parent,
             "disks": {d: e.size for d, e in m.disks.items()}, "stats": m.stats, "meta": m.meta,
             "boot_check": _check_summary(r, m) if check_key(m.name, m.point_id) in checked else None}
            for m in points]
    if json_out:
        emit_json({"points": rows})
        return
    table = Table("name", "point", "created", "disks", "read", "stored")
    for m in points:
        table.add_row(m.name, m.point_id, m.created[:19], ", ".join(f"{d} {human(e.size)}" for d, e in m.disks.items()),
                      human(m.stats.get("bytes_read", 0)), human(m.stats.get("bytes_stored", 0)))
    out_console.print(uncut(table))


def _check_summary(repo: Repository, manifest: Manifest) -> dict[str, Any] | None:
    record = repo.load_check(manifest)
    return {k: record.get(k) for k in ("passed", "at", "reason", "seconds_to_heartbeat")} if record else None
