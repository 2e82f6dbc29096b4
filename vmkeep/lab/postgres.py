"""The single-machine catalog database: Debian's PostgreSQL cluster, started by hand.

There is no service manager on lab machines, so the cluster is started with ``pg_ctlcluster``.
A ``vmkeep`` role (password generated once) owns a ``vmkeep`` database, and the URL is written
to ``DATABASE_URL_FILE`` (root only) where the catalog looks for it by default. Larger installs
skip this and point ``--database-url`` / ``VMKEEP_DATABASE_URL`` at their own server.

Proxies on the lab's other network (a network namespace, see vmkeep.lab.netns) work the task
queue in this database too, so the cluster listens beyond loopback and lets password logins in
from that network only (the vmkeep role; the proxies' own role that `vmkeep db upgrade` creates,
which is why the vmkeep role may create roles).
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from pathlib import Path

from vmkeep.errors import LabError
from vmkeep.lab.tls import PROXY_NETWORK_GATEWAY

DATABASE_URL_FILE = Path("/etc/vmkeep/database.url")
ROLE = DATABASE = "vmkeep"
HOST, PORT = "127.0.0.1", 5432
LAB_NETWORK = f"{PROXY_NETWORK_GATEWAY.rsplit('.', 1)[0]}.0/24"


def _cluster() -> tuple[str, str]:
    """(version, name) of the first Debian cluster."""
    proc = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True)
    lines = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise LabError("no PostgreSQL cluster: apt-get install postgresql (it creates one), then retry")
    return lines[0][0], lines[0][1]


def psql(sql: str, database: str = "postgres") -> str:
    """Run SQL as the postgres superuser over the local socket (peer authentication)."""
    proc = subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-t", "-A", "-v",
                           "ON_ERROR_STOP=1", "-d", database, "-c", sql], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"psql failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _ready(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["pg_isready", "-q", "-h", HOST, "-p", str(PORT)]).returncode != 0:
        if time.monotonic() > deadline:
            raise LabError(f"PostgreSQL did not accept connections on {HOST}:{PORT} within {timeout:.0f} s; see "
                           "/var/log/postgresql/")
        time.sleep(0.2)


def _ctl(version: str, name: str, action: str) -> None:
    proc = subprocess.run(["pg_ctlcluster", version, name, action], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"cannot {action} PostgreSQL {version}/{name}: {proc.stderr.strip()}")


def _open_to_lab_network(version: str, name: str, timeout: float) -> None:
    """Listen on every address and admit password logins (the vmkeep role, the proxies' roles) from the
    lab network."""
    hba = Path(psql("SHOW hba_file"))
    rule = f"host all all {LAB_NETWORK} scram-sha-256"  # the master's role and the proxies' roles
    if rule not in hba.read_text().splitlines():
        with hba.open("a") as f:
            f.write(f"# vmkeep lab: proxies on the lab network\n{rule}\n")
        psql("SELECT pg_reload_conf()")
    if psql("SHOW listen_addresses") != "*":
        psql("ALTER SYSTEM SET listen_addresses = '*'")
        _ctl(version, name, "restart")
        _ready(timeout)


def lab_network_url(url: str) -> str:
    """``url`` as a proxy on the lab network reaches the database (the host's lab address)."""
    return url.replace(f"@{HOST}:", f"@{PROXY_NETWORK_GATEWAY}:", 1)


def ensure_postgres(timeout: float = 60.0) -> str:
    """Start the cluster unless it runs, create the vmkeep role and database once; the URL."""
    if shutil.which("pg_lsclusters") is None:
        raise LabError("PostgreSQL is not installed: apt-get install postgresql")
    version, name = _cluster()
    status = subprocess.run(["pg_ctlcluster", version, name, "status"], capture_output=True)
    if status.returncode != 0:
        _ctl(version, name, "start")
    _ready(timeout)
    _open_to_lab_network(version, name, timeout)
    if DATABASE_URL_FILE.exists() and psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'") == "1":
        psql(f"ALTER ROLE {ROLE} CREATEROLE")  # db upgrade makes the proxies' role (catalog.proxy_role)
        return DATABASE_URL_FILE.read_text().strip()
    password = secrets.token_urlsafe(18)
    if psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'") == "1":
        psql(f"ALTER ROLE {ROLE} WITH LOGIN CREATEDB CREATEROLE PASSWORD '{password}'")
    else:
        psql(f"CREATE ROLE {ROLE} WITH LOGIN CREATEDB CREATEROLE PASSWORD '{password}'")
    if psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'") != "1":
        psql(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
    url = f"postgresql+psycopg://{ROLE}:{password}@{HOST}:{PORT}/{DATABASE}"
    DATABASE_URL_FILE.parent.mkdir(parents=True, exist_ok=True)
    DATABASE_URL_FILE.touch(mode=0o600)
    DATABASE_URL_FILE.write_text(url + "\n")
    return url


if __name__ == "__main__":
    ensure_postgres()
