"""`vmkeep lab …`: small TCG lab VMs for tests and the demo (guest writes, checksums, files, agent)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from vmkeep.cli.common import JsonOpt
from vmkeep.cli.output import emit_json, human, out_console
from vmkeep.cli.repo_cmds import parse_size
from vmkeep.lab import LOCAL_URI

# vmkeep.lab.vm and its services load inside the commands: other commands start faster without them.

app = typer.Typer(help="Lab VMs: tiny TCG guests to back up, write into and check.", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="Lab VM name")]
DiskOpt = Annotated[str, typer.Option(help="Disk target: vda, vdb, …")]
HostOpt = Annotated[str, typer.Option("--host", help="libvirt URI of this machine's libvirtd")]


@app.command("create")
def create_cmd(
    name: NameArg,
    disks: Annotated[int, typer.Option(min=1, max=8, help="Number of empty qcow2 disks")] = 1,
    size: Annotated[str, typer.Option(help="Size of each disk (e.g. 2G, 64M)")] = "2G",
    host: HostOpt = LOCAL_URI,
    json_out: JsonOpt = False,
) -> None:
    """Create and boot a lab VM (the guest image is built once from Debian packages, about 10 s)."""
    start = time.monotonic()
    from vmkeep.lab.vm import create_lab_vm

    vm = create_lab_vm(name, disks=disks, size=parse_size(size), uri=host)
    vm.close()
    result = {"name": vm.name, "disks": {d: str(p) for d, p in vm.disks.items()}, "console": str(vm.console),
              "seconds": round(time.monotonic() - start, 2)}
    if json_out:
        emit_json(result)
    else:
        out_console.print(f"lab VM {vm.name} is up with {', '.join(vm.disks)} in {result['seconds']} s")


@app.command("write")
def write_cmd(
    name: NameArg,
    disk: DiskOpt = "vda",
    offset: Annotated[str, typer.Option(help="Where to write (bytes, or 4M, …); a multiple of 512")] = "0",
    length: Annotated[str, typer.Option(help="How much to write; a multiple of 512")] = "1M",
    seed: Annotated[str, typer.Option(help="Seed of the data pattern (same seed, same bytes)")] = "vmkeep",
    host: HostOpt = LOCAL_URI,
) -> None:
    """Make the guest write reproducible pseudo-random data to a disk with dd, then sync."""
    off, n = parse_size(offset), parse_size(length)
    from vmkeep.lab.vm import LabVM

    vm = LabVM.open(name, host)
    try:
        vm.write(disk, off, n, seed)
    finally:
        vm.close()
    out_console.print(f"{name}: wrote {human(n)} at {off} on {disk} (seed {seed!r})")


@app.command("files")
def files_cmd(name: NameArg, disk: DiskOpt = "vda", host: HostOpt = LOCAL_URI, json_out: JsonOpt = False) -> None:
    """Make a filesystem with a few files on a disk and mount it at /mnt/DISK in the guest."""
    from vmkeep.lab.vm import LabVM

    vm = LabVM.open(name, host)
    try:
        files = vm.make_files(disk)
    finally:
        vm.close()
    if json_out:
        emit_json({"name": name, "disk": disk, "mountpoint": f"/mnt/{disk}", "files": files})
        return
    out_console.print(f"{name}: /dev/{disk} mounted at /mnt/{disk} with {len(files)} files")
    for path, digest in files.items():
        out_console.print(f"  {digest}  {path}", highlight=False, soft_wrap=True)


@app.command("checksum")
def checksum_cmd(name: NameArg, disk: DiskOpt = "vda", host: HostOpt = LOCAL_URI, json_out: JsonOpt = False) -> None:
    """Print the SHA-256 of a whole disk as the guest reads it."""
    from vmkeep.lab.vm import LabVM

    vm = LabVM.open(name, host)
    try:
        digest = vm.checksum(disk)
    finally:
        vm.close()
    if json_out:
        emit_json({"name": name, "disk": disk, "sha256": digest})
    else:
        typer.echo(digest)


@app.command("run")
def run_cmd(
    name: NameArg,
    command: Annotated[str, typer.Argument(help="Shell command to run in the guest (busybox sh)")],
    timeout: Annotated[float, typer.Option(help="Seconds before the guest kills it")] = 60.0,
    host: HostOpt = LOCAL_URI,
) -> None:
    """Run a shell command in the guest over its serial console and print the output."""
    from vmkeep.lab.vm import LabVM

    vm = LabVM.open(name, host)
    try:
        typer.echo(vm.run(command, timeout=timeout), nl=False)
    finally:
        vm.close()


@app.command("list")
def list_cmd(host: HostOpt = LOCAL_URI, json_out: JsonOpt = False) -> None:
    """List the lab VMs libvirt knows."""
    from vmkeep.lab.vm import list_lab_vms

    names = list_lab_vms(host)
    if json_out:
        emit_json({"vms": names})
    else:
        for n in names:
            typer.echo(n)


@app.command("destroy")
def destroy_cmd(name: NameArg, host: HostOpt = LOCAL_URI) -> None:
    """Stop and undefine a lab VM and delete its disks (only lab VMs; works on half-created ones)."""
    from vmkeep.lab.vm import destroy_lab_vm

    if destroy_lab_vm(name, host):
        out_console.print(f"lab VM {name} destroyed")
    else:
        out_console.print(f"there was no lab VM {name}")


vcsim_app = typer.Typer(help="The lab's vCenter: govmomi's simulator with a VM of known data.", no_args_is_help=True)
app.add_typer(vcsim_app, name="vcsim")


@vcsim_app.command("start")
def vcsim_start_cmd(
    listen: Annotated[str, typer.Option(help="HOST:PORT to serve on")] = "127.0.0.1:8989",
    json_out: JsonOpt = False,
) -> None:
    """Build (once) and start the simulator in the background, with the lab VM vmkeep-vc1."""
    from vmkeep.lab import vcsim

    sim = vcsim.start(listen)
    if json_out:
        emit_json({"address": sim.address, "url": sim.url, "ca_file": sim.ca_file, "pid": sim.pid,
                   "password_file": str(vcsim.STATE / "info.json")})
        return
    out_console.print(f"vcsim runs at {sim.url} (pid {sim.pid}) with lab VM {vcsim.LAB_VM}\n"
                      f"  address: {sim.address}\n"
                      f"  export VMKEEP_VSPHERE_CA_FILE={sim.ca_file}\n"
                      f"  password: in {vcsim.STATE / 'info.json'} (root only)", highlight=False)


@vcsim_app.command("stop")
def vcsim_stop_cmd() -> None:
    """Stop the simulator (its VMs and datastore files go with it)."""
    from vmkeep.lab import vcsim

    out_console.print("vcsim stopped" if vcsim.stop() else "vcsim was not running")


xapi_app = typer.Typer(help="The lab's XenServer: a XAPI simulator (two hosts) with a VM of known data.",
                       no_args_is_help=True)
app.add_typer(xapi_app, name="xapi")


@xapi_app.command("start")
def xapi_start_cmd(
    listen: Annotated[str, typer.Option(help="127.0.0.1:PORT to serve on (the pool member answers on 127.0.0.2)")]
    = "127.0.0.1:8443",
    json_out: JsonOpt = False,
) -> None:
    """Start the simulator in the background, with the lab VM vmkeep-xen1."""
    from vmkeep.lab import xapi

    sim = xapi.start(listen)
    if json_out:
        emit_json({"address": sim.address, "member_address": sim.member_address, "url": sim.url,
                   "ca_file": sim.ca_file, "pid": sim.pid, "password_file": str(xapi.STATE / "info.json")})
        return
    out_console.print(f"XAPI simulator runs at {sim.url} (pid {sim.pid}) with lab VM {xapi.LAB_VM}\n"
                      f"  address: {sim.address} (pool member: {sim.member_address})\n"
                      f"  export VMKEEP_XAPI_CA_FILE={sim.ca_file}\n"
                      f"  password: in {xapi.STATE / 'info.json'} (root only)", highlight=False)


@xapi_app.command("stop")
def xapi_stop_cmd() -> None:
    """Stop the simulator (its VMs, images and NBD servers go with it)."""
    from vmkeep.lab import xapi

    out_console.print("XAPI simulator stopped" if xapi.stop() else "XAPI simulator was not running")
