"""Which hypervisor addresses vmkeep accepts, wherever one comes in (API, CLI, proxy jobs).

A libvirt URI can name a program to run (``qemu+ext://…?command=…``), a socket, key files, or
turn host-key and certificate checks off; vSphere addresses can turn certificate checks off
(``insecure``) or TLS itself (``http``); XenServer/XCP-ng addresses (``xapi://USER@HOST[:PORT]``)
take no options at all. Whoever may register a hypervisor would otherwise make
the master or a proxy run a program as root. Only the transports an administrator means are
accepted; options that name files or weaken checks need an administrator's explicit allowance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import SplitResult, parse_qsl, urlsplit

from vmkeep.hypervisors.base import HypervisorError

log = logging.getLogger(__name__)

LIBVIRT_SCHEMES = ("qemu", "qemu+tls", "qemu+ssh", "qemu+unix", "qemu+libssh", "qemu+libssh2")
PLAIN_TCP_SCHEMES = ("qemu+tcp",)
LIBVIRT_PATHS = ("/system", "/session")
# options that only choose among safe behaviours
SAFE_OPTIONS: dict[str, set[str]] = {"qemu": {"sshauth", "mode"}, "vsphere": set(), "xapi": set()}
# options that name files on the connecting machine or turn a check off: an administrator's call
UNSAFE_OPTIONS: dict[str, set[str]] = {
    "qemu": {"keyfile", "pkipath", "known_hosts", "known_hosts_verify", "no_verify", "no_tty"},
    "vsphere": {"insecure", "http"},
    "xapi": set()}  # certificate checks go off only with the command line's --insecure


class AddressRefused(HypervisorError):
    """A hypervisor address vmkeep will not connect to; the message says why and what to do."""

    exit_code = 2


@dataclass(frozen=True)
class Allowance:
    """What an administrator allowed for one address beyond the safe default."""

    plain_tcp: bool = False  # qemu+tcp:// (no encryption, SASL at best)
    unsafe_options: bool = False  # key files, known-hosts files, checks turned off, plain HTTP


def check_address(uri: str, allowance: Allowance = Allowance()) -> None:
    """Raise :class:`AddressRefused` unless ``uri`` is an address vmkeep may connect to."""
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise AddressRefused(f"{uri!r} is not a URI: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme == "vsphere":
        family = "vsphere"
    elif scheme == "xapi":
        family = "xapi"
        _check_xapi(uri, parts)
    elif scheme in LIBVIRT_SCHEMES or scheme in PLAIN_TCP_SCHEMES:
        family = "qemu"
        _check_libvirt(uri, scheme, parts.path, allowance)
    else:
        raise AddressRefused(
            f"{uri!r}: vmkeep connects only to {', '.join(s + '://' for s in LIBVIRT_SCHEMES)} "
            "(qemu+tcp:// where an administrator allows plain TCP), vsphere:// and xapi:// addresses")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        raise AddressRefused(f"{uri!r}: an address may not hold control characters")
    if ";" in parts.query:  # libvirt also splits options on ';', which parse_qsl would not see
        raise AddressRefused(f"{uri!r}: separate options with '&' only")
    try:
        options = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise AddressRefused(f"{uri!r}: its query string is malformed ({exc})") from exc
    for raw_key, _value in options:
        key = raw_key.lower()  # libvirt compares option names without regard to case
        if key in SAFE_OPTIONS[family]:
            continue
        if key in UNSAFE_OPTIONS[family]:
            if not allowance.unsafe_options:
                raise AddressRefused(
                    f"{uri!r}: the option {key!r} names a file on this machine or turns a security check off; "
                    "only an administrator may allow it (API: allow_unsafe_options, CLI: --insecure)")
            continue
        if family == "xapi":
            raise AddressRefused(f"{uri!r}: the option {key!r} is not accepted: an XAPI address takes no options "
                                 "(the pool's CA goes in VMKEEP_XAPI_CA_FILE; a command line's --insecure skips the "
                                 "certificate check)")
        raise AddressRefused(f"{uri!r}: the option {key!r} is not accepted (it can name a program or socket to "
                             "use, or is unknown); connect without it")
    log.debug("address %s accepted (%s)", uri, allowance)


def _check_xapi(uri: str, parts: SplitResult) -> None:
    """``xapi://USER@HOST[:PORT]``: the password comes from the environment or the server's sealed
    copy, never the address (it would be stored, logged and shown in clear)."""
    if parts.password is not None:
        raise AddressRefused(f"{parts.scheme}://{parts.hostname}: an address may not hold a password; give it in "
                             "VMKEEP_HOST_PASSWORD (or the hypervisor's registered password)")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise AddressRefused(f"{uri!r}: its port is not a number ({exc})") from exc
    if not parts.username or not parts.hostname:
        raise AddressRefused(f"{uri!r}: write xapi://USER@HOST[:PORT] (the pool master, e.g. xapi://root@xen1)")
    if parts.path not in ("", "/") or parts.fragment:
        raise AddressRefused(f"{uri!r}: an XAPI address has no path; write xapi://USER@HOST[:PORT]")


def _check_libvirt(uri: str, scheme: str, path: str, allowance: Allowance) -> None:
    if scheme in PLAIN_TCP_SCHEMES and not allowance.plain_tcp:
        raise AddressRefused(f"{uri!r}: qemu+tcp:// sends libvirt's traffic unencrypted; use qemu+tls:// or "
                             "qemu+ssh://, or have an administrator allow plain TCP for this hypervisor "
                             "(API: allow_plain_tcp, CLI: --insecure)")
    if path not in LIBVIRT_PATHS:
        raise AddressRefused(f"{uri!r}: a QEMU libvirt address ends in /system or /session")
