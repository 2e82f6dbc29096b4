"""`vmkeep mount` and `vmkeep instant-restore`: a restore point served or booted straight from
the repository, without restoring it first."""

from __future__ import annotations

import json
import shutil
import signal
import socket as sk
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from vmkeep.cli.common import JsonOpt, KeyFile, PassFile, RepoOpt, S3Endpoint, open_repository
from vmkeep.cli.output import RichProgress, emit_json, out_console
from vmkeep.engine.image import split_point_spec
from vmkeep.engine.mount import PointSpec, run_foreground
from vmkeep.errors import UsageError, VmkeepError
from vmkeep.hypervisors.address import check_address
from vmkeep.hypervisors.base import Connector
from vmkeep.hypervisors.connect import open_connector
from vmkeep.repository.repo import Repository

SpecArg = Annotated[str, typer.Argument(metavar="VM[@POINT]", help="What to serve (default: latest point)")]


def spec_for(repo: str, name: str, point: str, disk: str, s3_endpoint: str | None, key_file: Path | None,
             passphrase_file: Path | None) -> PointSpec:
    """How an export opens ``name@point`` disk ``disk`` with the command's repository options."""
    return PointSpec(repo, name, point, disk, s3_endpoint, str(key_file) if key_file else None,
                     str(passphrase_file) if passphrase_file else None)


def resolved_spec(repo_location: str, spec: str, disk: str, s3_endpoint: str | None, key_file: Path | None,
                  passphrase_file: Path | None) -> PointSpec:
    """The point resolved now (a later point must not change what a running export serves)."""
    name, point = split_point_spec(spec)
    repo = open_repository(repo_location, passphrase_file, key_file, s3_endpoint)
    manifest = repo.find_point(name, point)
    if disk not in manifest.disks:
        raise UsageError(f"{name}@{manifest.point_id} has no disk {disk!r} (it has: {', '.join(manifest.disks)})")
    return spec_for(repo_location, name, manifest.point_id, disk, s3_endpoint, key_file, passphrase_file)


def _opened(repo: str, vm: str, point: str | None, s3_endpoint: str | None, key_file: Path | None,
            passphrase_file: Path | None) -> tuple[Repository, PointSpec]:
    """The repository, and how exports of its points open it (each disk fills in the rest)."""
    base = spec_for(repo, vm, point or "", "", s3_endpoint, key_file, passphrase_file)
    return open_repository(repo, passphrase_file, key_file, s3_endpoint), base


@contextmanager
def _connected(host: str) -> Iterator[Connector]:
    """The connector of the hypervisor at ``host`` (its address checked), closed afterwards."""
    connector = open_connector(host)
    try:
        yield connector
    finally:
        connector.close()


