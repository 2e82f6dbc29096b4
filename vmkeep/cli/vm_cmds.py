"""`vmkeep backup`, `vmkeep restore` and `vmkeep inventory`: whole VMs through a hypervisor."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from vmkeep.cli.common import JsonOpt, KeyFile, PassFile, RepoOpt, S3Endpoint, Workers, open_repository
from vmkeep.cli.output import ProgressBoard, RichProgress, emit_json, err_console, human, out_console, rate, uncut
from vmkeep.engine.backup import DEFAULT_WORKERS
from vmkeep.engine.image import restore_image, split_point_spec
from vmkeep.engine.throttle import throttled
from vmkeep.engine.vm import backup_vm, restore_vm_as, restore_vm_overwrite
from vmkeep.errors import Cancelled, UsageError, VmkeepError
from vmkeep.hypervisors.base import parse_transports
from vmkeep.hypervisors.connect import open_connector

if TYPE_CHECKING:
    from vmkeep.hypervisors.base import Connector
    from vmkeep.repository.repo import Repository

HostOpt = Annotated[str, typer.Option("--host", help="libvirt URI (qemu:///system, qemu+tls://…), "
                                                     "vsphere://USER@VCENTER or xapi://USER@POOL-MASTER "
                                                     "([:PORT]; password in VMKEEP_HOST_PASSWORD)")]
InsecureOpt = Annotated[bool, typer.Option(
    "--insecure", help="vSphere, XAPI: skip the certificate check; any address: accept plain TCP (qemu+tcp://) and "
                       "options that name key files or turn checks off (keyfile, no_verify, http, …)")]


def backup_cmd(
    vms: Annotated[list[str], typer.Argument(metavar="VM...", help="VMs to back up")],
    repo: RepoOpt,
    host: HostOpt = "qemu:///system",
    insecure: InsecureOpt = False,
    transport: Annotated[str, typer.Option(help="Transports to try in order")] = "san:hotadd:nbd",
    full: Annotated[bool, typer.Option("--full", help="Read every allocated extent, not just the changes")] = False,
    quiesce: Annotated[str, typer.Option(help="required, try or off (guest-agent fsfreeze)")] = "try",
    nbd_tls: Annotated[str, typer.Option(help="auto, require or off: TLS for the nbd transport (client "
                                              "certificates in /etc/pki/vmkeep or $VMKEEP_NBD_TLS_DIR)")] = "auto",
    parallel: Annotated[int, typer.Option(min=1, max=32, help="VMs backed up at once")] = 1,
    max_rate: Annotated[float | None, typer.Option(min=0.1, help="MiB/s each VM's backup may read, to spare "
                                                                 "production storage")] = None,
    workers: Workers = DEFAULT_WORKERS,
    passphrase_file: PassFile = None,
    key_file: KeyFile = None,
    s3_endpoint: S3Endpoint = None,
    json_out: JsonOpt = False,
) -> None:
    """Back up running or shut-off VMs; incremental from each VM's latest point when its chain holds."""
    if quiesce not in ("required", "try", "off"):
        raise UsageError("--quiesce must be required, try or off")
    if nbd_tls not in ("auto", "require", "off"):
        raise UsageError("--nbd-tls must be auto, require or off")
    order = parse_transports(transport)
    # The first VM's connection is made while the repository key is still being derived (the
    # executable starts that before the modules load): a fixed cost off every scheduled job.
    spare = [open_connector(host, nbd_tls=nbd_tls, insecure=insecure)]  # type: ignore[arg-type]
    try:
        _backup_vms(vms, open_repository(repo, passphrase_file, key_file, s3_endpoint), spare, host=host,
                    insecure=insecure, nbd_tls=nbd_tls, order=order, full=full, quiesce=quiesce, parallel=parallel,
                    max_rate=max_rate, workers=workers, json_out=json_out)
    finally:
        for connector in spare:  # not taken: the repository did not open, or the run was interrupted
            connector.close()


