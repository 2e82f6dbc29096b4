"""Security review findings (issue 22): retention that deletes everything, requests to cloud
metadata addresses, unverified SMTP TLS, forged client addresses, tokens on the command line or
readable on disk, and passwords echoed by validation errors. API tests run a real `vmkeep
server` on a fresh PostgreSQL catalog."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import create_engine, text

from tests import test_schedule
from tests.conftest import VMKEEP, Cli, free_port
from tests.test_catalog import backed_up
from tests.test_scale_out import stop, wait_for
from tests.test_schedule import Inbox
from tests.test_server import ADMIN_PASSWORD, Server, launch
from vmkeep.errors import UsageError
from vmkeep.lab.tls import Issued, _issue
from vmkeep.repository.prune import RetentionPolicy
from vmkeep.server.notify import Mailer

receiver = test_schedule.webhook  # fixture: a webhook receiver on loopback keeping each POST's JSON
METADATA_URLS = ["http://169.254.169.254/latest/meta-data/", "http://[fe80::1]:8080/", "http://[fd00:ec2::254]/",
                 "http://2852039166/", "http://[::ffff:169.254.169.254]/"]


@pytest.fixture
def server(cli: Cli, database: str, tmp_path: Path) -> Iterator[Server]:
    with launch(cli, database, tmp_path) as running:
        yield running


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it: (ca, cert, key) files."""
    ca = _issue("test CA", None)
    issued: Issued = _issue("localhost", ca, server=True)
    paths = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    for path, data in zip(paths, (ca.cert_pem(), issued.cert_pem(), issued.key_pem()), strict=True):
        path.write_bytes(data)
    return paths


def _repository(cli: Cli, admin: httpx.Client, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo)
    assert admin.post("/api/repositories", json={"name": "main", "location": repo}).status_code == 201


def _audit_count(admin: httpx.Client) -> int:
    return len(admin.get("/api/audit", params={"limit": 10000}).json())


# 10. retention

def test_negative_or_unknown_retention_is_refused_and_nothing_stored(server: Server, cli: Cli,
                                                                     tmp_path: Path) -> None:
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    _repository(cli, admin, tmp_path)
    audited = _audit_count(admin)
    for retention in ({"last": -1000}, {"daily": 3, "weekly": -1}, {"forever": 3}, {"last": "many"}):
        reply = admin.post("/api/policies", json={"name": "p", "repository": "main", "retention": retention})
        assert reply.status_code == 422, (retention, reply.text)
        assert "retention" in reply.text
    assert admin.get("/api/policies").json() == [] and _audit_count(admin) == audited

    made = admin.post("/api/policies", json={"name": "p", "repository": "main", "retention": {"last": 2}})
    assert made.status_code == 201 and made.json()["retention"] == {"last": 2}
    audited = _audit_count(admin)
    changed = admin.put("/api/policies/p", json={"name": "p", "repository": "main", "retention": {"last": -1}})
    assert changed.status_code == 422 and "greater than or equal to 0" in changed.text
    assert admin.get("/api/policies").json()[0]["retention"] == {"last": 2} and _audit_count(admin) == audited


def test_retention_policy_refuses_negative_counts_and_prune_keeps_a_point(cli: Cli, make_disk,
                                                                         tmp_path: Path) -> None:
    for bad in ({"last": -1000}, {"daily": -1}, {"yearly": 1, "hourly": -5}):
        with pytest.raises(UsageError, match="0 or more"):
            RetentionPolicy(**bad)
    with pytest.raises(UsageError, match="unknown retention forever"):
        RetentionPolicy.from_counts({"last": 1, "forever": 1})
    assert RetentionPolicy.from_counts({"last": 3}).last == 3

    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    backed_up(cli, make_disk, repo, ["app", "app", "app"])
    refused = cli.run("repo", "prune", repo, "--keep-last", "-5", ok=False)
    assert refused.returncode != 0 and len(cli.json("points", "--repo", repo)["points"]) == 3
    kept = cli.json("repo", "prune", repo, "--keep-daily", "1")["names"]["app"]["keep"]
    assert len(kept) == 1 and len(cli.json("points", "--repo", repo)["points"]) == 1


