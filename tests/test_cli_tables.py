"""What the CLI's tables show in an 80-column terminal: ids whole, a run's warnings in full."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from vmkeep.cli.client_cmds import job_table
from vmkeep.cli.output import uncut

POINT = "20261204T223712Z-0f3a9c2e71b4"


def _rendered(table: Table) -> str:
    console = Console(width=80, record=True, force_terminal=False)
    console.print(table)
    return console.export_text()


def test_point_ids_are_never_cut_in_a_narrow_terminal() -> None:
    def points() -> Table:
        table = Table("VM", "point", "created", "mode", "transport", "size", "stored", "repository")
        table.add_row("a-virtual-machine-with-a-long-name", POINT, "2026-12-04T22:37:12", "incremental",
                      "hotadd", "4.00 GiB", "1.23 GiB", "/srv/backup/repositories/primary")
        return table

    plain = _rendered(points())
    assert not any(POINT in line for line in plain.splitlines())  # rich folds the id without help
    assert any(POINT in line for line in _rendered(uncut(points())).splitlines())


def test_a_runs_table_shows_every_warning_and_the_attempts() -> None:
    warnings = ["proxy pa stopped during the backup (no heartbeat for 8 s); retried on proxy pb",
                "disk vdb: an NBD connection dropped during the backup; it was opened again and the read retried"]
    vm = {"vm": "web1", "status": "succeeded", "proxy": "pb", "attempts": 2, "mode": "full", "transport": "nbd",
          "read_bytes": 1 << 30, "stored_bytes": 1 << 29, "progress_bytes": None, "total_bytes": None,
          "duration_seconds": 12.5, "verified": None, "error": None, "warnings": warnings}
    console = Console(width=80, record=True, force_terminal=False)
    console.print(job_table({"id": 7, "policy": "nightly", "status": "succeeded", "vms": [vm]}))
    lines = console.export_text().splitlines()
    row = next(line for line in lines if "web1" in line and "succeeded" in line)
    assert row.split()[:4] == ["web1", "succeeded", "pb", "2"]  # whole, with the proxy and the attempts
    text = " ".join(" ".join(lines).split())
    for warning in warnings:
        assert f"web1: {warning}" in text  # every warning whole, wrapped at most
