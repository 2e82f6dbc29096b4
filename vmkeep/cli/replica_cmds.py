"""`vmkeep replicate`, `failover`, `failback` and `replicas`: powered-off copies of VMs on another
libvirt host, kept at their latest restore point (vmkeep.engine.replica)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.table import Table

from vmkeep.cli.common import JsonOpt, KeyFile, PassFile, RepoOpt, S3Endpoint, Workers, open_repository
from vmkeep.cli.output import RichProgress, emit_json, human, out_console, uncut
from vmkeep.engine.backup import DEFAULT_WORKERS
from vmkeep.engine.replica import ReplicaReport, failback, failover, list_replicas, replicate
from vmkeep.hypervisors.base import Connector
from vmkeep.hypervisors.connect import open_connector

ToOpt = Annotated[str, typer.Option("--to", help="The libvirt host holding the replica (qemu+tls://HOST/system, "
                                                 "qemu:///system)")]
NameOpt = Annotated[str | None, typer.Option("--name", help="The replica VM's name (default: VM-replica)")]
NetworkOpt = Annotated[str | None, typer.Option(
    "--network", help="The libvirt network of the replica's interfaces; 'none': no interfaces (default: as the "
                      "original's)")]
InsecureOpt = Annotated[bool, typer.Option("--insecure", help="Accept plain TCP (qemu+tcp://) and unsafe URI options")]


@contextmanager
def _connected(uri: str, insecure: bool) -> Iterator[Connector]:
    connector = open_connector(uri, insecure=insecure)
    try:
        yield connector
    finally:
        connector.close()


def _print_report(report: ReplicaReport, json_out: bool) -> None:
    if json_out:
        emit_json(report.as_dict())
        return
    out_console.print(f"{report.replica} ({report.mode}) at point {report.point}: {human(report.bytes_written)} "
                      f"written in {report.extents} extents, {report.seconds:.1f} s", highlight=False)
    if report.bytes_read_back:
        out_console.print(f"  read back and compared: {human(report.bytes_read_back)}", highlight=False)
    for note in report.notes:
        out_console.print(f"  note: {note}", highlight=False)


def replicate_cmd(
    vm: Annotated[str, typer.Argument(help="The VM whose restore points the replica follows")],
    to: ToOpt,
    repo: RepoOpt,
    point: Annotated[str | None, typer.Option(help="The point to bring the replica to: an id or 'latest'")] = None,
    storage: Annotated[str | None, typer.Option(help="Where the replica's disks go on the host (first run): a "
                                                     "storage pool or a directory")] = None,
    name: NameOpt = None,
    network: NetworkOpt = None,
    insecure: InsecureOpt = False,
    workers: Workers = DEFAULT_WORKERS,
    passphrase_file: PassFile = None,
    key_file: KeyFile = None,
    s3_endpoint: S3Endpoint = None,
    json_out: JsonOpt = False,
) -> None:
    """Make or update a powered-off replica of VM on another libvirt host: the whole point the first
    time, afterwards only the extents that changed since the replica's point."""
    r = open_repository(repo, passphrase_file, key_file, s3_endpoint)
    with _connected(to, insecure) as connector:
        report = replicate(r, connector, vm, point=point, name=name, storage=storage, network=network,
                           workers=workers, progress=RichProgress(not json_out))
    _print_report(report, json_out)


def failover_cmd(
    vm: Annotated[str, typer.Argument(help="The VM whose replica to start")],
    to: ToOpt,
    name: NameOpt = None,
    network: NetworkOpt = None,
    insecure: InsecureOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Start the replica of VM on its host (the original should be off: both would be on the network)."""
    with _connected(to, insecure) as connector:
        info = failover(connector, vm, name=name, network=network)
    if json_out:
        emit_json({"vm": vm, "replica": info.name, "host": to, "point": info.point, "state": info.state})
    else:
        out_console.print(f"{info.name} started on {to} from point {info.point}", highlight=False)


def failback_cmd(
    vm: Annotated[str, typer.Argument(help="The original VM (shut off), made equal to its replica")],
    to: ToOpt,
    repo: RepoOpt,
    host: Annotated[str, typer.Option("--host", help="The original VM's libvirt host")] = "qemu:///system",
    name: NameOpt = None,
    insecure: InsecureOpt = False,
    workers: Workers = DEFAULT_WORKERS,
    passphrase_file: PassFile = None,
    key_file: KeyFile = None,
    s3_endpoint: S3Endpoint = None,
    json_out: JsonOpt = False,
) -> None:
    """Make the original VM's disks equal to the failed-over replica's (both read, the slots that
    differ written); both must be shut off. The replica becomes a standby again with the next replicate."""
    r = open_repository(repo, passphrase_file, key_file, s3_endpoint)
    with _connected(to, insecure) as connector, _connected(host, insecure) as original:
        report = failback(r, connector, original, vm, name=name, workers=workers,
                          progress=RichProgress(not json_out))
    _print_report(report, json_out)


def replicas_cmd(
    to: ToOpt,
    insecure: InsecureOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """The replicas on a libvirt host, as their own metadata records them."""
    with _connected(to, insecure) as connector:
        found = list_replicas(connector)
    rows: list[dict[str, Any]] = [
        {"name": i.name, "source": i.source, "repository": i.repository, "point": i.point, "state": i.state,
         "running": i.running, "updated": i.updated, "disks": i.paths} for i in found]
    if json_out:
        emit_json({"host": to, "replicas": rows})
        return
    table = Table("replica", "of", "point", "state", "running", "updated")
    for row in rows:
        table.add_row(*(str(row[k]) for k in ("name", "source", "point", "state", "running", "updated")))
    out_console.print(uncut(table))
