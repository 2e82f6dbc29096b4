"""Entry point of the `vmkeep` command: sub-commands and error reporting."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from vmkeep.cli.output import err_console
from vmkeep.errors import VmkeepError
from vmkeep.logs import configure, take_options

# Each top-level command and where it lives: (module, attribute, is a group of sub-commands).
# Only the module of the command being run is imported — the server client, the catalog and
# the lab pull in libraries (httpx, SQLAlchemy, libvirt) a backup does not need, and a
# command's start-up time is part of every scheduled job.
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "repo": ("repo_cmds", "app", True),
    "disk": ("disk_cmds", "app", True),
    "lab": ("lab_cmds", "app", True),
    "files": ("files_cmds", "app", True),
    "db": ("catalog_cmds", "db_app", True),
    "catalog": ("catalog_cmds", "catalog_app", True),
    "user": ("user_cmds", "user_app", True),
    "server": ("server_cmds", "server_cmd", False),
    "login": ("client_cmds", "login_cmd", False),
    "logout": ("access_cmds", "logout_cmd", False),
    "whoami": ("access_cmds", "whoami_cmd", False),
    "hypervisor": ("inventory_cmds", "hypervisor_app", True),
    "vms": ("inventory_cmds", "vms_cmd", False),
    "repository": ("registry_cmds", "repository_app", True),
    "proxies": ("inventory_cmds", "proxies_app", True),
    "policy": ("policy_cmds", "policy_app", True),
    "jobs": ("client_cmds", "jobs_cmd", False),
    "restores": ("client_cmds", "restores_cmd", False),
    "proxy": ("server_cmds", "proxy_cmd", False),
    "token": ("access_cmds", "token_app", True),
    "audit": ("access_cmds", "audit_app", True),
    "points": ("disk_cmds", "points_cmd", False),
    "copy": ("copy_cmds", "copy_cmd", False),
    "backup": ("vm_cmds", "backup_cmd", False),
    "restore": ("vm_cmds", "restore_cmd", False),
    "inventory": ("vm_cmds", "inventory_cmd", False),
    "mount": ("recovery_cmds", "mount_cmd", False),
    "instant-restore": ("recovery_cmds", "instant_restore_cmd", False),
    "verify-boot": ("recovery_cmds", "verify_boot_cmd", False),
    "demo": ("demo", "demo_cmd", False),
    "replicate": ("replica_cmds", "replicate_cmd", False),
    "failover": ("replica_cmds", "failover_cmd", False),
    "failback": ("replica_cmds", "failback_cmd", False),
    "replicas": ("replica_cmds", "replicas_cmd", False),
}
ROOT_OPTIONS_WITH_VALUE = ("--server", "--ca-file")


def root(ctx: typer.Context, server: Annotated[str | None, typer.Option(
        "--server",
        help="A vmkeep server's URL, for the commands that talk to it (login, hypervisor, vms, repository, "
             "proxies, policy, jobs, restores, token, user, audit, points; else VMKEEP_SERVER)")] = None,
         ca_file: Annotated[Path | None, typer.Option(
             "--ca-file",
             help="PEM file of the CA that signed the --server's certificate (else VMKEEP_CA_FILE; default: the "
                  "system's)")] = None,
         _verbose: Annotated[bool, typer.Option(
             "-v", "--verbose", help="Log one line per event to stderr (before or after the command)")] = False,
         _debug: Annotated[bool, typer.Option(
             "--debug", help="Log also what is asked of libvirt, QEMU, vSphere, S3, PostgreSQL … and what comes "
                             "back")] = False,
         _log_format: Annotated[str, typer.Option(
             "--log-format", help="text, or json: one object per line with job, VM and proxy as fields")] = "text",
         ) -> None:
    """vmkeep: agentless VM backup. Local commands need no server; --server URL reaches one."""
    ctx.obj = {"server": server, "ca_file": ca_file}  # VMKEEP_SERVER/VMKEEP_CA_FILE: client_cmds.server_options


def requested_command(argv: list[str]) -> str | None:
    """The top-level command named on the command line, or None (help, or a typo)."""
    args = iter(argv)
    for arg in args:
        if arg in ROOT_OPTIONS_WITH_VALUE:
            next(args, None)
        elif not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_app(only: str | None = None) -> typer.Typer:
    """The command tree: with ``only``, just that command (the rest is never imported)."""
    app = typer.Typer(help="vmkeep: agentless VM backup.", no_args_is_help=True, pretty_exceptions_enable=False)
    app.callback()(root)
    for name, (module_name, attribute, is_group) in COMMANDS.items():
        if only is not None and name != only:
            continue
        target = getattr(importlib.import_module(f"vmkeep.cli.{module_name}"), attribute)
        if is_group:
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)
    return app


def main() -> None:
    try:
        argv, level, log_format = take_options(sys.argv[1:])
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    configure(level, log_format)
    sys.argv[1:] = argv
    app = build_app(requested_command(argv))
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted: nothing partial was committed; the next run starts clean")
        sys.exit(130)
    except VmkeepError as exc:
        # the message may quote guest file names, URIs or paths: never read as Rich markup
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
