"""The VMKEEP_* variables: one typed settings object declares them (vmkeep.settings), the README's
table documents each, and the light commands and repository commands still start without pydantic."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Cli, free_port
from vmkeep.settings import FOR_CHILDREN, QUICK_FIELDS, quick, secret, settings
from vmkeep.settings.model import Settings, env_names

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "vmkeep"
PACKAGE = SOURCE / "settings"
NAME = re.compile(r"\bVMKEEP_[A-Z][A-Z0-9_]*\b")


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings these tests read (under their changed environment) stay out of other tests'."""
    monkeypatch.setattr("vmkeep.settings._cached", None)


def source_files() -> list[Path]:
    return sorted(p for p in SOURCE.rglob("*.py") if "__pycache__" not in p.parts)


def names_in_source() -> dict[str, list[str]]:
    """Each VMKEEP_ name written in vmkeep/ and the files that name it."""
    found: dict[str, list[str]] = {}
    for path in source_files():
        for name in set(NAME.findall(path.read_text())):
            found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def readme_rows() -> dict[str, str]:
    """Each variable of the README's table "Environment variables" and its row."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Environment variables\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if line.startswith("| `VMKEEP_"):
            for name in NAME.findall(line.split("|")[1]):
                rows[name] = line
    return rows


def test_every_variable_named_in_the_source_is_a_settings_field() -> None:
    known = set(env_names()) | set(FOR_CHILDREN)
    unknown = {name: files for name, files in names_in_source().items() if name not in known}
    assert not unknown, f"add these to vmkeep/settings.py and the README's table: {unknown}"


def test_only_the_settings_module_reads_the_environment_for_them() -> None:
    reads = re.compile(r"(environ\.get\(|environ\[|getenv\(|envvar=)\s*[\"']VMKEEP_")
    readers = [str(p.relative_to(ROOT)) for p in source_files()
               if PACKAGE not in p.parents and reads.search(p.read_text())]
    assert readers == [], f"read VMKEEP_* through vmkeep.settings: {readers}"


def test_settings_is_imported_lazily() -> None:
    """pydantic costs ~100 ms: only the settings' model imports pydantic-settings, and no module
    imports the settings at its top, so commands that read no variable (and every --help) never
    load it (the server's FastAPI models bring their own pydantic)."""
    top_level = re.compile(r"^(from vmkeep\.settings[. ]|import vmkeep\.settings|from vmkeep import settings)",
                           re.MULTILINE)
    pydantic = re.compile(r"^\s*(from|import) pydantic_settings\b", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in source_files() if PACKAGE not in p.parents and
                 (top_level.search(p.read_text()) or pydantic.search(p.read_text()))]
    assert offenders == []


def test_every_field_has_a_readme_row_and_every_row_a_field() -> None:
    rows = readme_rows()
    documented = set(env_names()) | set(FOR_CHILDREN)
    assert set(rows) == documented, (f"missing rows: {documented - set(rows)}; rows of no variable: "
                                     f"{set(rows) - documented}")
    for name, line in rows.items():
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 3 and all(cells), f"{name}: a row has the variable, what it is for, its default"


def test_every_field_is_described_and_optional() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert not field.is_required(), f"{name}: every variable may be unset"


def test_exact_names_empty_means_unset_and_secrets_stay_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in env_names():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VMKEEP_PASSPHRASE", "s3cret phrase")
    monkeypatch.setenv("VMKEEP_SCRATCH_DIR", "")  # as before: an empty variable is no directory
    monkeypatch.setenv("vmkeep_token", "lower-case")  # as os.environ.get: the exact name only
    monkeypatch.setenv("VMKEEP_NBD_TLS_DIR", "/srv/certs")
    s = Settings()
    assert secret(s.passphrase) == "s3cret phrase" and "s3cret" not in repr(s) and "s3cret" not in str(s)
    assert s.scratch_dir is None and s.token is None and s.nbd_tls_dir == Path("/srv/certs")
    assert secret(None) is None


def test_a_non_utf8_path_is_kept_as_the_os_gives_it(monkeypatch: pytest.MonkeyPatch) -> None:
    odd = os.fsdecode(b"/srv/scratch-\xff")
    monkeypatch.setenv("VMKEEP_SCRATCH_DIR", odd)
    assert settings(refresh=True).scratch_dir == Path(odd)


def test_cached_until_refreshed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKEEP_SMTP_USER", "first")
    first = settings(refresh=True)
    monkeypatch.setenv("VMKEEP_SMTP_USER", "second")
    assert settings() is first and first.smtp_user == "first"
    assert settings(refresh=True).smtp_user == "second" and settings().smtp_user == "second"


def test_readers_that_follow_a_changed_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The passphrase and the VDDK paths are read afresh: the demo sets a passphrase for itself, and
    tests point them elsewhere while the process runs."""
    from vmkeep.repository.kdf import read_passphrase
    from vmkeep.transport.nbdkit import Vddk

    settings()  # a cached object made before the changes below
    monkeypatch.setenv("VMKEEP_PASSPHRASE", "one")
    assert read_passphrase(None) == b"one"
    monkeypatch.setenv("VMKEEP_PASSPHRASE", "")
    assert read_passphrase(None) is None
    monkeypatch.setenv("VMKEEP_NBDKIT_PLUGIN_DIR", str(tmp_path))
    (tmp_path / "nbdkit-vddk-plugin.so").touch()
    monkeypatch.setenv("VMKEEP_VDDK_DIR", str(tmp_path / "vddk"))
    missing = Vddk.find()
    assert isinstance(missing, str) and str(tmp_path / "vddk") in missing


def test_server_and_s3_endpoint_come_from_the_environment(cli: Cli) -> None:
    port = free_port()
    jobs = cli.run("jobs", ok=False, env={"VMKEEP_SERVER": f"http://127.0.0.1:{port}"})
    assert jobs.returncode == 1 and f"cannot reach the vmkeep server at http://127.0.0.1:{port}" in jobs.stderr
    assert "give --server URL (or VMKEEP_SERVER)" in cli.run("jobs", ok=False).stderr
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1",
           "VMKEEP_S3_ENDPOINT": f"http://127.0.0.1:{port}"}
    points = cli.run("points", "--repo", "s3://nowhere/repo", ok=False, env=env)
    assert "cannot reach the S3 endpoint" in points.stderr and f"127.0.0.1:{port}" in points.stderr, points.stderr


def test_the_settings_import_nothing_of_vmkeep_and_the_front_no_pydantic() -> None:
    probe = ("import sys, vmkeep.settings; print('pydantic' in sys.modules); import vmkeep.settings.model; "
             "print(sorted(m for m in sys.modules if m.startswith('vmkeep') and m not in "
             "('vmkeep', 'vmkeep.settings', 'vmkeep.settings.model')))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "[]"]


@pytest.mark.parametrize("value", [None, "", "a value", os.fsdecode(b"caf\xe9 \xff")])
def test_quick_reads_what_the_typed_field_holds(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    for field in QUICK_FIELDS:
        annotation = str(Settings.model_fields[field].annotation)
        assert "str" in annotation or "SecretStr" in annotation, f"{field}: quick reads text fields only"
        if value is None:
            monkeypatch.delenv(f"VMKEEP_{field.upper()}", raising=False)
        else:
            monkeypatch.setenv(f"VMKEEP_{field.upper()}", value)
        typed = getattr(settings(refresh=True), field)
        assert quick(field) == (typed.get_secret_value() if hasattr(typed, "get_secret_value") else typed)


def test_a_repository_command_starts_without_pydantic(cli: Cli, tmp_path: Path) -> None:
    """Every repository command reads the passphrase and the S3 endpoint before anything else
    needs pydantic; the key derivation the launcher starts first must not wait ~100 ms for it."""
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    probe = ("import sys; sys.argv = ['vmkeep', 'points', '--repo', sys.argv[1]]\n"
             "from vmkeep.cli.launch import main\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print('PYDANTIC:', 'pydantic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, repo], capture_output=True, text=True, env=cli.env, cwd=ROOT)
    assert out.stdout.rstrip().endswith("PYDANTIC: False"), out.stdout + out.stderr
