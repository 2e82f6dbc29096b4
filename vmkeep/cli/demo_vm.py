"""The VM round trip of `vmkeep demo`: a real lab guest on the local libvirt, end to end."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from rich.table import Table

from vmkeep.cli.output import RichProgress, human, out_console, rate
from vmkeep.engine.image import restore_image
from vmkeep.engine.vm import backup_vm, restore_vm_as
from vmkeep.errors import VmkeepError
from vmkeep.hypervisors.connect import open_connector
from vmkeep.lab.images import file_sha256
from vmkeep.lab.services import ensure_libvirtd
from vmkeep.lab.vm import create_lab_vm, destroy_lab_vm, wait_for_agent
from vmkeep.repository.backends import open_backend
from vmkeep.repository.config import Credentials
from vmkeep.repository.info import repository_info
from vmkeep.repository.repo import Repository
from vmkeep.repository.verify import verify

MiB = 1 << 20


def vm_demo(base: Path, size: int) -> None:
    ensure_libvirtd()
    name = f"vmkeep-demo-{secrets.token_hex(3)}"
    copy = f"{name}-restored"
    out_console.print(f"[bold]vmkeep demo[/bold]: lab VM {name} ({human(size)} disk) on qemu:///system, "
                      f"encrypted repository in {base / 'repo'}")
    os.environ.setdefault("VMKEEP_PASSPHRASE", "vmkeep-demo-passphrase")
    repo = Repository.init(open_backend(str(base / "repo")), chunk_size=4 * MiB, compression=1, encrypt=True,
                           credentials=Credentials.from_env())
    connector = open_connector("qemu:///system")
    rows: list[tuple[str, int, int, float, str]] = []
    t = time.monotonic()
    vm = create_lab_vm(name, disks=1, size=size)
    try:
        rows.append(("create and boot the lab VM", 0, 0, time.monotonic() - t, "guest answers"))
        vm.write("vda", 0, size // 2, seed="demo-first")
        at_full = vm.checksum("vda")
        full = backup_vm(repo, connector, name, transports=["hotadd", "nbd"], quiesce="try", progress=RichProgress())
        rows.append((f"full backup ({full.meta['transport']}, {full.meta['consistency']})",
                     full.stats["bytes_read"], full.stats["bytes_stored"], full.stats["seconds"], ""))
        vm.write("vda", size * 3 // 4, 4 * MiB, seed="demo-second")
        at_incr = vm.checksum("vda")
        incr = backup_vm(repo, connector, name, transports=["hotadd", "nbd"], quiesce="try", progress=RichProgress())
        rows.append((f"{incr.meta['mode']} after the guest wrote 4 MiB", incr.stats["bytes_read"],
                     incr.stats["bytes_stored"], incr.stats["seconds"], ""))

        for label, point, expected in (("restore vda of the full point", full.point_id, at_full),
                                       ("restore vda of the incremental", incr.point_id, at_incr)):
            out = base / f"vda-{point}.raw"
            t = time.monotonic()
            _m, st = restore_image(repo, name, point, out, disk="vda", fmt="raw", progress=RichProgress())
            elapsed = time.monotonic() - t
            same = file_sha256(out) == expected
            rows.append((label, st.bytes_written, 0, elapsed, "= guest checksum" if same else "DIFFERENT"))
            out.unlink()
            if not same:
                raise VmkeepError(f"the restored disk of {point} differs from what the guest saw")

        t = time.monotonic()
        restore_vm_as(repo, connector, name, None, copy, storage=str(base / copy), progress=RichProgress())
        booted = wait_for_agent(copy)
        rows.append(("restore as a new VM and boot it", 0, 0, time.monotonic() - t,
                     "agent answers" if booted else "DID NOT BOOT"))
        report = verify(repo, progress=RichProgress())
        rows.append(("verify the repository", report.bytes_checked, 0, report.seconds,
                     "OK" if report.ok else "PROBLEMS"))
    finally:
        destroy_lab_vm(copy)
        vm.destroy()
        connector.close()
    table = Table("step", "bytes read/written", "stored", "time", "throughput", "check")
    for label, nbytes, stored, seconds, check in rows:
        table.add_row(label, human(nbytes) if nbytes else "", human(stored) if stored else "", f"{seconds:.2f} s",
                      rate(nbytes, seconds) if nbytes else "", check)
    out_console.print(table)
    info = repository_info(repo)
    out_console.print(f"repository: {info.points} points, data {human(info.referenced_bytes)}, stored "
                      f"{human(info.stored_bytes)} (dedup {info.dedup_ratio:.2f}x, compression "
                      f"{info.compression_ratio:.2f}x, AES-256-GCM)")
    if not booted or not report.ok:
        raise VmkeepError("the demo found a problem: see the table")
