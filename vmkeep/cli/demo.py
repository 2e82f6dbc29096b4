"""`vmkeep demo`: a complete round trip on lab material, with a summary table.

By default a running lab VM (see demo_vm). With --image, a qcow2 disk image: full backup into an
encrypted repository, changes tracked by a persistent dirty bitmap, incremental that reads only
the changes, restore of both points, byte-for-byte comparison with `qemu-img compare`, verify.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vmkeep.cli.output import RichProgress, human, out_console, rate
from vmkeep.engine.image import backup_image, restore_image
from vmkeep.errors import VmkeepError
from vmkeep.lab.images import Segment, make_image, write_segments
from vmkeep.repository.backends import open_backend
from vmkeep.repository.config import Credentials
from vmkeep.repository.info import repository_info
from vmkeep.repository.repo import Repository
from vmkeep.repository.verify import verify

MiB = 1 << 20


def _compare(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


def demo_cmd(
    size_mib: Annotated[int, typer.Option("--size", help="Disk size in MiB")] = 128,
    workdir: Annotated[Path | None, typer.Option(help="Keep the demo files here (default: a temp dir)")] = None,
    disk_image: Annotated[bool, typer.Option("--image", help="A disk-image round trip instead of a VM")] = False,
) -> None:
    """Back up a running lab VM, let it write, back up incrementally, restore it as a new VM that
    boots, and compare every restored disk with the guest's own view."""
    base = Path(workdir or tempfile.mkdtemp(prefix="vmkeep-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    if not disk_image:
        from vmkeep.cli.demo_vm import vm_demo

        vm_demo(base, size_mib * MiB)
        return
    size = size_mib * MiB
    image = base / "lab-disk.qcow2"
    quarter = size // 4
    out_console.print(f"[bold]vmkeep demo[/bold] in {base}: a {human(size)} qcow2 disk, a quarter random, "
                      "a quarter text, a quarter written zeros, a quarter never written")
    make_image(image, size, [Segment(0, quarter, "random"), Segment(quarter, quarter, "text"),
                             Segment(2 * quarter, quarter, "zero")])
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "since-full"], check=True)
    os.environ.setdefault("VMKEEP_PASSPHRASE", "vmkeep-demo-passphrase")
    repo = Repository.init(open_backend(str(base / "repo")), chunk_size=4 * MiB, compression=1, encrypt=True,
                           credentials=Credentials.from_env())
    rows: list[tuple[str, int, int, float, str]] = []

    snap_full = base / "at-full.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(snap_full)], check=True)
    full = backup_image(repo, image, "lab-disk", progress=RichProgress())
    rows.append(("full backup", full.stats["bytes_read"], full.stats["bytes_stored"], full.stats["seconds"], ""))

    changes = [Segment(5 * MiB, 3 * MiB, "random", "change-1"), Segment(quarter + 7 * MiB, MiB, "text", "change-2"),
               Segment(size - 2 * MiB, MiB, "random", "change-3")]
    write_segments(image, "qcow2", size, changes)
    incr = backup_image(repo, image, "lab-disk", since="latest", bitmap="since-full", progress=RichProgress())
    rows.append((f"incremental ({human(sum(c.length for c in changes))} changed)", incr.stats["bytes_read"],
                 incr.stats["bytes_stored"], incr.stats["seconds"], ""))

    for label, point, reference in (("restore full", full.point_id, snap_full), ("restore incremental",
                                                                               incr.point_id, image)):
        out = base / f"restored-{point}.qcow2"
        t = time.monotonic()
        _m, st = restore_image(repo, "lab-disk", point, out, progress=RichProgress())
        elapsed = time.monotonic() - t
        same = _compare(reference, out)
        rows.append((label, st.bytes_written, 0, elapsed, "identical" if same else "DIFFERENT"))
        if not same:
            raise VmkeepError(f"the restored disk {out} differs from {reference}")

    report = verify(repo, progress=RichProgress())
    info = repository_info(repo)
    table = Table("step", "bytes", "stored", "time", "throughput", "check")
    for label, nbytes, stored, seconds, check in rows:
        table.add_row(label, human(nbytes), human(stored) if stored else "", f"{seconds:.2f} s",
                      rate(nbytes, seconds), check)
    table.add_row("verify", human(report.bytes_checked), "", f"{report.seconds:.2f} s",
                  rate(report.bytes_checked, report.seconds), "OK" if report.ok else "PROBLEMS")
    out_console.print(table)
    out_console.print(f"repository: {info.points} points, data {human(info.referenced_bytes)}, stored "
                      f"{human(info.stored_bytes)}: dedup {info.dedup_ratio:.2f}x, compression "
                      f"{info.compression_ratio:.2f}x, encrypted with AES-256-GCM")
    if not report.ok:
        raise VmkeepError("verify found problems")
