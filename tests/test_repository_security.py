"""Security review, issue 22 items 4 and 11: the repository config is authenticated and pinned,
malformed or moved manifests are damaged (never a crash), MACs are compared in constant time,
scrypt costs are bounded, and backend keys never leave the repository."""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from tests.conftest import Cli, MiB
from vmkeep.catalog.db import make_engine, upgrade
from vmkeep.catalog.models import RepositoryRecord
from vmkeep.catalog.rebuild import rebuild
from vmkeep.cli import key_prefetch
from vmkeep.errors import RepositoryError, VmkeepError
from vmkeep.jobs.registered import open_registered
from vmkeep.lab.images import Segment
from vmkeep.repository import crypto, kdf
from vmkeep.repository.backends import FilesystemBackend, open_backend
from vmkeep.repository.backends.s3 import S3Backend
from vmkeep.repository.config import Credentials
from vmkeep.repository.repo import Repository

PASSPHRASE = b"correct horse battery staple"  # the cli fixture's
NO_PASSPHRASE = {"VMKEEP_PASSPHRASE": ""}


def files(root: Path) -> dict[str, bytes]:
    """Every object of a filesystem repository and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def chunk_files(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in files(root).items() if k.startswith("chunks/")}


def config_of(root: Path) -> dict[str, Any]:
    return dict(json.loads((root / "config.json").read_bytes()))


def write_config(root: Path, config: dict[str, Any]) -> None:
    (root / "config.json").write_text(json.dumps(config, indent=1))


def backed_up(cli: Cli, make_disk: Callable[..., Path], repo: Path, name: str, seed: str,
              env: dict[str, str] | None = None) -> None:
    image = make_disk(4 * MiB, [Segment(0, 2 * MiB, "random", seed)])
    cli.json("disk", "backup", str(image), "--repo", str(repo), "--name", name, env=env)


@pytest.fixture
def encrypted(cli: Cli, make_disk: Callable[..., Path], tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    cli.run("repo", "init", str(repo), "--encrypt", "--chunk-size", "1M")
    backed_up(cli, make_disk, repo, "vm-a", "a")
    return repo


def open_fs(repo: Path, passphrase: bytes | None = PASSPHRASE) -> Repository:
    return Repository.open(FilesystemBackend(repo), Credentials(passphrase))


# -- item 4: the configuration is authenticated ---------------------------------------------------

def test_a_config_switched_to_no_encryption_is_refused_with_a_passphrase(
        cli: Cli, make_disk: Callable[..., Path], encrypted: Path) -> None:
    before = files(encrypted)
    config = config_of(encrypted)
    config["encryption"] = {"mode": "none", "secret": "11" * 32}
    config.pop("mac", None)
    write_config(encrypted, config)
    image = make_disk(4 * MiB, [Segment(0, 2 * MiB, "random", "secret data")])
    proc = cli.run("disk", "backup", str(image), "--repo", str(encrypted), "--name", "vm-new", ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "claims to be unencrypted" in proc.stderr and "VMKEEP_PASSPHRASE" in proc.stderr, proc.stderr
    after = files(encrypted)
    assert {k: v for k, v in after.items() if k != "config.json"} == \
        {k: v for k, v in before.items() if k != "config.json"}  # nothing stored, plaintext or not
    key = encrypted.parent / "repo.key"
    with pytest.raises(RepositoryError, match="claims to be unencrypted"):
        Repository.open(FilesystemBackend(encrypted), Credentials(key_file=key))


@pytest.mark.parametrize("change", [
    lambda c: c.update(chunk_size=4 * MiB),
    lambda c: c["compression"].update(level=0),
    lambda c: c.update(id="0" * 32),
    lambda c: c.update(immutable_days=30),
    lambda c: c.update(created="2020-01-01T00:00:00+00:00"),
    lambda c: c["encryption"].update(extra="x"),
    lambda c: c.pop("mac"),
], ids=["chunk-size", "compression", "id", "immutable-days", "created", "encryption", "mac-removed"])
def test_any_change_to_the_config_is_refused(encrypted: Path, change: Callable[[dict[str, Any]], None]) -> None:
    config = config_of(encrypted)
    assert "mac" in config  # a new repository's config carries its MAC
    change(config)
    write_config(encrypted, config)
    before = files(encrypted)
    with pytest.raises(RepositoryError, match=r"config.json .*was modified") as refused:
        open_fs(encrypted)
    assert "restore" in str(refused.value)
    assert files(encrypted) == before


def test_changed_key_parameters_are_refused(encrypted: Path) -> None:
    config = config_of(encrypted)
    config["encryption"]["n"] = 2**14
    write_config(encrypted, config)
    with pytest.raises(RepositoryError, match="config.json"):
        open_fs(encrypted)


def legacy(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as vmkeep wrote it before configs were authenticated: no MAC, and the master
    secret (or key check) sealed to the old context."""
    old = {k: v for k, v in config.items() if k != "mac"}
    encryption = old["encryption"] = dict(config["encryption"])
    if encryption["mode"] == "passphrase":
        secret, _ = crypto.unwrap_secret(encryption, PASSPHRASE)
        salt, n, r, p = kdf.parameters(encryption)
        encryption["wrapped"] = crypto.seal(kdf.derive(PASSPHRASE, salt, n, r, p), secret,
                                            b"vmkeep master secret").hex()
    return old


