"""A command imports only what it needs: a scheduled disk backup does not pay for the server
client, the catalog or the web framework on every start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vmkeep.cli.main import COMMANDS, build_app, requested_command

PROBE = """
import sys
sys.argv = ["vmkeep", *{args!r}]
from vmkeep.cli.main import main
try:
    main()
except SystemExit:
    pass
heavy = ("httpx", "sqlalchemy", "fastapi", "pydantic", "libvirt")
print("LOADED:" + ",".join(sorted(m for m in heavy if m in sys.modules)))
"""


def loaded_after(*args: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=list(args))], check=True,
                         capture_output=True, text=True).stdout
    return set(filter(None, out.rsplit("LOADED:", 1)[1].strip().split(",")))


def test_disk_backup_loads_no_server_or_catalog_library() -> None:
    assert loaded_after("disk", "backup", "--help") == set()


def test_help_still_lists_every_command() -> None:
    app = build_app()
    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert names == set(COMMANDS)
    assert {"httpx"} <= loaded_after("--help")  # the full tree is built for help


@pytest.mark.parametrize(("argv", "expected"), [
    (["disk", "backup", "x"], "disk"),
    (["--server", "http://m:8000", "jobs"], "jobs"),
    (["--server=http://m:8000", "points", "--repo", "r"], "points"),
    (["--help"], None),
    (["dsik", "backup"], None),  # a typo gets the full tree, so the error lists every command
    ([], None),
])
def test_requested_command(argv: list[str], expected: str | None) -> None:
    assert requested_command(argv) == expected
