"""Entry point of the `vmkeep` command: sub-commands and error reporting."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from vmkeep.cli import (
    catalog_cmds,
    client_cmds,
    disk_cmds,
    files_cmds,
    lab_cmds,
    recovery_cmds,
    repo_cmds,
    server_cmds,
    vm_cmds,
)
from vmkeep.cli.demo import demo_cmd
from vmkeep.cli.output import err_console
from vmkeep.errors import VmkeepError

app = typer.Typer(help="vmkeep: agentless VM backup.", no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def root(ctx: typer.Context, server: Annotated[str | None, typer.Option(
        "--server", envvar="VMKEEP_SERVER", show_envvar=False,
        help="A vmkeep server's URL, for the commands that talk to it (login, hypervisor, policy, jobs, "
             "points)")] = None) -> None:
    """vmkeep: agentless VM backup. Local commands need no server; --server URL reaches one."""
    ctx.obj = {"server": server}


app.add_typer(repo_cmds.app, name="repo")
app.add_typer(disk_cmds.app, name="disk")
app.add_typer(lab_cmds.app, name="lab")
app.add_typer(files_cmds.app, name="files")
app.add_typer(catalog_cmds.db_app, name="db")
app.add_typer(catalog_cmds.catalog_app, name="catalog")
app.add_typer(server_cmds.user_app, name="user")
app.command("server")(server_cmds.server_cmd)
app.command("login")(client_cmds.login_cmd)
app.add_typer(client_cmds.hypervisor_app, name="hypervisor")
app.add_typer(client_cmds.policy_app, name="policy")
app.command("jobs")(client_cmds.jobs_cmd)
app.command("proxy")(server_cmds.proxy_cmd)
app.command("points")(disk_cmds.points_cmd)
app.command("backup")(vm_cmds.backup_cmd)
app.command("restore")(vm_cmds.restore_cmd)
app.command("inventory")(vm_cmds.inventory_cmd)
app.command("mount")(recovery_cmds.mount_cmd)
app.command("instant-restore")(recovery_cmds.instant_restore_cmd)
app.command("verify-boot")(recovery_cmds.verify_boot_cmd)
app.command("demo")(demo_cmd)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted: nothing partial was committed; the next run starts clean")
        sys.exit(130)
    except VmkeepError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
