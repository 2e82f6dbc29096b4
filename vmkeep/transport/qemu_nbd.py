"""Serving a disk image as an NBD export with qemu-nbd, and probing images with qemu-img."""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vmkeep.errors import ImageError
from vmkeep.fsutil import in_memory
from vmkeep.memory import server_environment
from vmkeep.transport.nbd_client import NbdExport, unix_uri

log = logging.getLogger(__name__)

SECTOR = 512
# qemu-nbd --shared=0: no limit on clients. A client beyond a limit is not refused but left
# waiting, so a reader opening more connections than the limit would hang.
UNLIMITED = 0
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here, so the forked child only makes the call


@dataclass
class ImageInfo:
    path: Path
    format: str
    virtual_size: int
    bitmaps: list[str] = field(default_factory=list)
    probed: bool = True  # False: size and format known from elsewhere, the bitmaps not looked at


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
        log.debug("%s: exit %d: %s", " ".join(cmd), proc.returncode, proc.stderr.strip())
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
    log.debug("qemu-img info %s: %s, %d bytes, bitmaps %s", path, detected, size, bitmaps or "none")
    return ImageInfo(path, detected, size, bitmaps)


@contextmanager
def serve_image(
    image: ImageInfo,
    *,
    readonly: bool = True,
    bitmap: str | None = None,
    connections: int = 8,
    direct: bool = False,
) -> Iterator[str]:
    """Run qemu-nbd on a private unix socket for the duration; yields the NBD URI. At most
    ``connections`` clients at once (UNLIMITED: any number); the next one waits.

    ``direct``: writes bypass the page cache (O_DIRECT, with io_uring or Linux AIO), as for a
    restore target: qcow2 allocation then overlaps with the disk instead of piling up dirty
    pages for the final flush (about twice as fast measured; see docs/performance.md). Where
    the filesystem or the kernel refuses that, the export falls back to the page cache."""
    if bitmap is not None and image.probed and bitmap not in image.bitmaps:
        known = ", ".join(image.bitmaps) or "none"
        raise ImageError(f"{image.path} has no persistent bitmap {bitmap!r} (it has: {known})")
    # qemu-nbd listens before it sets up the export, and quits if the bitmap is missing (or the
    # image does not open with the cache mode asked for): an image not probed, or opened
    # directly, is confirmed through a handshake instead
    if bitmap is not None and not image.probed:
        ready: Callable[[str], None] | None = _offers(f"qemu:dirty-bitmap:{bitmap}")
    else:
        ready = _answers if direct else None
    what = f"qemu-nbd serving {image.path}"
    with ExitStack() as stack:
        for cache in _cache_modes(image.path, direct and not readonly):
            try:
                command = functools.partial(_qemu_nbd_command, image=image, readonly=readonly, bitmap=bitmap,
                                            connections=connections, cache=cache)
                uri = stack.enter_context(serve_on_socket(command, what, ready))
                log.debug("%s with %s", what, " ".join(cache))
                break
            except ImageError as exc:
                if cache == PAGE_CACHE:
                    raise
                log.warning("qemu-nbd cannot write %s with %s (%s); trying the next mode", image.path,
                            " ".join(cache), exc)
        yield uri


PAGE_CACHE = ("--cache=writeback",)
DIRECT_MODES = (("--cache=none", "--aio=io_uring"), ("--cache=none", "--aio=native"))


def _cache_modes(path: Path, direct: bool) -> list[tuple[str, ...]]:
    """qemu-nbd's cache options to try in turn: O_DIRECT ones first when asked for and the file
    is not in memory (tmpfs has no O_DIRECT), the page cache last."""
    if direct and not in_memory(str(path.parent)):
        return [*DIRECT_MODES, PAGE_CACHE]
    return [PAGE_CACHE]


def _answers(uri: str) -> None:
    """A readiness check: the export at the URI answers a handshake."""
    NbdExport(uri).close()


def _offers(context: str) -> Callable[[str], None]:
    """A readiness check: the export at the URI answers a handshake and offers ``context``."""
    def check(uri: str) -> None:
        NbdExport(uri, context).close()
    return check


def _qemu_nbd_command(sock: Path, image: ImageInfo, readonly: bool, bitmap: str | None,
                      connections: int, cache: tuple[str, ...] = PAGE_CACHE) -> list[str]:
    cmd = [
        "qemu-nbd", f"--socket={sock}", f"--format={image.format}",
        "--persistent", f"--shared={connections}", *cache,
    ]
    if readonly:
        cmd.append("--read-only")
    if bitmap:
        cmd.append(f"--bitmap={bitmap}")
    cmd.append(str(image.path))
    return cmd


