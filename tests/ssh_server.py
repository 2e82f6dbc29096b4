"""A private sshd for ``qemu+ssh://`` tests: its own host key, config and authorized key, listening
on one address and port, as root (libvirt's ssh transport runs virt-ssh-helper on the host)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

SSHD = Path("/usr/sbin/sshd")


@dataclass
class SshServer:
    address: str
    port: int
    client_key: Path  # private key that the server accepts for root

    def uri(self) -> str:
        """The libvirt URI that reaches the host's system daemon through this server."""
        return (f"qemu+ssh://root@{self.address}:{self.port}/system?keyfile={self.client_key}"
                "&no_verify=1&no_tty=1")


@contextmanager
def ssh_server(address: str, workdir: Path) -> Iterator[SshServer]:
    if not SSHD.exists():
        raise AssertionError("sshd is missing: run scripts/setup (it installs openssh-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)
    host_key, client_key = workdir / "host_key", workdir / "client_key"
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    authorized = workdir / "authorized_keys"
    shutil.copyfile(client_key.with_suffix(".pub"), authorized)
    port = free_port(address)
    config = workdir / "sshd_config"
    config.write_text(f"ListenAddress {address}:{port}\nHostKey {host_key}\nAuthorizedKeysFile {authorized}\n"
                      "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                      "UsePAM no\nStrictModes no\nPidFile none\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation directory
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=(workdir / "sshd.log").open("w"))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection((address, port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"sshd did not start: {(workdir / 'sshd.log').read_text()}") from None
                time.sleep(0.1)
        yield SshServer(address, port, client_key)
    finally:
        proc.terminate()
        proc.wait(10)