def test_a_config_without_mac_opens_and_gets_one(encrypted: Path) -> None:
    """Repositories made before the MAC existed still open, and are upgraded by the first open
    with their key; from then on a change, or removing the MAC again, is refused."""
    config = legacy(config_of(encrypted))
    write_config(encrypted, config)
    with pytest.raises(VmkeepError):
        open_fs(encrypted, None)  # without the key: nothing can be checked, nothing is written
    assert config_of(encrypted) == config
    assert [m.name for m in open_fs(encrypted).list_points()] == ["vm-a"]
    upgraded = config_of(encrypted)
    assert "mac" in upgraded and upgraded["encryption"]["wrapped"] != config["encryption"]["wrapped"]
    assert {k: v for k, v in upgraded.items() if k not in ("mac", "encryption")} == \
        {k: v for k, v in config.items() if k != "encryption"}
    assert [m.name for m in open_fs(encrypted).list_points()] == ["vm-a"]  # and it opens as upgraded
    for change in (lambda c: c.update(chunk_size=2 * MiB), lambda c: c.pop("mac")):
        tampered = json.loads(json.dumps(upgraded))
        change(tampered)
        write_config(encrypted, tampered)
        with pytest.raises(RepositoryError, match="was modified"):
            open_fs(encrypted)


def test_a_key_file_config_without_mac_is_upgraded(tmp_path: Path) -> None:
    key = tmp_path / "repo.key"
    repo = Repository.init(FilesystemBackend(tmp_path / "repo"), chunk_size=MiB, compression=1, encrypt=True,
                           credentials=Credentials(key_file=key))
    secret = bytes.fromhex(json.loads(key.read_text())["secret"])
    config = config_of(tmp_path / "repo")
    config.pop("mac")
    config["encryption"]["key_check"] = crypto.RepositoryKeys.derive(secret, True).mac(b"check")  # as before
    write_config(tmp_path / "repo", config)
    opened = Repository.open(FilesystemBackend(tmp_path / "repo"), Credentials(key_file=key))
    assert opened.config.repo_id == repo.config.repo_id
    upgraded = config_of(tmp_path / "repo")
    assert "mac" in upgraded and upgraded["encryption"]["key_check"] != config["encryption"]["key_check"]
    upgraded.pop("mac")
    write_config(tmp_path / "repo", upgraded)
    with pytest.raises(RepositoryError, match="MAC was removed"):
        Repository.open(FilesystemBackend(tmp_path / "repo"), Credentials(key_file=key))


def test_s3_immutable_repository_config_is_authenticated(cli: Cli, s3_env: dict[str, str]) -> None:
    """config.json is outside Object Lock, so an old immutable repository is upgraded in place
    (a new version of the object) and a modified config is refused."""
    location = "s3://vmkeep-sec/imm"
    cli.run("repo", "init", location, "--encrypt", "--immutable-days", "1", env=s3_env)
    backend = open_backend(location)
    config = legacy(json.loads(backend.get("config.json")))
    backend.put("config.json", json.dumps(config).encode())
    Repository.open(open_backend(location), Credentials(PASSPHRASE))
    upgraded = json.loads(backend.get("config.json"))
    assert "mac" in upgraded
    upgraded["immutable_days"] = 0
    backend.put("config.json", json.dumps(upgraded).encode())
    with pytest.raises(RepositoryError, match="was modified"):
        Repository.open(open_backend(location), Credentials(PASSPHRASE))


