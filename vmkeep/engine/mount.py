"""A restore point's disk served as a read-only NBD export, straight from the repository.

nbdkit runs the Python plugin ``vmkeep/transport/nbdkit_point.py`` (Debian's
nbdkit-plugin-python) with this interpreter's site directories, so the plugin imports vmkeep
and its native dependencies. ``serve`` lives as long as its ``with`` block; ``start_daemon``
leaves the export running detached (instant recovery) until ``stop_daemon``.
"""

from __future__ import annotations

import logging
import os
import signal
import site
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vmkeep.errors import ImageError
from vmkeep.memory import server_environment
from vmkeep.transport.qemu_nbd import serve_on_socket, socket_listening

log = logging.getLogger(__name__)

PLUGIN = Path(__file__).resolve().parent.parent / "transport" / "nbdkit_point.py"
PROJECT = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class PointSpec:
    """Which disk of which point, and how to open its repository."""

    repo: str
    name: str
    point: str
    disk: str
    s3_endpoint: str | None = None
    key_file: str | None = None
    passphrase_file: str | None = None
    plain: bool = False  # known to be unencrypted: offer no credentials, not even the environment's

    def plugin_args(self) -> list[str]:
        sites = [str(PROJECT), *site.getsitepackages()]
        args = ["python", str(PLUGIN), *(f"site={s}" for s in sites), f"repo={self.repo}", f"name={self.name}",
                f"point={self.point}", f"disk={self.disk}"]
        for key, value in (("s3-endpoint", self.s3_endpoint), ("key-file", self.key_file),
                           ("passphrase-file", self.passphrase_file)):
            if value:
                args.append(f"{key}={value}")
        return [*args, "plain=1"] if self.plain else args


def _command(spec: PointSpec, *, unix: Path | None = None, port: int | None = None,
             foreground: bool = True) -> list[str]:
    where = [f"--unix={unix}"] if unix else ["--port", str(port), "--ipaddr", "127.0.0.1"]
    return ["nbdkit", *(["--foreground"] if foreground else []), "--readonly", *where, *spec.plugin_args()]


@contextmanager
def serve(spec: PointSpec) -> Iterator[str]:
    """The export on a private unix socket for the duration; yields its NBD URI."""
    with serve_on_socket(lambda sock: _command(spec, unix=sock),
                         f"nbdkit serving {spec.name}@{spec.point} disk {spec.disk}") as uri:
        yield uri


def run_foreground(spec: PointSpec, *, unix: Path | None, port: int | None) -> subprocess.Popen[bytes]:
    """nbdkit in the foreground on a socket or loopback port the user chose (``vmkeep mount``)."""
    proc = subprocess.Popen(_command(spec, unix=unix, port=port), stdin=subprocess.DEVNULL, env=server_environment())
    log.info("nbdkit (pid %d) serving %s@%s disk %s on %s", proc.pid, spec.name, spec.point, spec.disk,
             unix or f"127.0.0.1:{port}", extra={"vm": spec.name})
    return proc


def start_daemon(spec: PointSpec, sock: Path, pidfile: Path, timeout: float = 60) -> int:
    """A detached export on ``sock`` that outlives this process (nbdkit forks into the background
    once the plugin has opened the point and the socket listens); its pid."""
    sock.unlink(missing_ok=True)
    pidfile.unlink(missing_ok=True)
    messages = sock.with_suffix(".log")
    with messages.open("w") as err:
        try:
            proc = subprocess.run([*_command(spec, unix=sock, foreground=False), f"--pidfile={pidfile}"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, timeout=timeout,
                                  env=server_environment())
        except subprocess.TimeoutExpired as exc:
            raise ImageError(f"nbdkit did not start serving {spec.name}@{spec.point} within {timeout:.0f} s") \
                from exc
    if proc.returncode != 0 or not pidfile.exists():
        raise ImageError(f"nbdkit could not serve {spec.name}@{spec.point} disk {spec.disk}: "
                         f"{messages.read_text().strip()[-500:]}")
    deadline = time.monotonic() + timeout
    while not socket_listening(sock):
        if time.monotonic() > deadline:
            raise ImageError(f"nbdkit did not start serving {spec.name}@{spec.point} within {timeout:.0f} s")
        time.sleep(0.02)
    pid = int(pidfile.read_text().strip())
    log.info("nbdkit (pid %d) serving %s@%s disk %s on %s", pid, spec.name, spec.point, spec.disk, sock,
             extra={"vm": spec.name})
    return pid


def stop_daemon(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        log.debug("nbdkit (pid %d) had already exited", pid)
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.info("nbdkit (pid %d) stopped", pid)
            return
        time.sleep(0.05)
    log.warning("nbdkit (pid %d) did not stop within 10 s of SIGTERM: killed", pid)
    os.kill(pid, signal.SIGKILL)
