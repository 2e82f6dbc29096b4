"""`vmkeep files …`: list, copy out and find guest files of restore points (libguestfs).

Guest names are printed through vmkeep.engine.files.shown (control characters and bytes that are
not UTF-8 escaped) and never as Rich markup: a guest's file name must not drive the terminal."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from vmkeep.cli.common import JsonOpt, KeyFile, PassFile, RepoOpt, S3Endpoint, open_repository
from vmkeep.cli.output import emit_json, human, out_console
from vmkeep.cli.recovery_cmds import resolved_spec, spec_for

app = typer.Typer(help="Files of a restore point, without restoring the VM (ext4, xfs, FAT, NTFS).",
                  no_args_is_help=True)
SpecArg = Annotated[str, typer.Argument(metavar="VM[@POINT]", help="Which point (default: the latest)")]
DiskOpt = Annotated[str, typer.Option(help="Which disk of the point")]
FsOpt = Annotated[str | None, typer.Option("--filesystem", help="Which filesystem when the disk has several "
                                                                "(/dev/sda1, …)")]


@app.command("ls")
def ls_cmd(spec: SpecArg, path: Annotated[str, typer.Argument(help="Guest path")] = "/", *, repo: RepoOpt,
           disk: DiskOpt = "vda", filesystem: FsOpt = None, passphrase_file: PassFile = None, key_file: KeyFile = None,
           s3_endpoint: S3Endpoint = None, json_out: JsonOpt = False) -> None:
    """List a directory (or one file) of a point: type, size, mode, owner, time."""
    from vmkeep.engine.files import open_point_files, shown

    point = resolved_spec(repo, spec, disk, s3_endpoint, key_file, passphrase_file)
    with open_point_files(point, filesystem) as files:
        entries = [e.as_dict() for e in files.listdir(path)]
    if json_out:
        emit_json({"point": point.point, "path": shown(path), "entries": entries})
        return
    table = Table("mode", "owner", "size", "modified", "path",
                  title=escape(f"{point.name}@{point.point} {disk}:{shown(path)}"))
    for e in entries:  # path and target already escaped by as_dict
        name = e["path"] + ("/" if e["kind"] == "dir" else f" -> {e['target']}" if e["kind"] == "link" else "")
        table.add_row(f"{e['kind'][0]}{e['mode']:04o}", f"{e['uid']}:{e['gid']}", human(e["size"]),
                      time.strftime("%Y-%m-%d %H:%M", time.gmtime(e["mtime"])), Text(name))
    out_console.print(table)


@app.command("get")
def get_cmd(spec: SpecArg, path: Annotated[str, typer.Argument(help="Guest file or directory")], *, repo: RepoOpt,
            output: Annotated[Path, typer.Option(help="Directory to copy into (created)")], disk: DiskOpt = "vda",
            filesystem: FsOpt = None, preserve_owner: Annotated[bool, typer.Option(
                "--preserve-owner", help="Keep the guest's owners and setuid/setgid/sticky/world-write bits "
                "(root only; without it they are dropped and the files are yours)")] = False,
            passphrase_file: PassFile = None, key_file: KeyFile = None,
            s3_endpoint: S3Endpoint = None, json_out: JsonOpt = False) -> None:
    """Copy a file or directory tree out of a point, with modes and times; nothing goes outside --output."""
    from vmkeep.engine.files import open_point_files, require_root_for_owners, shown

    if preserve_owner:
        require_root_for_owners()  # before the point is opened: refused at once
    point = resolved_spec(repo, spec, disk, s3_endpoint, key_file, passphrase_file)
    started = time.monotonic()
    with open_point_files(point, filesystem) as files:
        written = files.copy_out(path, output, preserve_owner)
    result = {"point": point.point, "path": shown(path), "output": shown(str(output)),
              "written": [shown(w) for w in written], "seconds": round(time.monotonic() - started, 1)}
    if json_out:
        emit_json(result)
    else:
        out_console.print(f"copied {len(written)} entries of {point.name}@{point.point}:{result['path']} to "
                          f"{result['output']}", highlight=False, markup=False)


@app.command("find")
def find_cmd(vm: Annotated[str, typer.Argument(help="VM name")],
             pattern: Annotated[str, typer.Argument(help="Glob on the path or the name, e.g. '*.conf'")], *,
             repo: RepoOpt, disk: DiskOpt = "vda", filesystem: FsOpt = None,
             last: Annotated[int, typer.Option(min=1, help="Search the newest N points")] = 10,
             passphrase_file: PassFile = None, key_file: KeyFile = None, s3_endpoint: S3Endpoint = None,
             json_out: JsonOpt = False) -> None:
    """Which restore points of a VM hold files matching a pattern (newest first)."""
    from vmkeep.engine.files import open_point_files, shown

    r = open_repository(repo, passphrase_file, key_file, s3_endpoint)
    points = list(reversed(r.list_points(vm)))[:last]
    hits = []
    for m in points:
        spec = spec_for(repo, vm, m.point_id, disk, s3_endpoint, key_file, passphrase_file)
        with open_point_files(spec, filesystem) as files:
            hits += [{"point": m.point_id, "created": m.created, "path": shown(p)} for p in files.find(pattern)]
    if json_out:
        emit_json({"vm": vm, "pattern": shown(pattern), "points_searched": len(points), "matches": hits})
        return
    for h in hits:
        out_console.print(f"{h['point']}  {h['path']}", highlight=False, markup=False)
    if not hits:
        out_console.print(f"nothing matches '{shown(pattern)}' in the newest {len(points)} points of {vm}",
                          highlight=False, markup=False)
