"""A lab "other machine" for the proxy: a network namespace joined to the host by a veth pair.

A proxy started with ``ip netns exec`` in it has its own network stack (its own loopback, one
address on the lab network), so it reaches libvirtd and QEMU's NBD exports only across that
network, as a proxy on another machine would. The host's end carries the address the lab
certificates name (``PROXY_NETWORK_GATEWAY``).
"""

from __future__ import annotations

import subprocess

from vmkeep.errors import LabError
from vmkeep.lab.tls import PROXY_NETWORK_GATEWAY

NAMESPACE = "vmkeep-proxy"
HOST_LINK, PROXY_LINK = "vmkp-host", "vmkp-proxy"
PROXY_ADDRESS = "10.77.0.2"
PREFIX = 24


def _ip(*args: str, namespace: str | None = None) -> None:
    cmd = ["ip", *(["-n", namespace] if namespace else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")


def exists() -> bool:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return any(line.split()[0] == NAMESPACE for line in out.splitlines() if line.strip())


def create_proxy_network() -> list[str]:
    """Create the namespace and link (replacing leftovers); returns the command prefix to run in it."""
    destroy_proxy_network()
    _ip("netns", "add", NAMESPACE)
    try:
        _ip("link", "add", HOST_LINK, "type", "veth", "peer", "name", PROXY_LINK)
        _ip("link", "set", PROXY_LINK, "netns", NAMESPACE)
        _ip("addr", "add", f"{PROXY_NETWORK_GATEWAY}/{PREFIX}", "dev", HOST_LINK)
        _ip("link", "set", HOST_LINK, "up")
        _ip("addr", "add", f"{PROXY_ADDRESS}/{PREFIX}", "dev", PROXY_LINK, namespace=NAMESPACE)
        _ip("link", "set", PROXY_LINK, "up", namespace=NAMESPACE)
        _ip("link", "set", "lo", "up", namespace=NAMESPACE)
    except LabError:
        destroy_proxy_network()
        raise
    return ["ip", "netns", "exec", NAMESPACE]


def destroy_proxy_network() -> None:
    """Remove the link and namespace; harmless when they are not there."""
    subprocess.run(["ip", "link", "del", HOST_LINK], capture_output=True)
    if exists():
        subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True)