def mount_cmd(
    spec: SpecArg,
    repo: RepoOpt,
    disk: Annotated[str, typer.Option(help="Which disk of the point")] = "vda",
    socket: Annotated[Path | None, typer.Option(
        help="Serve on this unix socket (default: a private one, its URI printed)")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Serve on this loopback TCP port")] = None,
    passphrase_file: PassFile = None,
    key_file: KeyFile = None,
    s3_endpoint: S3Endpoint = None,
    json_out: JsonOpt = False,
) -> None:
    """Serve a restore point's disk as a read-only NBD export until Ctrl-C (chunks fetched on demand)."""
    if socket is not None and port is not None:
        raise UsageError("give --socket PATH or --port N (loopback), not both; without either, a private socket "
                         "is made and its URI printed")
    point = resolved_spec(repo, spec, disk, s3_endpoint, key_file, passphrase_file)
    with ExitStack() as stack:
        if socket is None and port is None:  # a directory only this user enters, gone afterwards
            private = Path(tempfile.mkdtemp(prefix="vmkeep-mount-"))
            stack.callback(shutil.rmtree, private, ignore_errors=True)
            socket = private / "nbd.sock"
        _serve_until_stopped(point, disk, socket, port, json_out)


def _serve_until_stopped(point: PointSpec, disk: str, socket: Path | None, port: int | None, json_out: bool) -> None:
    """Start the export, say where it is once it listens (a script may connect at once), and wait."""
    proc = run_foreground(point, unix=socket, port=port)
    from vmkeep.transport.nbd_client import unix_uri  # libnbd: loaded by the command that serves

    uri = unix_uri(socket) if socket else f"nbd://127.0.0.1:{port}"
    _wait_listening(proc, socket, port)
    if json_out:  # one line, flushed: a script reads it while the export runs
        print(json.dumps({"uri": uri, "point": point.point, "disk": disk, "pid": proc.pid}), flush=True)
    else:
        out_console.print(f"serving {point.name}@{point.point} disk {disk} at {uri} (Ctrl-C stops)", highlight=False)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(10)
        return
    if code not in (0, -signal.SIGTERM):
        raise VmkeepError(f"nbdkit stopped with code {code}")


def _wait_listening(proc: subprocess.Popen[bytes], socket: Path | None, port: int | None,
                    timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not _listening(socket, port):
        if proc.poll() is not None:
            raise VmkeepError(f"nbdkit stopped with code {proc.returncode} before serving")
        if time.monotonic() > deadline:
            proc.terminate()
            raise VmkeepError(f"nbdkit did not start serving within {timeout:.0f} s")
        time.sleep(0.02)


def _listening(socket: Path | None, port: int | None) -> bool:
    family, address = (sk.AF_UNIX, str(socket)) if socket else (sk.AF_INET, ("127.0.0.1", port or 0))
    with sk.socket(family) as probe:
        try:
            probe.connect(address)
            return True
        except OSError:
            return False


def instant_restore_cmd(
    target: Annotated[str, typer.Argument(metavar="VM[@POINT] | finish NAME",
                                          help="What to boot, or `finish` with the name of a running recovery")],
    name: Annotated[str | None, typer.Argument(metavar="[NAME]", help="With finish: the recovered VM")] = None,
    repo: Annotated[str | None, typer.Option("--repo", "-r", help="Repository (to start a recovery)")] = None,
    as_name: Annotated[str | None, typer.Option("--as", help="Name of the VM to boot")] = None,
    host: Annotated[str, typer.Option("--host", help="libvirt URI of this host")] = "qemu:///system",
    storage: Annotated[Path | None, typer.Option(help="With finish: directory to move the disks to")] = None,
    discard: Annotated[bool, typer.Option("--discard", help="With finish: drop the VM and its changes")] = False,
    passphrase_file: PassFile = None,
    key_file: KeyFile = None,
    s3_endpoint: S3Endpoint = None,
    json_out: JsonOpt = False,
) -> None:
    """Boot a VM straight from a restore point (copy-on-write over the repository), then `finish NAME
    --storage DIR` moves it to real storage while it runs, or `finish NAME --discard` drops it."""
    from vmkeep.engine import instant

    started = time.monotonic()
    if target == "finish":
        if name is None or (storage is None) == (not discard):
            raise UsageError("finish NAME takes --storage DIR (keep it) or --discard (drop it)")
        running = instant.InstantVM.load(name)
        with _connected(running.uri) as connector:
            if discard:
                instant.discard(connector, running)
                result: dict[str, Any] = {"vm": name, "discarded": True, "from": running.source}
            else:
                assert storage is not None
                result = {"vm": name, "disks": instant.finish(connector, running, storage,
                                                              RichProgress(not json_out))}
    else:
        if repo is None or as_name is None:
            raise UsageError("instant-restore VM[@POINT] needs --repo REPO and --as NAME")
        check_address(host)  # a refused address is reported before the repository is opened
        vm, point = split_point_spec(target)
        r, base = _opened(repo, vm, point, s3_endpoint, key_file, passphrase_file)
        with _connected(host) as connector:
            running = instant.start(r, base, connector, vm, point, as_name)
        result = {"vm": as_name, "from": running.source, "overlays": running.overlays}
    result["seconds"] = round(time.monotonic() - started, 3)
    if json_out:
        emit_json(result)
    elif target != "finish":
        writes = Path(next(iter(running.overlays.values()))).parent if running.overlays else "its overlays"
        out_console.print(f"{as_name} runs from {result['from']} ({result['seconds']:.1f} s); its writes go to "
                          f"{writes}. Keep it: vmkeep instant-restore finish {as_name} "
                          f"--storage DIR; drop it: … finish {as_name} --discard", highlight=False)
    else:
        out_console.print(f"{name}: " + ("discarded" if discard else f"moved to {storage}"), highlight=False)


def verify_boot_cmd(
    spec: SpecArg,
    repo: RepoOpt,
    host: Annotated[str, typer.Option("--host", help="libvirt URI of this host")] = "qemu:///system",
    timeout: Annotated[float, typer.Option(min=10, help="Seconds to wait for the heartbeat")] = 300.0,
    marker: Annotated[str | None, typer.Option(help="Heartbeat: this text on the serial console (else the guest "
                                                    "agent's ping)")] = None,
    script: Annotated[Path | None, typer.Option(help="Run this on the host once it is up (VMKEEP_VERIFY_VM names "
                                                    "the sandbox); exit 0 passes")] = None,
    passphrase_file: PassFile = None,
    key_file: KeyFile = None,
    s3_endpoint: S3Endpoint = None,
    json_out: JsonOpt = False,
) -> None:
    """Check that a restore point boots: every chunk read back, then a sandboxed boot (no network) with a
    heartbeat and an optional script; the outcome is recorded on the point. Exit 1 when it fails."""
    from vmkeep.engine.boot_check import boot_check

    check_address(host)
    vm, point = split_point_spec(spec)
    r, base = _opened(repo, vm, point, s3_endpoint, key_file, passphrase_file)
    with _connected(host) as connector:
        result = boot_check(r, base, connector, vm, point, timeout=timeout, marker=marker, script=script)
    if json_out:
        emit_json(result)
    elif result["passed"]:
        out_console.print(f"{vm}@{result['point']} boots: heartbeat after {result['seconds_to_heartbeat']} s "
                          f"({result['heartbeat']}); checked in {result['seconds']} s", highlight=False)
    else:
        out_console.print(f"[red]{vm}@{result['point']} failed:[/red] {result['reason']}", highlight=False)
    if not result["passed"]:
        raise typer.Exit(1)
