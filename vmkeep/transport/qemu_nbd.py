"""Serving a disk image as an NBD export with qemu-nbd, and probing images with qemu-img."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vmkeep.errors import ImageError

SECTOR = 512


@dataclass
class ImageInfo:
    path: Path
    format: str
    virtual_size: int
    bitmaps: list[str] = field(default_factory=list)


def probe_image(path: Path, fmt: str | None = None) -> ImageInfo:
    """Format, size and persistent bitmaps of an image; refuses files that are not disk images."""
    if not path.exists():
        raise ImageError(f"{path} does not exist")
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not a disk image")
    cmd = ["qemu-img", "info", "--output=json", "--force-share"]
    if fmt:
        cmd += ["-f", fmt]
    proc = subprocess.run([*cmd, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError(f"qemu-img cannot open {path}: {proc.stderr.strip()}")
    info = json.loads(proc.stdout)
    detected = info["format"]
    size = int(info["virtual-size"])
    if fmt is None and detected == "raw" and (size == 0 or os.path.getsize(path) % SECTOR):
        raise ImageError(
            f"{path} does not look like a disk image (no known format, and its size is not a multiple of "
            f"{SECTOR} bytes); pass --format raw to back it up anyway"
        )
    bitmaps = [b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])]
    return ImageInfo(path, detected, size, bitmaps)


@contextmanager
def serve_image(
    image: ImageInfo,
    *,
    readonly: bool = True,
    bitmap: str | None = None,
    connections: int = 8,
) -> Iterator[str]:
    """Run qemu-nbd on a private unix socket for the duration; yields the NBD URI."""
    if bitmap is not None and bitmap not in image.bitmaps:
        known = ", ".join(image.bitmaps) or "none"
        raise ImageError(f"{image.path} has no persistent bitmap {bitmap!r} (it has: {known})")
    workdir = Path(tempfile.mkdtemp(prefix="vmkeep-nbd-"))
    sock = workdir / "nbd.sock"
    pidfile = workdir / "qemu-nbd.pid"
    cmd = [
        "qemu-nbd", "--fork", f"--pid-file={pidfile}", f"--socket={sock}", f"--format={image.format}",
        "--persistent", f"--shared={connections}", "--cache=writeback",
    ]
    if readonly:
        cmd.append("--read-only")
    if bitmap:
        cmd.append(f"--bitmap={bitmap}")
    cmd.append(str(image.path))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ImageError(f"qemu-nbd cannot serve {image.path}: {proc.stderr.strip()}")
        yield f"nbd+unix:///?socket={sock}"
    finally:
        _stop(pidfile)
        for p in (sock, pidfile):
            p.unlink(missing_ok=True)
        workdir.rmdir()


def _stop(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)


def create_image(path: Path, fmt: str, size: int) -> None:
    proc = subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError(f"cannot create {path}: {proc.stderr.strip()}")
