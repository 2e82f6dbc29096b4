"""The executable starts the repository's scrypt before its modules load; opening the repository
then uses that derivation instead of deriving again, and a different passphrase still fails."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import VMKEEP, fresh_cli
from vmkeep.cli.key_prefetch import _arguments, prefetch
from vmkeep.errors import WrongPassphrase
from vmkeep.repository import kdf
from vmkeep.repository.backends.fs import FilesystemBackend
from vmkeep.repository.config import Credentials
from vmkeep.repository.repo import Repository

PASSPHRASE = b"correct horse battery staple"


def make_repo(path: Path, *, encrypt: bool = True) -> Path:
    Repository.init(FilesystemBackend(path), chunk_size=1 << 20, compression=1, encrypt=encrypt,
                    credentials=Credentials(passphrase=PASSPHRASE))
    kdf._derived.clear()  # what follows runs as another process would: nothing derived yet
    return path


@pytest.fixture(autouse=True)
def no_derivation_started() -> Iterator[None]:
    """Each test starts, and leaves, with no background derivation pending and no key kept."""
    kdf._started.clear()
    kdf._derived.clear()
    yield
    kdf._started.clear()
    kdf._derived.clear()


def pending() -> list[kdf._Derivation]:
    return list(kdf._started.values())


@pytest.mark.parametrize(("argv", "candidates", "passfile"), [
    (["disk", "backup", "img", "--repo", "/r", "--name", "n"], ["disk", "backup", "img", "/r", "n"], None),
    (["backup", "vm1", "--repo=/r", "--passphrase-file", "/p"], ["backup", "vm1", "/r"], "/p"),
    (["repo", "info", "--passphrase-file=/p", "/r"], ["repo", "info", "/r"], "/p"),
    (["points", "-r", "/r", "--json"], ["points", "/r"], None),
])
def test_arguments_that_may_name_a_repository(argv: list[str], candidates: list[str], passfile: str | None) -> None:
    found, passphrase_file = _arguments(argv)
    assert found == candidates
    assert passphrase_file == (Path(passfile) if passfile else None)


def test_prefetched_key_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "repo")
    monkeypatch.setenv("VMKEEP_PASSPHRASE", PASSPHRASE.decode())
    prefetch(["repo", "info", str(repo)])
    [job] = pending()  # started in the background, for this passphrase
    assert job.inputs[0] == PASSPHRASE and job.daemon
    opened = Repository.open(FilesystemBackend(repo), Credentials.from_env())
    assert opened.list_points() == []
    assert pending() == []  # opening joined that derivation instead of running its own
    assert job.key is not None and not job.is_alive()


def test_a_different_passphrase_is_still_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "repo")
    monkeypatch.setenv("VMKEEP_PASSPHRASE", PASSPHRASE.decode())
    prefetch(["repo", "info", str(repo)])
    with pytest.raises(WrongPassphrase):
        Repository.open(FilesystemBackend(repo), Credentials(passphrase=b"not the passphrase"))
    assert len(pending()) == 1  # the head start for the other passphrase was not used


def test_passphrase_file_is_read_as_the_command_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "repo")
    passfile = tmp_path / "pass"
    passfile.write_bytes(PASSPHRASE + b"\n")
    monkeypatch.delenv("VMKEEP_PASSPHRASE", raising=False)
    prefetch(["repo", "verify", "--passphrase-file", str(passfile), str(repo)])
    assert [job.inputs[0] for job in pending()] == [PASSPHRASE]
    Repository.open(FilesystemBackend(repo), Credentials.from_env(passfile))
    assert pending() == []


@pytest.mark.parametrize("case", ["plain repository", "no passphrase", "not a repository", "object storage"])
def test_nothing_is_started_without_a_local_passphrase_repository(case: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKEEP_PASSPHRASE", PASSPHRASE.decode())
    location = str(tmp_path / "repo")
    if case == "plain repository":
        make_repo(tmp_path / "repo", encrypt=False)
    elif case == "no passphrase":
        make_repo(tmp_path / "repo")
        monkeypatch.delenv("VMKEEP_PASSPHRASE")
    elif case == "not a repository":
        (tmp_path / "repo").mkdir()
        (tmp_path / "repo" / "config.json").write_text("{not json")
    else:
        location = "s3://bucket/prefix"
    prefetch(["repo", "info", location])
    assert pending() == []


def test_the_executable_starts_with_the_prefetch(tmp_path: Path) -> None:
    """`vmkeep` runs through the launcher, and a wrong passphrase still gets its clear error."""
    cli = fresh_cli()
    repo = tmp_path / "repo"
    cli.run("repo", "init", str(repo), "--encrypt")
    assert cli.json("repo", "info", str(repo))["points"] == 0
    proc = cli.run("repo", "info", str(repo), ok=False, env={"VMKEEP_PASSPHRASE": "wrong"})
    assert proc.returncode != 0 and "passphrase does not unlock" in proc.stderr
    script = Path(VMKEEP).read_text()
    assert "vmkeep.cli.launch" in script, "reinstall: ./scripts/setup"
    assert subprocess.run([VMKEEP, "--help"], capture_output=True).returncode == 0


def test_a_running_process_derives_a_repositorys_key_once(tmp_path: Path) -> None:
    """A proxy's worker opens the repository for every job: the key is derived the first time only,
    and a wrong passphrase is refused however often the right one was used."""
    repo = make_repo(tmp_path / "repo")
    Repository.open(FilesystemBackend(repo), Credentials(passphrase=PASSPHRASE))
    [(inputs, key)] = kdf._derived.items()
    assert inputs[0] == PASSPHRASE
    assert Repository.open(FilesystemBackend(repo), Credentials(passphrase=PASSPHRASE)).list_points() == []
    assert kdf.derive(*inputs) is key  # the same object: not derived again
    with pytest.raises(WrongPassphrase):
        Repository.open(FilesystemBackend(repo), Credentials(passphrase=b"not the passphrase"))
    for i in range(kdf.DERIVED_KEPT + 1):  # bounded: the oldest keys go
        kdf.derive(b"other %d" % i, b"salt", 2**10, 8, 1)
    assert inputs not in kdf._derived and len(kdf._derived) == kdf.DERIVED_KEPT