def test_registered_repository_is_pinned(cli: Cli, tmp_path: Path) -> None:
    plain, other = tmp_path / "plain", tmp_path / "other"
    cli.run("repo", "init", str(plain), env=NO_PASSPHRASE)
    cli.run("repo", "init", str(other), env=NO_PASSPHRASE)
    opened = open_fs(plain, None)
    record = RepositoryRecord(name="site", location=str(plain), s3_endpoint=None, repo_id=opened.config.repo_id,
                              encrypted=False, passphrase_sealed=None)
    assert open_registered(record).config.repo_id == opened.config.repo_id
    (plain / "config.json").write_bytes((other / "config.json").read_bytes())  # another repository's config
    with pytest.raises(RepositoryError, match="catalog") as refused:
        open_registered(record)
    assert opened.config.repo_id in str(refused.value)

    # a repository registered as encrypted whose config now says it is not
    record.repo_id, record.encrypted = config_of(other)["id"], True
    before = files(plain)
    with pytest.raises(RepositoryError, match="encrypted"):
        open_registered(record)
    assert files(plain) == before


# -- item 11: malformed and moved manifests, constant-time MACs, scrypt bounds, keys -------------

MALFORMED = {
    "list": b"[1]",
    "body-list": b'{"manifest": [1], "mac": "00"}',
    "format-text": b'{"manifest": {"format": "one"}, "mac": "00"}',
    "format-unknown": b'{"manifest": {"format": 0}, "mac": "00"}',
    "mac-number": b'{"manifest": {"format": 1}, "mac": 5}',
}