# 12. webhooks and S3 endpoints

def test_metadata_endpoints_refused_at_creation_and_at_send_time(
        server: Server, cli: Cli, tmp_path: Path, receiver: tuple[list[dict[str, Any]], str]) -> None:
    hooks, hook_url = receiver
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    _repository(cli, admin, tmp_path)
    audited = _audit_count(admin)
    for url in METADATA_URLS:
        reply = admin.post("/api/policies", json={"name": "p", "repository": "main", "notify_webhook": url})
        assert reply.status_code == 400, (url, reply.text)
        assert "link-local or cloud metadata" in reply.json()["detail"] and "--allow-endpoint" in reply.json()["detail"]
        s3 = admin.post("/api/repositories", json={"name": "s3", "location": "s3://bucket/x", "s3_endpoint": url})
        assert s3.status_code == 400 and "--allow-endpoint" in s3.json()["detail"], s3.text
    assert admin.get("/api/policies").json() == [] and [r["name"] for r in admin.get("/api/repositories").json()] \
        == ["main"] and _audit_count(admin) == audited

    # loopback stays allowed (the tests' receivers); a refused change leaves the policy as it was
    for name in ("good", "bad"):
        made = admin.post("/api/policies", json={"name": name, "repository": "main", "notify_webhook": hook_url})
        assert made.status_code == 201, made.text
    again = admin.put("/api/policies/bad", json={"name": "bad", "repository": "main",
                                                  "notify_webhook": METADATA_URLS[0]})
    assert again.status_code == 400 and admin.get("/api/policies").json()[0]["notify_webhook"] == hook_url

    # at send time the address is checked again: a row that names metadata (stored before this
    # check, or a name that now resolves there) is refused, the good one's notice arrives
    engine = create_engine(server.database)
    with engine.begin() as conn:
        conn.execute(text("UPDATE policies SET notify_webhook = :u WHERE name = 'bad'"), {"u": METADATA_URLS[0]})
        for name in ("bad", "good"):
            conn.execute(text("INSERT INTO jobs (policy_id, policy_name, requested_by, status, finished) "
                              "SELECT id, name, 'admin', 'succeeded', now() FROM policies WHERE name = :n"),
                         {"n": name})
    try:
        wait_for("the notices", lambda: _notified(engine))
        with engine.connect() as conn:
            errors = dict(conn.execute(text("SELECT policy_name, notify_error FROM jobs")).tuples().all())
    finally:
        engine.dispose()
    assert errors["good"] is None and "link-local or cloud metadata" in errors["bad"], errors
    assert [h["policy"] for h in hooks] == ["good"]


def _notified(engine: Any) -> bool:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM jobs WHERE notified_at IS NULL")).scalar_one() == 0


