"""The catalog on a real PostgreSQL: schema upgrades, re-import from repositories, search."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from tests.conftest import Cli, MiB
from vmkeep.catalog.models import Base
from vmkeep.lab.images import Segment

HEAD = "0020"  # the newest migration


def backed_up(cli: Cli, make_disk: Callable[..., Path], repo: str, names: list[str]) -> None:
    for i, name in enumerate(names):
        image = make_disk(8 * MiB, [Segment(0, MiB, "random", f"{name}-{i}")])
        cli.json("disk", "backup", str(image), "--repo", repo, "--name", name)


def test_schema_upgrade_is_required_and_idempotent(cli: Cli, database: str) -> None:
    db = {"VMKEEP_DATABASE_URL": database}
    refused = cli.run("catalog", "points", ok=False, env=db)
    assert refused.returncode != 0 and "vmkeep db upgrade" in refused.stderr
    assert cli.json("db", "upgrade", "0001", env=db)["revision"] == "0001"  # step by step, as an upgrade does
    refused = cli.run("catalog", "points", ok=False, env=db)
    assert refused.returncode != 0 and f"at 0001, this vmkeep needs {HEAD}" in refused.stderr
    assert cli.json("db", "upgrade", env=db)["revision"] == HEAD
    assert cli.json("db", "upgrade", env=db)["revision"] == HEAD
    assert cli.json("catalog", "points", env=db)["points"] == []
    # the migrations build exactly the tables the code declares (nothing forgotten in a migration)
    engine = create_engine(database)
    try:
        with engine.connect() as conn:
            ours = {"include_name": lambda name, kind, _parent: kind != "table" or name in Base.metadata.tables}
            assert compare_metadata(MigrationContext.configure(conn, opts=ours), Base.metadata) == []
    finally:
        engine.dispose()
    unreachable = cli.run("db", "upgrade", "--database-url",
                          "postgresql+psycopg://vmkeep:wrong@127.0.0.1:1/none", ok=False)
    assert unreachable.returncode != 0 and "cannot reach the catalog database" in unreachable.stderr


def test_rebuild_follows_the_repositories(cli: Cli, database: str, make_disk: Callable[..., Path],
                                          tmp_path: Path) -> None:
    db = {"VMKEEP_DATABASE_URL": database}
    cli.run("db", "upgrade", env=db)
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    cli.run("repo", "init", first, "--encrypt")
    cli.run("repo", "init", second, "--encrypt")
    backed_up(cli, make_disk, first, ["web-1", "web-1", "db-1"])
    backed_up(cli, make_disk, second, ["web-2"])

    report = cli.json("catalog", "rebuild", "--repo", first, "--name", "site-a", env=db)
    assert report == {"repository": "site-a", "points": 3, "removed": 0, "damaged": []}
    cli.json("catalog", "rebuild", "--repo", second, "--name", "site-b", env=db)
    again = cli.json("catalog", "rebuild", "--repo", first, env=db)  # idempotent
    assert again["points"] == 3 and again["removed"] == 0

    everything = cli.json("catalog", "points", env=db)["points"]
    assert len(everything) == 4
    assert [p["created"] for p in everything] == sorted((p["created"] for p in everything), reverse=True)
    web = cli.json("catalog", "points", "web-*", env=db)["points"]
    assert sorted((p["name"], p["repository"]) for p in web) == [("web-1", "site-a"), ("web-1", "site-a"),
                                                                  ("web-2", "site-b")]
    one = cli.json("catalog", "points", "db-1", env=db)["points"]
    assert len(one) == 1 and one[0]["kind"] == "image" and one[0]["disks"] == {"disk": 8 * MiB}

    # the repository decides: pruned points leave the catalog, a damaged manifest is reported
    cli.run("repo", "prune", first, "--keep-last", "1", "--name", "web-1")
    manifest = next((Path(first) / "points" / "db-1").glob("*.json"))
    manifest.write_bytes(manifest.read_bytes()[:40])
    report = cli.json("catalog", "rebuild", "--repo", first, env=db)
    assert report["points"] == 1 and report["removed"] == 2
    assert len(report["damaged"]) == 1 and "db-1" in report["damaged"][0]["key"]
    names = sorted(p["name"] for p in cli.json("catalog", "points", env=db)["points"])
    assert names == ["web-1", "web-2"]