def plant_malformed(repo: Repository) -> list[str]:
    """Malformed manifests, including one whose MAC is right but whose keys are missing."""
    keys = []
    for i, data in enumerate(MALFORMED.values()):
        key = f"points/bad/20260101T00000{i}Z-00000{i}.json"
        repo.backend.put(key, data)
        keys.append(key)
    body = {"format": 1, "name": "bad"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    key = "points/bad/20260101T000009Z-000009.json"
    repo.backend.put(key, json.dumps({"manifest": body, "mac": repo.keys.mac(canonical)}).encode())
    return [*keys, key]


def test_malformed_manifests_are_damaged(cli: Cli, encrypted: Path, database: str) -> None:
    repo = open_fs(encrypted)
    bad = plant_malformed(repo)
    proc = cli.run("points", "--repo", str(encrypted), ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "points/bad/" in proc.stderr and "repo verify" in proc.stderr
    assert [m.name for m in open_fs(encrypted).list_points("vm-a")] == ["vm-a"]  # other names unaffected
    upgrade(database)
    engine = make_engine(database)
    try:
        with Session(engine) as session:
            report = rebuild(session, repo, "site")
    finally:
        engine.dispose()
    assert report.points == 1 and sorted(k for k, _ in report.damaged) == sorted(bad)


def test_a_manifest_copied_to_another_key_is_damaged(cli: Cli, make_disk: Callable[..., Path],
                                                     encrypted: Path) -> None:
    backed_up(cli, make_disk, encrypted, "vm-b", "b")
    [a] = (encrypted / "points" / "vm-a").glob("*.json")
    [b] = (encrypted / "points" / "vm-b").glob("*.json")
    b.write_bytes(a.read_bytes())  # vm-a's point under vm-b's name
    proc = cli.run("points", "vm-b", "--repo", str(encrypted), ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and str(b.name) in proc.stderr, proc.stderr
    b.unlink()
    other_id = a.with_name("20260101T000000Z-abcdef.json")
    other_id.write_bytes(a.read_bytes())  # vm-a's point under another point id
    points, damaged = open_fs(encrypted).scan_points("vm-a")
    assert [m.point_id for m in points] == [a.stem] and [k for k, _ in damaged] == [f"points/vm-a/{other_id.name}"]


def test_macs_are_compared_in_constant_time(encrypted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[object] = []
    original = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append(a)
        return original(a, b)

    monkeypatch.setattr(crypto.hmac, "compare_digest", spy)
    repo = open_fs(encrypted)  # the config's MAC
    after_open = len(compared)
    point = repo.find_point("vm-a")  # the manifest's MAC
    after_manifest = len(compared)
    repo.load_index(point, "disk")  # the index's MAC
    assert 0 < after_open < after_manifest < len(compared)


@pytest.mark.parametrize("cost", [{"n": 2**30}, {"p": 2**20}, {"r": 2**16}, {"n": 3}, {"n": "x"}],
                         ids=["huge-n", "huge-p", "huge-r", "n-not-power-of-two", "n-not-a-number"])
def test_scrypt_costs_are_bounded(encrypted: Path, cost: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_of(encrypted)
    config["encryption"].update(cost)
    write_config(encrypted, config)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            open_fs(encrypted)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "scrypt ran with the config's parameters"
    assert time.monotonic() - started < 5
    [error] = outcome
    assert isinstance(error, RepositoryError) and "scrypt" in str(error) and "config.json" in str(error), error
    monkeypatch.setenv("VMKEEP_PASSPHRASE", PASSPHRASE.decode())
    kdf._started.clear()
    key_prefetch.prefetch(["points", "--repo", str(encrypted)])
    assert not kdf._started  # no head start with them either


BAD_KEYS = ["../outside", "chunks/../../outside", "/etc/passwd", "", "chunks//x", "chunks/x/", "a/\0b", "./config.json"]


@pytest.fixture
def fs_backend(tmp_path: Path) -> Iterator[FilesystemBackend]:
    (tmp_path / "outside").write_bytes(b"not the repository's")
    root = tmp_path / "repo"
    root.mkdir()
    yield FilesystemBackend(root)


@pytest.mark.parametrize("key", BAD_KEYS)
def test_filesystem_backend_refuses_keys_leaving_the_repository(fs_backend: FilesystemBackend, key: str,
                                                                 tmp_path: Path) -> None:
    before = files(tmp_path)
    for call in (lambda: fs_backend.get(key), lambda: fs_backend.put(key, b"x"), lambda: fs_backend.stat(key),
                 lambda: fs_backend.touch(key), lambda: fs_backend.delete(key),
                 lambda: fs_backend.delete_if_older(key, time.time() + 60)):
        with pytest.raises(RepositoryError, match="object key"):
            call()
    if key not in ("", "chunks/x/"):  # a listing's prefix may be empty or end with a slash
        with pytest.raises(RepositoryError, match="object key"):
            list(fs_backend.list(key))
    assert files(tmp_path) == before


def test_s3_backend_refuses_the_same_keys() -> None:
    backend = S3Backend("s3://bucket/prefix", endpoint="http://127.0.0.1:1")
    for key in BAD_KEYS:
        with pytest.raises(RepositoryError, match="object key"):
            backend.get(key)


def test_a_forged_index_key_never_reads_outside(cli: Cli, make_disk: Callable[..., Path], tmp_path: Path) -> None:
    """In an unencrypted repository anyone can compute a manifest's MAC: its index keys must still
    stay inside the repository."""
    repo_dir = tmp_path / "plain"
    cli.run("repo", "init", str(repo_dir), env=NO_PASSPHRASE)
    backed_up(cli, make_disk, repo_dir, "vm", "v", env=NO_PASSPHRASE)
    repo = open_fs(repo_dir, None)
    point = repo.find_point("vm")
    secret = tmp_path / "secret.idx"
    secret.write_bytes(repo.backend.get(point.disks["disk"].index_key))
    point.disks["disk"].index_key = "../secret.idx"
    path = repo_dir / "points" / "vm" / f"{point.point_id}.json"
    path.unlink()
    repo.commit_point(point)
    with pytest.raises(RepositoryError, match="object key"):
        open_fs(repo_dir, None).load_index(open_fs(repo_dir, None).find_point("vm"), "disk")