def test_webhook_is_sent_to_the_address_checked_at_send_time(monkeypatch: pytest.MonkeyPatch,
                                                             receiver: tuple[list[dict[str, Any]], str]) -> None:
    """The request goes to the very address checked, even if the name resolves elsewhere a moment
    later (DNS rebinding); a name that resolves to metadata when sending is refused although it
    resolved to loopback when the policy was made."""
    from vmkeep.server.endpoints import EndpointPolicy, EndpointRefused
    from vmkeep.server.notify import post_json

    hooks, hook_url = receiver
    port = int(hook_url.rsplit(":", 1)[1].split("/")[0])
    answers = ["127.0.0.1", "127.0.0.1"]  # then 169.254.169.254 for every later lookup
    real = socket.getaddrinfo

    def fake(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.example":
            return real(answers.pop(0) if answers else "169.254.169.254", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    url = f"http://hooks.example:{port}/hook"
    EndpointPolicy().check(url, "notify_webhook")  # when the policy is made
    assert post_json(url, {"n": 1}, EndpointPolicy()).status_code == 204  # checked, then resolved elsewhere
    assert hooks == [{"n": 1}]
    with pytest.raises(EndpointRefused, match="169.254.169.254"):
        post_json(url, {"n": 2}, EndpointPolicy())
    assert len(hooks) == 1


def test_allowed_endpoints_and_trusted_proxy(cli: Cli, database: str, tmp_path: Path,
                                             pki: tuple[Path, Path, Path]) -> None:
    with launch(cli, database, tmp_path, "--allow-endpoint", "169.254.0.0/16", "--allow-endpoint", "fe80::/10",
                "--trusted-proxy", "127.0.0.1", "--smtp-host", "127.0.0.1", "--smtp-starttls",
                "--smtp-ca-file", str(pki[0])) as server:
        # 13: the header of a trusted proxy names the client (the rightmost hop it did not add)
        forwarded = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}
        reply = server.client().post("/api/auth/login", json={"name": "admin", "password": ADMIN_PASSWORD},
                                     headers=forwarded)
        admin = server.client(reply.json()["token"])
        assert admin.get("/api/audit").json()[0]["client"] == "203.0.113.9"
        # 12: the admin allowed link-local
        _repository(cli, admin, tmp_path)
        for url in METADATA_URLS[:2]:
            made = admin.post("/api/policies", json={"name": f"p{len(url)}", "repository": "main",
                                                     "notify_webhook": url})
            assert made.status_code == 201, made.text
        refused = admin.post("/api/policies", json={"name": "ec2", "repository": "main",
                                                    "notify_webhook": METADATA_URLS[2]})
        assert refused.status_code == 400


def test_server_options_are_checked(cli: Cli) -> None:
    for option, value in (("--allow-endpoint", "not-a-network"), ("--trusted-proxy", "proxy.example")):
        bad = cli.run("server", option, value, ok=False)
        assert bad.returncode == 2 and option in bad.stderr, bad.stderr


# 12. SMTP STARTTLS verifies the server's certificate

@contextmanager
def smtp_with_starttls(cert: Path, key: Path) -> Iterator[tuple[Inbox, int]]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    handler, port = Inbox(), free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def test_smtp_starttls_verifies_the_certificate(pki: tuple[Path, Path, Path]) -> None:
    ca, cert, key = pki
    with smtp_with_starttls(cert, key) as (inbox, port):
        with pytest.raises(ssl.SSLCertVerificationError):
            Mailer("127.0.0.1", port, starttls=True).send(["ops@lab.example"], "refused", "self-signed")
        assert inbox.messages == []
        Mailer("127.0.0.1", port, starttls=True, ca_file=ca).send(["ops@lab.example"], "accepted", "signed")
        assert len(inbox.messages) == 1 and b"Subject: accepted" in inbox.messages[0].content


# 13. the audit log's client address

def test_forged_forwarded_for_is_not_audited(server: Server) -> None:
    forged = {"X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.9"}
    reply = server.client().post("/api/auth/login", json={"name": "admin", "password": ADMIN_PASSWORD},
                                 headers=forged)
    admin = server.client(reply.json()["token"])
    wrong = server.client().post("/api/auth/login", json={"name": "admin", "password": "nope-nope"}, headers=forged)
    assert wrong.status_code == 401
    entries = admin.get("/api/audit").json()
    assert [(e["action"], e["client"]) for e in entries[:2]] == [("login-failed", "127.0.0.1"),
                                                                  ("login", "127.0.0.1")]


# 14. tokens and CA files of the command line, the token store, validation errors

@contextmanager
def https_stub(cert: Path, key: Path) -> Iterator[str]:
    """An HTTPS server that answers every GET with [] and every POST with 403."""

    class Stub(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._answer(200, b"[]")

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer(403, b'{"detail": "stub says no"}')

        def log_message(self, *_args: Any) -> None:
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Stub)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()


def test_proxy_token_never_on_the_command_line(server: Server, tmp_path: Path) -> None:
    token = server.client(server.login("admin", ADMIN_PASSWORD)).post(
        "/api/tokens", json={"name": "proxy"}).json()["token"]
    env = {k: v for k, v in server.env.items() if k != "VMKEEP_TOKEN"}
    refused = subprocess.run([VMKEEP, "proxy", "--name", "p1", "--server", server.url, "--token", token],
                             env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "VMKEEP_TOKEN" in refused.stderr and "--token-file" in refused.stderr
    nothing = subprocess.run([VMKEEP, "proxy", "--name", "p1", "--server", server.url],
                             env=env, capture_output=True, text=True, timeout=60)
    assert nothing.returncode == 2 and "--token-file" in nothing.stderr
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    assert admin.get("/api/proxies").json() == []

    token_file = tmp_path / "proxy.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    proxy = subprocess.Popen([VMKEEP, "proxy", "--name", "p1", "--server", server.url, "--token-file",
                              str(token_file), "--reaches", "*", "--transports", "nbd"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the proxy", lambda: any(p["up"] for p in admin.get("/api/proxies").json()))
        assert token not in " ".join(Path(f"/proc/{proxy.pid}/cmdline").read_text().split("\0"))
    finally:
        stop(proxy)


def test_ca_file_for_the_proxy_and_the_client_commands(cli: Cli, tmp_path: Path,
                                                      pki: tuple[Path, Path, Path]) -> None:
    ca, cert, key = pki
    with https_stub(cert, key) as url:
        unverified = cli.run("--server", url, "jobs", "--json", ok=False, env={"VMKEEP_TOKEN": "t"})
        assert unverified.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in unverified.stderr
        assert cli.json("--server", url, "--ca-file", str(ca), "jobs", env={"VMKEEP_TOKEN": "t"}) == {"jobs": []}

        def proxy(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([VMKEEP, "proxy", "--name", "p1", "--server", url, *extra],
                                  env={**cli.env, "VMKEEP_TOKEN": "t"}, capture_output=True, text=True, timeout=60)

        assert "CERTIFICATE_VERIFY_FAILED" in proxy().stderr
        assert "stub says no" in proxy("--ca-file", str(ca)).stderr


def test_token_store_is_private_even_if_it_was_not(server: Server, cli: Cli, tmp_path: Path) -> None:
    store = tmp_path / "config" / "vmkeep" / "tokens.json"
    store.parent.mkdir(parents=True)
    store.write_text(json.dumps({"https://elsewhere:8470": "vk_other"}))
    store.chmod(0o644)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "VMKEEP_SERVER": server.url,
           "VMKEEP_PASSWORD": ADMIN_PASSWORD}
    cli.run("login", "admin", env=env)
    assert oct(store.stat().st_mode & 0o777) == "0o600"
    assert set(json.loads(store.read_text())) == {"https://elsewhere:8470", server.url}
    assert list(store.parent.iterdir()) == [store]  # no temporary file left beside it


def test_validation_errors_never_echo_a_password(server: Server) -> None:
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    secret = "Sh0rtPw"
    bodies = [{"name": "bob", "password": secret, "role": "admin"},  # too short
              {"name": "bob", "password": [f"{secret}-in-a-list"], "role": "admin"},  # wrong type
              {"name": "bob", "password": f"{secret}-long-enough", "role": "king"},  # another field wrong
              {"name": "bob", "password": f"{secret}-long-enough"}]  # a field missing: the input is the body
    for body in bodies:
        reply = admin.post("/api/users", json=body)
        assert reply.status_code == 422 and secret not in reply.text, reply.text
        assert reply.json()["detail"][0]["loc"][0] == "body"
    login = server.client().post("/api/auth/login", json={"name": "admin", "password": {"x": secret}})
    assert login.status_code == 422 and secret not in login.text
    assert [u["name"] for u in admin.get("/api/users").json()] == ["admin"]
