"""Servers vmkeep starts die with it, including when it is killed before they are set up; the maps
they serve are read whole."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vmkeep.transport.extents import Extent
from vmkeep.transport.nbd_client import MAX_STATUS_REQUEST, open_export, unix_socket_of, unix_uri
from vmkeep.transport.qemu_nbd import ImageInfo, create_image, dying_with, probe_image, serve_image

MiB = 1 << 20
GiB = 1 << 30

START_A_SERVER = """
import os, subprocess, sys
from vmkeep.transport.qemu_nbd import dying_with
child = subprocess.Popen(["sleep", "60"], preexec_fn=dying_with(os.getpid()))
print(child.pid, flush=True)
sys.stdin.read()
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_server_dies_with_a_killed_vmkeep() -> None:
    parent = subprocess.Popen([sys.executable, "-c", START_A_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout is not None
    server = int(parent.stdout.readline())
    assert _alive(server)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _alive(server)


def test_server_whose_parent_died_before_the_request_exits_at_once() -> None:
    """The request only covers a parent still alive when it is made: a child whose parent is
    already gone (here: a pid that is not its parent) must not stay up."""
    started = time.monotonic()
    proc = subprocess.run(["sleep", "60"], preexec_fn=dying_with(os.getpid() + 1_000_000), timeout=30)
    assert proc.returncode == 1 and time.monotonic() - started < 10


def test_maps_of_a_disk_larger_than_one_status_request(tmp_path: Path) -> None:
    """The allocation map and a dirty bitmap of a 10 GiB disk (three block-status requests, whose
    length NBD limits to 32 bits) are read whole, with what lies beyond the first request."""
    image = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "10G"], check=True)
    io = ["qemu-io", "-f", "qcow2", str(image)]
    subprocess.run([*io, "-c", "write -P 1 100M 1M", "-c", "write -P 2 6G 2M"], check=True, capture_output=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b1"], check=True)
    subprocess.run([*io, "-c", "write -P 3 5000M 1M", "-c", "write -P 4 9G 64K"], check=True, capture_output=True)
    with serve_image(probe_image(image), bitmap="b1") as uri, open_export(uri, "qemu:dirty-bitmap:b1") as export:
        assert export.size > MAX_STATUS_REQUEST * 2
        assert export.data_extents() == [Extent(100 * MiB, MiB), Extent(5000 * MiB, MiB), Extent(6 * GiB, 2 * MiB),
                                          Extent(9 * GiB, 64 * 1024)]
        assert export.dirty_extents() == [Extent(5000 * MiB, MiB), Extent(9 * GiB, 64 * 1024)]


def test_socket_paths_with_uri_characters(tmp_path: Path) -> None:
    """A socket whose path holds '&', '#', '%' or a space still makes a URI libnbd opens (the path
    is percent-encoded; before, the query ended at the '&' or '#')."""
    odd = tmp_path / "a&b #c%d"
    odd.mkdir()
    sock = odd / "nbd.sock"
    uri = unix_uri(sock)
    assert unix_socket_of(uri) == str(sock)
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", str(image), "-c", "write -P 7 1M 1M"], check=True, capture_output=True)
    server = subprocess.Popen(["qemu-nbd", f"--socket={sock}", "--format=qcow2", "--read-only", str(image)])
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with open_export(uri) as export:
            assert export.data_extents() == [Extent(MiB, MiB)]
    finally:
        server.terminate()
        server.wait()


def _serving(path: Path) -> str:
    """The command line of the live qemu-nbd serving ``path``, read from /proc."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-nbd") and str(path).encode() in argv:
            return " ".join(a.decode() for a in argv if a)
    raise AssertionError(f"no qemu-nbd serves {path}")


def _written_through_direct_export(path: Path) -> str:
    """Write a pattern into a new qcow2 through a direct export; how its qemu-nbd ran."""
    create_image(path, "qcow2", 8 << 20)
    with serve_image(ImageInfo(path, "qcow2", 8 << 20), readonly=False, direct=True) as uri, \
            open_export(uri) as export:
        command = _serving(path)
        export.pwrite(b"\x5a" * (1 << 20), 3 << 20)
        export.flush()
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 3M 1M", "-c", "read -P 0 0 3M", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, out.stdout + out.stderr
    return command


def test_restore_targets_write_past_the_page_cache(tmp_path: Path) -> None:
    command = _written_through_direct_export(tmp_path / "direct.qcow2")
    assert "--cache=none" in command, command


def test_a_refused_direct_mode_falls_back_to_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A kernel without io_uring or AIO (or a filesystem without O_DIRECT) still gets its restore:
    here qemu-nbd itself refuses the mode (one it does not know)."""
    from vmkeep.transport import qemu_nbd

    monkeypatch.setattr(qemu_nbd, "DIRECT_MODES", (("--cache=none", "--aio=no-such-mode"),))
    with caplog.at_level(logging.WARNING, logger="vmkeep.transport.qemu_nbd"):
        command = _written_through_direct_export(tmp_path / "fallback.qcow2")
    refused = [r.getMessage() for r in caplog.records if "no-such-mode" in r.getMessage()]
    assert len(refused) == 1 and "--cache=writeback" in command and "no-such-mode" not in command, (refused, command)


def test_in_memory_targets_use_the_page_cache() -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        command = _written_through_direct_export(Path(shm) / "shm.qcow2")
    assert "--cache=writeback" in command, command
