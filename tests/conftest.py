"""Shared fixtures: real qemu-img / qemu-nbd images, repositories, a real SeaweedFS S3 server."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from vmkeep.hypervisors.libvirt.scratch import SCRATCH_ROOT
from vmkeep.lab.images import Segment, make_image
from vmkeep.lab.postgres import ensure_postgres
from vmkeep.transport.qemu_nbd import WORKDIR_PREFIX

MiB = 1 << 20
VMKEEP = str(Path(sys.executable).with_name("vmkeep"))
S3_USER, S3_SECRET = "vmkeep-test", "vmkeep-test-secret"


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _leftovers() -> set[str]:
    """What a backup or restore makes and must release: scratch directories of VM backups, the
    working directories of the NBD servers vmkeep starts, and those servers."""
    found = {str(p) for p in SCRATCH_ROOT.iterdir()} if SCRATCH_ROOT.is_dir() else set()
    found |= {str(p) for p in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*")}
    pids = subprocess.run(["pgrep", "-x", "qemu-nbd"], capture_output=True, text=True).stdout.split()
    return found | {f"qemu-nbd pid {pid}" for pid in pids}


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Every operation releases what it took on success and failure alike: checked for the whole
    run (a dead run's scratch directory is only swept ten minutes later, so a leak would hide)."""
    before = _leftovers()
    yield
    left = _leftovers() - before
    assert not left, f"left behind by the tests: {sorted(left)}"


class Cli:
    """Runs the real `vmkeep` command."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(self, *args: str, ok: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([VMKEEP, *args], capture_output=True, text=True, env={**self.env, **(env or {})},
                              timeout=600)
        if ok and proc.returncode != 0:
            # --json reports a VM's failure on standard output
            raise AssertionError(f"vmkeep {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
                                 f"{proc.stdout[-2000:]}")
        return proc

    def json(self, *args: str, **kw: Any) -> dict[str, Any]:
        proc = self.run(*args, "--json", **kw)
        return dict(json.loads(proc.stdout))


def fresh_cli() -> Cli:
    """The command with a clean environment: no VMKEEP_* of the caller, the tests' passphrase."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMKEEP_")}
    env["VMKEEP_PASSPHRASE"] = "correct horse battery staple"
    return Cli(env)


@pytest.fixture
def cli() -> Cli:
    return fresh_cli()


@pytest.fixture
def make_disk(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(size: int, segments: list[Segment], fmt: str = "qcow2", name: str | None = None) -> Path:
        path = tmp_path / (name or f"disk{next(counter)}.{fmt}")
        return make_image(path, size, segments, fmt)

    return make


def qemu_img_compare(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-U", str(a), str(b)]).returncode == 0


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real SeaweedFS server (master, volume, filer, S3) on loopback; yields the S3 endpoint."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.fail("SeaweedFS `weed` is not installed: run scripts/setup")
    data = tmp_path_factory.mktemp("seaweed")
    config = data / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "vmkeep", "credentials": [
        {"accessKey": S3_USER, "secretKey": S3_SECRET}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        # tests/test_copy_s3.py's pull mode: the primary site may only use its own bucket, the
        # offsite only its own, and the offsite's copy reads the primary's bucket as `reader`
        {"name": "primary", "credentials": [{"accessKey": "vmkeep-primary", "secretKey": "primary-secret"}],
         "actions": ["Read:vmkeep-copy-primary", "Write:vmkeep-copy-primary", "List:vmkeep-copy-primary"]},
        {"name": "reader", "credentials": [{"accessKey": "vmkeep-reader", "secretKey": "reader-secret"}],
         "actions": ["Read:vmkeep-copy-primary", "List:vmkeep-copy-primary"]},
        {"name": "offsite", "credentials": [{"accessKey": "vmkeep-offsite", "secretKey": "offsite-secret"}],
         "actions": ["Read:vmkeep-copy-offsite", "Write:vmkeep-copy-offsite", "List:vmkeep-copy-offsite",
                     "PutObjectRetention:vmkeep-copy-offsite"]}]}))
    s3_port = free_port()
    # Every listener gets an explicit free port (SeaweedFS would otherwise take fixed defaults).
    ports = {opt: free_port() for opt in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                           "filer.port", "filer.port.grpc", "s3.port.grpc")}
    cmd = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", "-filer", "-s3",
           f"-s3.port={s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
           "-volume.max=100", "-master.volumeSizeLimitMB=256", *(f"-{opt}={port}" for opt, port in ports.items())]
    log = open(data / "weed.log", "wb")  # noqa: SIM115 - open for the server's whole life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{s3_port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_USER, aws_secret_access_key=S3_SECRET,
                          region_name="us-east-1", config=Config(retries={"max_attempts": 1}, connect_timeout=2))
    deadline = time.monotonic() + 120
    while True:  # ready once a bucket can be made and an object written (volumes registered)
        try:
            client.create_bucket(Bucket="vmkeep-probe")
        except ClientError:
            pass
        except (BotoCoreError, OSError):
            pass
        try:
            client.put_object(Bucket="vmkeep-probe", Key="probe", Body=b"x")
            break
        except (ClientError, BotoCoreError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"SeaweedFS did not start: see {data / 'weed.log'}")
            time.sleep(0.5)
    yield endpoint
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def s3_env(seaweed: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"AWS_ACCESS_KEY_ID": S3_USER, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": seaweed}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture(scope="session")
def server_url() -> str:
    """The set-up's local PostgreSQL (started if needed), as the vmkeep role."""
    return ensure_postgres()


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A fresh, empty catalog database; dropped afterwards (with the proxies' role its upgrade made)."""
    name = f"vmkeep_t_{secrets.token_hex(4)}"
    admin = create_engine(server_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield server_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        for attempt in range(20):  # a backend of the proxies' role may still be exiting: FORCE may not end it
            try:
                with admin.connect() as conn:
                    conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    conn.execute(text(f"DROP ROLE IF EXISTS {name}_proxy"))  # made by db upgrade (catalog.proxy_role)
                break
            except DBAPIError:
                if attempt == 19:
                    raise
                time.sleep(0.5)
        admin.dispose()


@pytest.fixture
def database(server_url: str) -> Iterator[str]:
    """A fresh, empty database for one test; dropped afterwards."""
    with fresh_database(server_url) as url:
        yield url


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """Debian's chromium driven by Playwright, launched once for the whole run (each test opens
    its own context: cookies and storage of its own). `playwright install` cannot download here."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def console_master(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A `vmkeep server` on a fresh catalog for one console test module, with an auditor besides
    the admin: each module's tests only add to its catalog."""
    from tests.console_support import AUDITOR
    from tests.test_server import ADMIN_PASSWORD, launch

    with fresh_database(server_url) as database, launch(fresh_cli(), database,
                                                       tmp_path_factory.mktemp("console")) as running:
        with running.client(running.login("admin", ADMIN_PASSWORD)) as admin:
            reply = admin.post("/api/users", json={"name": AUDITOR[0], "password": AUDITOR[1], "role": "auditor"})
            assert reply.status_code == 201, reply.text
        yield running


@pytest.fixture(scope="module")
def console_api(console_master: Any) -> Iterator[Any]:
    """The console master's API as the admin, logged in once (each login is an audit entry)."""
    from tests.test_server import ADMIN_PASSWORD

    with console_master.client(console_master.login("admin", ADMIN_PASSWORD)) as client:
        yield client