def _backup_vms(vms: list[str], r: Repository, spare: list[Connector], *, host: str, insecure: bool, nbd_tls: str,
                order: list[str], full: bool, quiesce: str, parallel: int, max_rate: float | None, workers: int,
                json_out: bool) -> None:
    """Back up ``vms`` at most ``parallel`` at a time, each through a connection of its own (the
    first taken from ``spare``), and report them."""
    results: dict[str, dict[str, Any]] = {}
    cancel = threading.Event()

    def one(vm: str, progress: RichProgress) -> dict[str, Any]:
        try:
            connector = spare.pop()
        except IndexError:
            connector = open_connector(host, nbd_tls=nbd_tls, insecure=insecure)  # type: ignore[arg-type]
        started = time.monotonic()
        try:
            m = backup_vm(r, connector, vm, transports=order, quiesce=quiesce, full=full,  # type: ignore[arg-type]
                          workers=workers, progress=throttled(progress, max_rate), cancel=cancel)
        except VmkeepError as exc:
            return {"vm": vm, "ok": False, "error": str(exc), "duration": round(time.monotonic() - started, 3)}
        finally:
            connector.close()
        s = m.stats
        return {"vm": vm, "ok": True, "point": m.point_id, "mode": m.meta["mode"], "reason": m.meta["reason"],
                "transport": m.meta["transport"], "consistency": m.meta["consistency"], "notes": m.meta["notes"],
                "bytes_read": s["bytes_read"], "bytes_stored": s["bytes_stored"], "bytes_new": s["bytes_new"],
                "bytes_reused": s["bytes_reused"], "duration": s["seconds"],
                "disks": {d: e.stats for d, e in m.disks.items()}}

    with ProgressBoard(not json_out) as board, ThreadPoolExecutor(parallel) as pool:
        futures = {vm: pool.submit(one, vm, board.progress(f"{vm} ")) for vm in vms}
        try:
            for vm, f in futures.items():
                results[vm] = f.result()
        except KeyboardInterrupt:
            cancel.set()  # every running backup stops at its next chunk and releases what it took
            for f in futures.values():
                f.cancel()
            wait(list(futures.values()))
            raise Cancelled("interrupted: running backups stopped and released their jobs, scratch files and "
                            "checkpoints; nothing partial was committed") from None
    if json_out:
        emit_json({"vms": list(results.values())})
    else:
        table = Table("VM", "point", "mode", "transport", "consistency", "read", "stored", "time", "throughput")
        for res in results.values():
            if res["ok"]:
                table.add_row(res["vm"], res["point"], res["mode"], res["transport"], res["consistency"],
                              human(res["bytes_read"]), human(res["bytes_stored"]), f"{res['duration']:.1f} s",
                              rate(res["bytes_read"], res["duration"]))
            else:
                table.add_row(res["vm"], "[red]failed[/red]", "", "", "", "", "", f"{res['duration']:.1f} s", "")
        out_console.print(uncut(table))
        for res in results.values():
            if res["ok"]:
                out_console.print(f"{res['vm']}: {res['mode']} — {res['reason']}", highlight=False)
                for note in res["notes"]:
                    out_console.print(f"  note: {note}", highlight=False)
            else:
                err_console.print(f"[red]{res['vm']}: {res['error']}[/red]", highlight=False, soft_wrap=True)
    if not all(res["ok"] for res in results.values()):
        raise typer.Exit(1)


