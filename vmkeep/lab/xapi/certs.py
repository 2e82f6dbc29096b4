"""Each simulated host's NBD server certificate: self-signed, as XenServer's own.

XAPI's ``VDI.get_nbd_info`` hands the client the server's certificate itself, and the client
trusts exactly that certificate. So it is its own CA (basicConstraints CA:TRUE) as well as a
server certificate (CN = the host's name, SAN IPs 127.0.0.1 and 127.0.0.2 where the simulator
listens). Its directory has the layout qemu-nbd's ``tls-creds-x509`` reads.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmkeep.lab.tls import write_dh_params

log = logging.getLogger(__name__)

ADDRESSES = ("127.0.0.1", "127.0.0.2")
VALID_DAYS = 3650
_lock = threading.Lock()


def host_cert_dir(state: Path, host: str) -> Path:
    """The directory with ``host``'s NBD certificate (ca-cert.pem = server-cert.pem, and
    server-key.pem), made on first use and kept in the simulator's state."""
    directory = state / "nbd-certs" / host
    files = [directory / n for n in ("ca-cert.pem", "server-cert.pem", "server-key.pem")]
    with _lock:
        if not all(f.is_file() for f in files):
            _make(directory, host)
        write_dh_params(directory)  # else qemu-nbd computes DH parameters at each start (~0.2 s)
    return directory


def host_cert_pem(state: Path, host: str) -> str:
    return (host_cert_dir(state, host) / "server-cert.pem").read_text()


def _make(directory: Path, host: str) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmkeep lab XAPI"),
                      x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    san = [x509.DNSName(host)] + [x509.IPAddress(ipaddress.ip_address(a)) for a in ADDRESSES]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=False, encipher_only=False,
                decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / "server-key.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    (directory / "server-cert.pem").write_bytes(pem)
    (directory / "ca-cert.pem").write_bytes(pem)
    log.info("made the self-signed NBD certificate of host %s in %s", host, directory)
