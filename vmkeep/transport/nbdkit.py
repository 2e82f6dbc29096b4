"""NBD exports made by nbdkit plugins: a disk over HTTPS (curl plugin, byte ranges) or through
VMware's VDDK (vddk plugin), served on a private unix socket for the data mover.

Secrets (a session cookie, a password) go to nbdkit in a 0600 file it reads at start-up, never
on its command line where any local user could read them.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from vmkeep.transport.qemu_nbd import serve_on_socket

log = logging.getLogger(__name__)

PLUGIN_DIR = Path("/usr/lib/x86_64-linux-gnu/nbdkit/plugins")
PLUGIN_DIR_ENV = "VMKEEP_NBDKIT_PLUGIN_DIR"  # nbdkit built elsewhere (with its vddk plugin)
VDDK_DIRS = (Path("/usr/lib/vmware-vix-disklib"), Path("/opt/vmware-vix-disklib-distrib"))
VDDK_ENV = "VMKEEP_VDDK_DIR"


def _secret_file(stack: ExitStack, value: str) -> str:
    """``+PATH`` of a private file holding ``value``, removed when ``stack`` closes."""
    fd, path = tempfile.mkstemp(prefix="vmkeep-secret-")
    with os.fdopen(fd, "w") as f:
        f.write(value)
    stack.callback(lambda: Path(path).unlink(missing_ok=True))
    return f"+{path}"


@contextmanager
def serve_url(url: str, *, cookie: str | None = None, ca_file: str | None = None, verify: bool = True,
              what: str = "") -> Iterator[str]:
    """A read-only NBD export of the file at ``url`` (HTTP range reads); yields the NBD URI."""
    with ExitStack() as stack:
        args = [f"url={url}", "followlocation=false", "timeout=600"]
        if cookie:
            args.append(f"cookie={_secret_file(stack, cookie)}")
        if ca_file:
            args.append(f"cainfo={ca_file}")
        if not verify:
            args.append("sslverify=false")
        log.debug("nbdkit curl export of %s (certificate check %s, session cookie %s)", url.split("?")[0],
                  "on" if verify else "off", "in a private file" if cookie else "none")
        command = lambda sock: ["nbdkit", "--foreground", "--readonly", "--exit-with-parent",  # noqa: E731
                                f"--unix={sock}", "curl", *args]
        yield stack.enter_context(serve_on_socket(command, what or f"nbdkit reading {url.split('?')[0]}"))


@dataclass(frozen=True)
class Vddk:
    """Where VMware's VDDK library lives on this proxy."""

    libdir: Path

    @classmethod
    def find(cls) -> Vddk | str:
        """The VDDK install, or what is missing (for the note that says why it is not used)."""
        from vmkeep.settings import settings

        env = settings(refresh=True)  # a test points these at its own directories
        plugins = env.nbdkit_plugin_dir or PLUGIN_DIR
        if not (plugins / "nbdkit-vddk-plugin.so").exists():
            log.debug("no nbdkit vddk plugin in %s", plugins)
            return "nbdkit's vddk plugin is not installed (Debian has none: build nbdkit with --with-vddk)"
        candidates = [env.vddk_dir] if env.vddk_dir else list(VDDK_DIRS)
        for d in candidates:
            if (d / "lib64" / "libvixDiskLib.so").exists() or any((d / "lib64").glob("libvixDiskLib.so.*")):
                log.debug("VMware VDDK found in %s", d)
                return cls(d)
        log.debug("no VMware VDDK under %s", ", ".join(map(str, candidates)))
        return (f"VMware VDDK is not installed (no lib64/libvixDiskLib.so under {', '.join(map(str, candidates))}; "
                f"unpack it there or set {VDDK_ENV})")

    def arguments(self, *, server: str, user: str, password_file: str, thumbprint: str, vm_moref: str,
                  snapshot_moref: str, file: str, transports: list[str]) -> list[str]:
        """The vddk plugin's parameters for one disk of a snapshot."""
        return [f"libdir={self.libdir}", f"server={server}", f"user={user}", f"password={password_file}",
                f"thumbprint={thumbprint}", f"vm=moref={vm_moref}", f"snapshot={snapshot_moref}",
                f"transports={':'.join(transports)}", f"file={file}"]


@contextmanager
def serve_vddk(vddk: Vddk, *, password: str, what: str, **params: str | list[str]) -> Iterator[str]:
    """A read-only NBD export of one snapshot disk through VDDK; yields the NBD URI."""
    with ExitStack() as stack:
        args = vddk.arguments(password_file=_secret_file(stack, password), **params)  # type: ignore[arg-type]
        command = lambda sock: ["nbdkit", "--foreground", "--readonly", "--exit-with-parent",  # noqa: E731
                                f"--unix={sock}", "vddk", *args]
        yield stack.enter_context(serve_on_socket(command, what))
