"""The master's own work: scheduled policy runs, scheduled discovery, webhook and e-mail notices."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import create_engine, text

from tests import bare_vm
from tests.conftest import Cli, MiB, free_port
from tests.test_scale_out import start_proxy, stop, wait_for
from tests.test_server import ADMIN_PASSWORD, Server, launch


class Inbox:
    """A real SMTP server on loopback that keeps what it receives."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        self.messages.append(envelope)
        return "250 OK"


@pytest.fixture
def inbox() -> Iterator[tuple[Inbox, int]]:
    handler, port = Inbox(), free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


@pytest.fixture
def webhook() -> Iterator[tuple[list[dict[str, Any]], str]]:
    received: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield received, f"http://127.0.0.1:{httpd.server_port}/hook"
    finally:
        httpd.shutdown()


def test_scheduled_run_discovery_and_notices(cli: Cli, database: str, tmp_path: Path, inbox: tuple[Inbox, int],
                                             webhook: tuple[list[dict[str, Any]], str]) -> None:
    mails, smtp_port = inbox
    hooks, hook_url = webhook
    with launch(cli, database, tmp_path, "--smtp-host", "127.0.0.1", "--smtp-port", str(smtp_port),
                "--smtp-from", "backup@lab.example") as server, \
            bare_vm.running({"vda": (32 * MiB, "qcow2")}) as machine:
        machine.write("vda", 0, 4 * MiB, 0x5A)
        run_scheduled(cli, server, machine, tmp_path, hook_url)
        hook = wait_for("the webhook", lambda: hooks[:1])[0]
        assert hook["policy"] == "hourly" and hook["status"] == "succeeded" and hook["requested_by"] == "schedule"
        assert hook["vms"][0]["vm"] == machine.name and hook["vms"][0]["point"]
        mail = wait_for("the e-mail", lambda: mails.messages[:1])[0]
        assert mail.rcpt_tos == ["ops@lab.example"] and mail.mail_from == "backup@lab.example"
        body = mail.content.decode()
        assert "Subject: vmkeep: hourly succeeded" in body and machine.name in body


def run_scheduled(cli: Cli, server: Server, machine: bare_vm.BareVM, tmp_path: Path, hook_url: str) -> None:
    admin = server.client(server.login("admin", ADMIN_PASSWORD))
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo)
    assert admin.post("/api/repositories", json={"name": "main", "location": repo}).status_code == 201
    reply = admin.post("/api/hypervisors", json={"name": "local", "kind": "libvirt", "uri": "qemu:///system",
                                                 "discovery_minutes": 5})
    assert reply.status_code == 201
    # never discovered: the schedule does it at once, without a call to /discover
    wait_for("scheduled discovery", lambda: admin.get("/api/vms", params={"name": machine.name}).json())

    bad = admin.post("/api/policies", json={"name": "x", "repository": "main", "schedule": "every hour"})
    assert bad.status_code == 400 and "cron" in bad.json()["detail"]
    policy = admin.post("/api/policies", json={
        "name": "hourly", "repository": "main", "vms": [machine.name], "schedule": "17 * * * *",
        "transports": "hotadd", "notify_webhook": hook_url, "notify_email": ["ops@lab.example"]}).json()
    first = datetime.fromisoformat(policy["next_run"])
    now = datetime.now(UTC)
    assert first.minute == 17 and now < first <= now + timedelta(hours=1)

    token = admin.post("/api/tokens", json={"name": "proxy"}).json()["token"]
    proxy = start_proxy(server, token, "p1")
    try:
        wait_for("the proxy", lambda: any(p["up"] for p in admin.get("/api/proxies").json()))
        engine = create_engine(server.database)
        with engine.begin() as conn:  # the clock reaches the policy's time (instead of waiting for :17)
            conn.execute(text("UPDATE policies SET next_run = now() WHERE name = 'hourly'"))
        engine.dispose()
        job = wait_for("the scheduled run", lambda: [j for j in admin.get("/api/jobs").json() if j["finished"]])[0]
        assert job["requested_by"] == "schedule" and job["status"] == "succeeded", job
        after = datetime.fromisoformat(admin.get("/api/policies").json()[0]["next_run"])
        assert after > datetime.now(UTC) and after.minute == 17  # the next one, not a repeat
        assert len(admin.get("/api/jobs").json()) == 1
    finally:
        stop(proxy)
