"""`vmkeep --server URL hypervisor …`, `vms` and `proxies …`: what the server backs up, and with what."""

from __future__ import annotations

from typing import Annotated

import typer

from vmkeep.cli.client_cmds import client, say, show_list
from vmkeep.cli.common import JsonOpt
from vmkeep.cli.output import human
from vmkeep.errors import VmkeepError

hypervisor_app = typer.Typer(help="Hypervisors registered on the server.", no_args_is_help=True)
proxies_app = typer.Typer(help="The proxies that registered with the server (`vmkeep proxy` runs one).",
                          no_args_is_help=True)
Name = Annotated[str, typer.Argument(help="The hypervisor's name on the server")]


@hypervisor_app.command("add")
def hypervisor_add_cmd(
    ctx: typer.Context,
    name: Name,
    uri: Annotated[str, typer.Option(help="libvirt URI, vsphere://USER@VCENTER or xapi://USER@POOL-MASTER")],
    username: Annotated[str | None, typer.Option(help="Login, if the host asks for one")] = None,
    discovery_minutes: Annotated[int, typer.Option(min=1, help="Rediscover every N minutes")] = 60,
    allow_plain_tcp: Annotated[bool, typer.Option(help="Administrators: accept qemu+tcp:// (unencrypted)")] = False,
    allow_unsafe_options: Annotated[bool, typer.Option(
        help="Administrators: accept address options that name key files or turn checks off")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Register a hypervisor (password from VMKEEP_HYPERVISOR_PASSWORD) and discover its VMs."""
    api = client(ctx)
    from vmkeep.hypervisors.connect import kind_of
    from vmkeep.settings import secret, settings

    body = {"name": name, "kind": kind_of(uri), "uri": uri, "username": username,
            "password": secret(settings().hypervisor_password), "discovery_minutes": discovery_minutes,
            "allow_plain_tcp": allow_plain_tcp, "allow_unsafe_options": allow_unsafe_options}
    added = api.call("POST", "/api/hypervisors", json=body)
    found = api.call("POST", f"/api/hypervisors/{name}/discover")
    say(json_out, {**added, "discovery": found}, f"hypervisor {name} added: {found['vms']} VMs")


@hypervisor_app.command("list")
def hypervisor_list_cmd(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """The hypervisors, their last discovery and where restores to them may write."""
    show_list(ctx, "/api/hypervisors", "hypervisors", json_out,
              ("name", "uri", "discovered", "restore locations", "error"),
              lambda h: (h["name"], h["uri"], (h["discovered_at"] or "")[:19], ", ".join(h["restore_locations"]),
                         h["discovery_error"] or ""))


@hypervisor_app.command("delete")
def hypervisor_delete_cmd(ctx: typer.Context, name: Name, json_out: JsonOpt = False) -> None:
    """Remove a hypervisor and its VMs from the catalog.

    Refused while a backup or restore of it runs; their history and restore points stay."""
    client(ctx).call("DELETE", f"/api/hypervisors/{name}")
    say(json_out, {"deleted": name}, f"hypervisor {name} deleted")


@hypervisor_app.command("discover")
def hypervisor_discover_cmd(ctx: typer.Context, name: Name, json_out: JsonOpt = False) -> None:
    """Refresh the hypervisor's VMs now (the server also does it every --discovery-minutes)."""
    found = client(ctx).call("POST", f"/api/hypervisors/{name}/discover")
    say(json_out, found, f"{name}: {found['vms']} VMs, {found['new']} new, {found['gone']} gone")


@hypervisor_app.command("restore-locations")
def hypervisor_restore_locations_cmd(
    ctx: typer.Context, name: Name,
    locations: Annotated[list[str] | None, typer.Argument(
        help="Absolute directories (or datastores) restores may write into; none given: show them")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Allow no location (restores go to the host's "
                                                        "default place only)")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Show or set where restores to this hypervisor may write.

    Administrators set them (a restore runs as root on the host); the list given replaces the one
    before."""
    api = client(ctx)
    if locations or clear:
        h = api.call("PUT", f"/api/hypervisors/{name}/restore-locations", json={"locations": locations or []})
    else:
        h = next((h for h in api.call("GET", "/api/hypervisors") if h["name"] == name), None)
        if h is None:
            raise VmkeepError(f"no hypervisor {name}: see `vmkeep --server {api.server} hypervisor list`")
    where = ", ".join(h["restore_locations"]) or "none (restores go to the host's default place only)"
    say(json_out, {"hypervisor": name, "restore_locations": h["restore_locations"]},
         f"restores to {name} may write into: {where}")


def vms_cmd(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="A VM's name, or a glob with *")] = None,
    hypervisor: Annotated[str | None, typer.Option(help="Only this hypervisor's")] = None,
    gone: Annotated[bool, typer.Option("--gone", help="Also the VMs discovery no longer finds")] = False,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 1000,
    json_out: JsonOpt = False,
) -> None:
    """The VMs the server's catalog knows, from the last discovery.

    `vmkeep inventory --host URI` asks a hypervisor directly."""
    show_list(ctx, "/api/vms", "vms", json_out, ("VM", "hypervisor", "host", "state", "disks", "size", "last seen"),
              lambda v: (v["name"], v["hypervisor"], v["host"], v["state"] if v["present"] else "gone",
                         str(len(v["disks"])), human(sum(d.get("size", 0) for d in v["disks"])),
                         v["last_seen"][:19]),
              params={"name": name, "hypervisor": hypervisor, "include_gone": gone, "limit": limit})


@proxies_app.command("list")
def proxies_list_cmd(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """The proxies, whether they are up (a heartbeat in the last 10 s) and what they reach."""
    show_list(ctx, "/api/proxies", "proxies", json_out,
              ("name", "up", "transports", "reaches", "storage", "slots", "last heartbeat"),
              lambda p: (p["name"], "up" if p["up"] else "down", ":".join(p["transports"]), ", ".join(p["reaches"]),
                         ", ".join(p["storage"]), str(p["concurrency"]), p["last_heartbeat"][:19]))


@proxies_app.command("delete")
def proxies_delete_cmd(ctx: typer.Context, name: Annotated[str, typer.Argument(help="The proxy's name")],
                       json_out: JsonOpt = False) -> None:
    """Remove a proxy that is gone for good (administrators; refused while it is up or has work)."""
    client(ctx).call("DELETE", f"/api/proxies/{name}")
    say(json_out, {"deleted": name}, f"proxy {name} deleted")