@contextmanager
def serve_on_socket(command: Callable[[Path], list[str]], what: str,
                    ready: Callable[[str], None] | None = None) -> Iterator[str]:
    """Run an NBD server (``command`` given its socket path) on a private unix socket for the
    duration, dying with this process even on kill -9; yields the NBD URI. Its messages go to a
    file (a pipe nobody reads would stall a server that reports many read errors). ``ready``, if
    given, checks the export once the socket listens; a server that quits meanwhile is reported
    with its own message."""
    _sweep_dead_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
    sock, server_log = workdir / "nbd.sock", workdir / "server.log"
    argv = command(sock)
    try:
        with server_log.open("w") as err:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                    env=server_environment(), preexec_fn=dying_with(os.getpid()))
    except OSError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        raise ImageError(f"cannot start {what}: {exc}") from exc
    log.debug("started %s (pid %d): %s", what, proc.pid, " ".join(argv))
    try:
        _wait_for_socket(proc, sock, server_log, what)
        uri = unix_uri(sock)
        if ready is not None:
            _check_ready(proc, server_log, what, lambda: ready(uri))
        yield uri
    finally:
        if proc.poll() is None:
            proc.terminate()
            if not exited(proc, 10):
                log.warning("%s (pid %d) did not stop within 10 s of SIGTERM: killed", what, proc.pid)
                proc.kill()
                proc.wait()
            log.debug("stopped %s (pid %d)", what, proc.pid)
        else:
            log.debug("%s (pid %d) had exited with %s: %s", what, proc.pid, proc.returncode,
                      _tail(server_log, 300) or "no message")
        shutil.rmtree(workdir, ignore_errors=True)


def _tail(path: Path, limit: int) -> str:
    """The end of a server's message file; empty when it is gone."""
    try:
        return path.read_text(errors="replace").strip()[-limit:]
    except OSError:
        return ""


def exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to ``timeout`` for ``proc`` to end, woken the moment it does: ``Popen.wait`` with
    a timeout polls with growing sleeps, which left 5–8 ms on the table per server stopped."""
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:  # reaped already
        return proc.poll() is not None
    try:
        ended = bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)
    if ended:
        proc.wait()  # a zombie by now: reaped at once
    return ended


WORKDIR_PREFIX = "vmkeep-nbd-"


def _sweep_dead_workdirs() -> None:
    """Remove socket directories left by vmkeep processes that were killed (-9) mid-export."""
    for d in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        try:
            pid = int(d.name[len(WORKDIR_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue  # not named by vmkeep: not ours to remove
        if not Path(f"/proc/{pid}").exists():
            log.debug("removing %s, left by vmkeep process %d which is gone", d, pid)
            shutil.rmtree(d, ignore_errors=True)


def dying_with(parent: int) -> Callable[[], None]:
    """For ``preexec_fn``: the child gets SIGTERM when vmkeep (``parent``, its pid) dies, even by
    kill -9, so no export is left behind.

    The kernel sends it when the *thread* that started the server ends, not only the process: a
    server started from a short-lived thread would stop with it, so that thread must stay up as
    long as the server is needed. A parent killed between the fork and the request is caught by
    looking at the parent once the request is in place: the child then exits at once.
    """
    def die_with_parent() -> None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)
    return die_with_parent


def socket_listening(sock: Path) -> bool:
    """Whether a server accepts connections on the unix socket ``sock``."""
    if not sock.exists():
        return False
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(sock))
            return True
        except OSError:
            return False


def _check_ready(proc: subprocess.Popen[bytes], server_log: Path, what: str, check: Callable[[], None]) -> None:
    try:
        check()
    except ImageError as exc:
        if not exited(proc, 2):
            raise  # the server runs on: what it serves lacks what was asked
        err = server_log.read_text(errors="replace").strip()[-1000:]
        raise ImageError(f"{what} failed: {err}") from exc


def _wait_for_socket(proc: subprocess.Popen[bytes], sock: Path, server_log: Path, what: str) -> None:
    deadline = time.monotonic() + 30
    while not socket_listening(sock):
        if proc.poll() is not None:
            err = server_log.read_text(errors="replace").strip()[-1000:]
            raise ImageError(f"{what} failed: {err}")
        if time.monotonic() > deadline:
            raise ImageError(f"{what} did not start within 30 s")
        time.sleep(0.001)


def create_image(path: Path, fmt: str, size: int) -> None:
    proc = subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)],
                          capture_output=True, text=True)
    log.debug("qemu-img create %s %s %d: exit %d", fmt, path, size, proc.returncode)
    if proc.returncode != 0:
        raise ImageError(f"cannot create {path}: {proc.stderr.strip()}")
