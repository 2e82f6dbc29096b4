"""The NBD servers vmkeep starts keep their chunk-sized buffers instead of faulting in fresh
memory for every 4 MiB read (which made the server's system time the largest CPU cost)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmkeep.lab.images import Segment, make_image
from vmkeep.memory import TUNABLES, server_environment
from vmkeep.transport.nbd_client import open_export
from vmkeep.transport.qemu_nbd import ImageInfo, serve_image

CHUNK = 4 << 20


def server_pid(uri: str) -> int:
    sock = uri.split("socket=", 1)[1].encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and sock in (proc / "cmdline").read_bytes():
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no server process for {sock!r}")


def minor_faults(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[7])


def test_qemu_nbd_reuses_its_read_buffers(tmp_path: Path) -> None:
    image = tmp_path / "d.qcow2"
    make_image(image, 64 << 20, [Segment(0, 64 << 20, "random")])  # data: holes are answered without a buffer
    with serve_image(ImageInfo(image, "qcow2", 64 << 20)) as uri, open_export(uri) as export:
        pid = server_pid(uri)
        for offset in range(0, 64 << 20, CHUNK):  # warm up
            export.pread(CHUNK, offset)
        before = minor_faults(pid)
        for _ in range(4):
            for offset in range(0, 64 << 20, CHUNK):
                export.pread(CHUNK, offset)
        per_read = (minor_faults(pid) - before) / 64
    # a fresh 4 MiB buffer is 1024 faults; a kept one, next to none
    assert per_read < 100, f"qemu-nbd faulted {per_read:.0f} pages per 4 MiB read"


@pytest.mark.parametrize("own", [None, "glibc.malloc.arena_max=2"])
def test_callers_own_tunables_are_kept(monkeypatch: pytest.MonkeyPatch, own: str | None) -> None:
    if own:
        monkeypatch.setenv("GLIBC_TUNABLES", own)
    else:
        monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    value = server_environment()["GLIBC_TUNABLES"]
    assert value == (f"{TUNABLES}:{own}" if own else TUNABLES)  # later settings win in glibc
