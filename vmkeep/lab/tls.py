"""A lab certificate authority for TLS between proxy, libvirtd and QEMU's backup NBD server.

One CA signs a server certificate for this host (its name, localhost, 127.0.0.1 and the lab's
proxy network gateway) and a client certificate for vmkeep. They are installed where each
component looks by default:

- libvirtd's TLS listener (``qemu+tls://``): /etc/pki/CA/cacert.pem, /etc/pki/libvirt/…;
- QEMU's NBD server for pull-mode backups with ``tls='yes'``: ``QEMU_BACKUP_DIR`` named in
  qemu.conf as ``backup_tls_x509_cert_dir``, client certificates required;
- the proxy's NBD client: ``PROXY_DIR`` (ca-cert.pem, client-cert.pem, client-key.pem), the
  layout libnbd's ``tls-certificates`` expects.

Files already present are left alone, so a host with its own PKI keeps it.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

LAB_PKI = Path("/etc/pki/vmkeep-lab")
QEMU_BACKUP_DIR = LAB_PKI / "qemu"
PROXY_DIR = Path("/etc/pki/vmkeep")
PROXY_NETWORK_GATEWAY = "10.77.0.1"  # the host's end of the lab proxy network (vmkeep.lab.netns)
VALID_DAYS = 3650


@dataclass
class Issued:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmkeep lab"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(cn: str, issuer: Issued | None, *, server: bool = False, client: bool = False) -> Issued:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn))
               .issuer_name(issuer.cert.subject if issuer else _name(cn))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=True, data_encipherment=False,
            key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True)
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + \
            ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server:
        host = socket.gethostname()
        names: list[x509.GeneralName] = [x509.DNSName(host), x509.DNSName("localhost")]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", PROXY_NETWORK_GATEWAY)]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    signer = issuer.key if issuer else key
    return Issued(key, builder.sign(signer, hashes.SHA256()))


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600 if private else 0o644)


def _load(cert: Path, key: Path) -> Issued:
    return Issued(serialization.load_pem_private_key(key.read_bytes(), None),  # type: ignore[arg-type]
                  x509.load_pem_x509_certificate(cert.read_bytes()))


def ensure_lab_pki() -> None:
    """Create the lab CA and certificates once, and install each where its user looks."""
    ca_cert, ca_key = LAB_PKI / "ca-cert.pem", LAB_PKI / "ca-key.pem"
    if ca_cert.exists() and ca_key.exists():
        ca = _load(ca_cert, ca_key)
    else:
        ca = _issue("vmkeep lab CA", None)
        _write(ca_key, ca.key_pem(), private=True)
        _write(ca_cert, ca.cert_pem())
    server = client = None
    targets = {
        "libvirt CA": (Path("/etc/pki/CA/cacert.pem"), None),
        "libvirt server": (Path("/etc/pki/libvirt/servercert.pem"), Path("/etc/pki/libvirt/private/serverkey.pem")),
        "libvirt client": (Path("/etc/pki/libvirt/clientcert.pem"), Path("/etc/pki/libvirt/private/clientkey.pem")),
        "qemu CA": (QEMU_BACKUP_DIR / "ca-cert.pem", None),
        "qemu server": (QEMU_BACKUP_DIR / "server-cert.pem", QEMU_BACKUP_DIR / "server-key.pem"),
        "proxy CA": (PROXY_DIR / "ca-cert.pem", None),
        "proxy client": (PROXY_DIR / "client-cert.pem", PROXY_DIR / "client-key.pem"),
    }
    for role, (cert_path, key_path) in targets.items():
        if cert_path.exists():
            continue
        if key_path is None:
            _write(cert_path, ca.cert_pem())
            continue
        if role.endswith("server"):
            server = server or _issue(socket.gethostname(), ca, server=True)
            issued = server
        else:
            client = client or _issue("vmkeep proxy", ca, client=True)
            issued = client
        _write(key_path, issued.key_pem(), private=True)
        _write(cert_path, issued.cert_pem())
    write_dh_params(QEMU_BACKUP_DIR)


def write_dh_params(directory: Path) -> None:
    """A fixed Diffie-Hellman group (RFC 7919's ffdhe2048) as ``dh-params.pem`` in a QEMU TLS
    credentials directory: without that file QEMU computes new parameters at every start of its
    TLS server, about 0.2 s here, on each backup's NBD export. Kept when present."""
    target = directory / "dh-params.pem"
    if target.exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["openssl", "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt", "group:ffdhe2048",
                           "-out", str(target)], capture_output=True, text=True)
    if proc.returncode != 0:  # QEMU still works, computing its own parameters each time
        target.unlink(missing_ok=True)
        log.warning("could not write %s (%s): QEMU's TLS servers compute their own at each start", target,
                    proc.stderr.strip()[-300:])


def issue_server_cert(cert_path: Path, key_path: Path, cn: str, ips: tuple[str, ...],
                      names: tuple[str, ...] = ()) -> None:
    """A server certificate signed by the lab CA naming exactly ``ips`` and ``names``, for
    simulators listening on addresses the host certificate does not name (the XAPI sim's member at
    127.0.0.2). Rewritten on every call: it lives as long as the simulator's state directory."""
    ensure_lab_pki()
    ca = _load(LAB_PKI / "ca-cert.pem", LAB_PKI / "ca-key.pem")
    issued = _issue(cn, ca, server=True)  # the usual extensions; its SAN is replaced below
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    san += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    builder = (x509.CertificateBuilder().subject_name(issued.cert.subject).issuer_name(issued.cert.issuer)
               .public_key(issued.key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(issued.cert.not_valid_before_utc).not_valid_after(issued.cert.not_valid_after_utc))
    for ext in issued.cert.extensions:
        if not isinstance(ext.value, x509.SubjectAlternativeName):
            builder = builder.add_extension(ext.value, critical=ext.critical)
    builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    _write(key_path, Issued(issued.key, cert).key_pem(), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