def restore_cmd(
    ctx: typer.Context,
    spec: Annotated[str, typer.Argument(metavar="VM[@POINT]", help="What to restore (default: latest point)")],
    repo: Annotated[str | None, typer.Option("--repo", "-r", help="Repository (without it: through the --server, "
                                             "run by a proxy on the --hypervisor's host)")] = None,
    host: HostOpt = "qemu:///system",
    insecure: InsecureOpt = False,
    hypervisor: Annotated[str | None, typer.Option(help="With --server: the registered hypervisor to restore "
                                                   "onto")] = None,
    from_repository: Annotated[str | None, typer.Option(
        "--from-repository", help="With --server: read the point from this registered repository only (one of "
                                  "its copies, say); default: its own, else a healthy copy")] = None,
    as_name: Annotated[str | None, typer.Option("--as", help="Restore as a new VM with this name")] = None,
    storage: Annotated[str | None, typer.Option(help="Where the new VM's disks go: a storage pool or a directory "
                                                     "(libvirt; default: the original's pool), a datastore "
                                                     "(vSphere) or an SR by name or UUID (XAPI)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Put the original VM back (shut off)")] = False,
    esx_host: Annotated[str | None, typer.Option(help="vSphere, XAPI: the host to put (start) the new VM on")] = None,
    folder: Annotated[str | None, typer.Option(help="vSphere: VM folder, e.g. DC0/prod/web")] = None,
    network: Annotated[str | None, typer.Option(
        help="The network for every NIC of the new VM (a libvirt, vSphere or XAPI network); 'none': no NICs")] = None,
    disk: Annotated[str | None, typer.Option(help="Restore only this disk, to --output")] = None,
    output: Annotated[Path | None, typer.Option(help="File for --disk")] = None,
    fmt: Annotated[str, typer.Option("--format", help="qcow2 or raw, for --disk")] = "qcow2",
    start: Annotated[bool, typer.Option("--start/--no-start", help="Boot the restored VM")] = True,
    workers: Workers = DEFAULT_WORKERS,
    passphrase_file: PassFile = None,
    key_file: KeyFile = None,
    s3_endpoint: S3Endpoint = None,
    json_out: JsonOpt = False,
) -> None:
    """Restore a VM as a new one (--as), over the original (--overwrite), or one disk (--disk --output)."""
    chosen = sum(x for x in (as_name is not None, overwrite, disk is not None))
    if chosen != 1:
        raise UsageError("choose one of --as NEWNAME, --overwrite, or --disk DISK --output FILE")
    vm, point = split_point_spec(spec)
    if repo is None:
        from vmkeep.cli.client_cmds import server_restore

        server_restore(ctx, vm, point, hypervisor, as_name, overwrite, disk, storage,
                       start, json_out, place={k: v for k, v in (("host", esx_host), ("folder", folder),
                                                                ("network", network)) if v},
                       repository=from_repository)
        return
    if from_repository is not None:
        raise UsageError("--from-repository chooses a registered repository through --server; here --repo "
                         "is the repository read")
    r = open_repository(repo, passphrase_file, key_file, s3_endpoint)
    progress = RichProgress(not json_out)
    started = time.monotonic()
    if disk is not None:
        if output is None:
            raise UsageError("--disk needs --output FILE")
        m, st = restore_image(r, vm, point, output, disk=disk, fmt=fmt, workers=workers, progress=progress)
        result: dict[str, Any] = {"point": m.point_id, "vm": vm, "disk": disk, "output": str(output),
                                  "bytes_written": st.bytes_written}
    else:
        connector = open_connector(host, insecure=insecure)
        try:
            if as_name is not None:
                place = {k: v for k, v in (("host", esx_host), ("folder", folder), ("network", network)) if v}
                res = restore_vm_as(r, connector, vm, point, as_name, storage=storage, start=start,
                                    workers=workers, progress=progress, place=place)
            else:
                res = restore_vm_overwrite(r, connector, vm, point, workers=workers, progress=progress)
        finally:
            connector.close()
        result = {"point": res.manifest.point_id, "vm": res.name, "disks": res.disks,
                  "bytes_written": sum(s.bytes_written for s in res.stats.values()),
                  "started": bool(start and as_name is not None)}
    result["duration"] = round(time.monotonic() - started, 3)
    if json_out:
        emit_json(result)
    else:
        out_console.print(f"restored {vm}@{result['point']} → {result.get('vm', vm)}: wrote "
                          f"{human(result['bytes_written'])} in {result['duration']:.1f} s", highlight=False)


def topology_line(topology: dict[str, Any]) -> str:
    """One line of the estate around the VMs, whatever the hypervisor calls its parts (vSphere's
    datacenters, clusters and datastores; a Xen pool's hosts, SRs and networks): each part's names,
    with the hosts of a cluster and the free space of a store."""
    parts = []
    for kind, items in topology.items():
        names = []
        for item in items:
            if not isinstance(item, dict):
                names.append(str(item))
                continue
            extra = [f"{len(item['hosts'])} hosts"] if isinstance(item.get("hosts"), list) else []
            extra += [f"{human(item['free'] or 0)} free"] if "free" in item else []
            names.append(f"{item.get('name', '')}" + (f" ({', '.join(extra)})" if extra else ""))
        parts.append(f"{kind}: {', '.join(names) or 'none'}")
    return "; ".join(parts)


def inventory_cmd(host: HostOpt = "qemu:///system", insecure: InsecureOpt = False,
                  json_out: JsonOpt = False) -> None:
    """VMs on a hypervisor with their state and disks."""
    connector = open_connector(host, insecure=insecure)
    try:
        vms = connector.inventory()
        topology = connector.topology() if hasattr(connector, "topology") else None  # vSphere: the estate around
    finally:
        connector.close()
    if json_out:
        emit_json({"host": host, "vms": [{**vm.__dict__, "disks": [d.__dict__ for d in vm.disks]} for vm in vms],
                   **({"topology": topology} if topology else {})})
        return
    if topology:
        out_console.print(topology_line(topology), highlight=False)
    table = Table("VM", "state", "disk", "format", "size", "allocated", "backup")
    for vm in vms:
        for i, d in enumerate(vm.disks or []):
            table.add_row(vm.name if i == 0 else "", vm.state if i == 0 else "", d.name, d.format, human(d.size),
                          human(d.allocation), "yes" if d.backup else d.skip_reason)
    out_console.print(table)
