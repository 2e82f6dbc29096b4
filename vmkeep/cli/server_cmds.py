"""`vmkeep server` (the master's REST API) and `vmkeep proxy` (a data mover working for it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vmkeep.cli.catalog_cmds import DatabaseOpt
from vmkeep.errors import UsageError

DEFAULT_LISTEN = "127.0.0.1:8470"


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {listen!r}: give HOST:PORT, e.g. {DEFAULT_LISTEN} or 0.0.0.0:8470")
    return host.strip("[]"), int(port)


def server_cmd(
    listen: Annotated[str, typer.Option(help="HOST:PORT to serve the API on")] = DEFAULT_LISTEN,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate: serve HTTPS")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert")] = None,
    smtp_host: Annotated[str | None, typer.Option(help="SMTP server for run notices by e-mail")] = None,
    smtp_port: Annotated[int, typer.Option(min=1, max=65535)] = 25,
    smtp_from: Annotated[str, typer.Option(help="Sender address of the notices")] = "vmkeep@localhost",
    smtp_starttls: Annotated[bool, typer.Option("--smtp-starttls")] = False,
    smtp_ca_file: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="CA certificates that sign the SMTP server's (--smtp-starttls); "
                                          "default: the system's")] = None,
    allow_endpoint: Annotated[list[str] | None, typer.Option(
        help="A network (CIDR) webhooks and S3 endpoints may reach although it is link-local or cloud metadata "
             "(169.254.0.0/16, fe80::/10, fd00:ec2::254); repeatable")] = None,
    trusted_proxy: Annotated[list[str] | None, typer.Option(
        help="Address or network of a reverse proxy in front of the server: only its X-Forwarded-For names "
             "the client in the audit log; repeatable")] = None,
    token_max_days: Annotated[int, typer.Option(
        min=1, max=3650, help="The longest an API token may live; a token asked without days gets this")] = 365,
    database_url: DatabaseOpt = None,
    proxy_database_url: Annotated[str | None, typer.Option(
        help="The catalog's URL as proxies on other machines reach it (else VMKEEP_PROXY_DATABASE_URL; "
             "default: the server's own)")] = None,
) -> None:
    """Run the master server: REST API (OpenAPI at /docs), metrics at /metrics, schedules, notices.

    SMTP login, if the server needs one, comes from VMKEEP_SMTP_USER and VMKEEP_SMTP_PASSWORD."""
    import logging

    import uvicorn
    from sqlalchemy.engine import make_url

    from vmkeep.catalog.db import database_url as resolve
    from vmkeep.server.app import create_app
    from vmkeep.server.endpoints import EndpointPolicy, parse_networks
    from vmkeep.settings import secret, settings

    env = settings()
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if smtp_ca_file is not None and not smtp_starttls:
        raise UsageError("--smtp-ca-file checks the certificate of --smtp-starttls: give both")
    from vmkeep.server.notify import Mailer

    host, port = parse_listen(listen)
    endpoints = EndpointPolicy.parse(allow_endpoint or [])
    trusted = parse_networks(trusted_proxy or [], "--trusted-proxy")
    mailer = (Mailer(smtp_host, smtp_port, smtp_from, smtp_starttls, env.smtp_user, secret(env.smtp_password),
                     smtp_ca_file) if smtp_host else None)
    app = create_app(resolve(database_url), mailer, proxy_database_url or env.proxy_database_url, endpoints, trusted)
    app.state.token_max_days = token_max_days
    logging.getLogger("vmkeep.server").info(
        "serving the API on %s://%s:%d (catalog %s)", "https" if tls_cert else "http", host, port,
        make_url(resolve(database_url)).render_as_string(hide_password=True))
    # proxy headers are read by vmkeep.server.client_address, from --trusted-proxy addresses only;
    # uvicorn's own handling would believe any X-Forwarded-For sent from 127.0.0.1
    uvicorn.run(app, host=host, port=port, ssl_certfile=tls_cert, ssl_keyfile=tls_key, log_level="warning",
                proxy_headers=False, forwarded_allow_ips=[])


def proxy_cmd(
    name: Annotated[str, typer.Option(help="This proxy's name")],
    server: Annotated[str, typer.Option(help="The master's URL, e.g. https://master:8470")],
    token: Annotated[str | None, typer.Option(hidden=True, help="Refused: use VMKEEP_TOKEN or --token-file")] = None,
    token_file: Annotated[Path | None, typer.Option(
        help="File holding the proxy account's API token (else VMKEEP_TOKEN)")] = None,
    ca_file: Annotated[Path | None, typer.Option(
        help="PEM file of the CA that signed the master's certificate (else VMKEEP_CA_FILE; default: the "
             "system's)")] = None,
    transports: Annotated[str, typer.Option(help="What this proxy can do")] = "san:hotadd:nbd",
    reaches: Annotated[str, typer.Option(help="Comma-separated hypervisor hosts it is on or sees; * for any "
                                              "over nbd")] = "*",
    storage: Annotated[str, typer.Option(help="Comma-separated datastores this proxy reads directly (san), as "
                                              "GET /api/vms names them")] = "",
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="VM backups at once")] = 2,
    max_rate: Annotated[float | None, typer.Option(min=1, help="MiB/s each backup may read from a VM's "
                                                               "storage and each restore may write")] = None,
) -> None:
    """Run a proxy: register with the master, heartbeat, and run the backups dispatched to it.

    The API token comes from VMKEEP_TOKEN or --token-file, never the command line."""
    from vmkeep.client import read_token
    from vmkeep.hypervisors.base import parse_transports
    from vmkeep.proxy.worker import run_proxy
    from vmkeep.settings import settings

    if token is not None:
        raise UsageError("--token shows the token to every user of this machine (ps): put it in VMKEEP_TOKEN "
                         "or in a file only this user reads and give --token-file FILE")
    run_proxy(server.rstrip("/"), read_token(token_file), name, parse_transports(transports),
              [h.strip() for h in reaches.split(",") if h.strip()], concurrency, max_rate,
              [s.strip() for s in storage.split(",") if s.strip()], ca_file or settings().ca_file)
