"""File-level restore against a hostile guest and a hostile output directory (issue 22, item 5):
setuid/setgid/sticky bits and world-write dropped unless --preserve-owner (root only), the output
tree written through directory descriptors so no planted or swapped symlink is ever followed, and
guest names with control characters or bytes that are not UTF-8 printed escaped."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import VMKEEP, Cli, MiB, fresh_cli

MTIME = 1577934245.0  # 2020-01-02 03:04:05 UTC
EVIL = "evil\x1b[31mred\nline"  # an escape sequence and a newline in one guest name
BAD = os.fsdecode(b"bad\xff\xfename")  # a guest name that is not UTF-8
EVIL_SHOWN = "evil\\x1b[31mred\\nline"
BAD_SHOWN = "bad\\xff\\xfename"


def _put(path: Path, data: bytes, mode: int, owner: tuple[int, int] = (0, 0)) -> None:
    path.write_bytes(data)
    os.chown(path, *owner)  # before chmod: chown clears setuid/setgid
    path.chmod(mode)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cli, str]]:
    """One ext4 disk with every special file, backed up once; yields (cli, repo)."""
    base = tmp_path_factory.mktemp("hostile")
    tree = base / "tree"
    for d in ("bin", "shared", "names", "etc", "race/a"):
        (tree / d).mkdir(parents=True)
    _put(tree / "bin" / "su", b"#!/bin/sh\n", 0o4755)
    _put(tree / "bin" / "sg", b"#!/bin/sh\n", 0o2755)
    (tree / "shared").chmod(0o1777)
    _put(tree / "shared" / "open", b"anyone\n", 0o666)
    _put(tree / "names" / "owned", b"owned\n", 0o640, (1234, 5678))
    os.chown(tree / "names", 1234, 5678)
    _put(tree / "names" / EVIL, b"evil\n", 0o644)
    _put(tree / "names" / BAD, b"bad\n", 0o644)
    _put(tree / "etc" / "app.conf", b"key=value\n", 0o644)
    _put(tree / "race" / "a" / "f", b"f\n", 0o644)
    (tree / "race" / "a").chmod(0o751)
    _put(tree / "race" / "b.bin", os.urandom(8 * MiB), 0o644)
    for p in [*tree.rglob("*"), tree]:
        os.utime(p, (MTIME, MTIME))
    image = base / "fs.img"
    subprocess.run(["truncate", "-s", str(64 * MiB), str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(image)], check=True)
    cli = fresh_cli()
    repo = str(base / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    cli.run("disk", "backup", str(image), "--repo", repo, "--name", "fsvm", "--format", "raw")
    yield cli, repo


def _get(cli: Cli, repo: str, path: str, out: Path, *extra: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return cli.run("files", "get", "fsvm", path, "--repo", repo, "--disk", "disk", "--output", str(out), *extra,
                   "--json", ok=ok)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_dangerous_bits_dropped_unless_preserve_owner(hostile: tuple[Cli, str], tmp_path: Path) -> None:
    cli, repo = hostile
    out = tmp_path / "out"
    proc = _get(cli, repo, "/", out)
    assert "\x1b" not in proc.stdout and "\\u001b" not in proc.stdout  # names printed escaped, not raw
    written = json.loads(proc.stdout)["written"]
    assert str(out.resolve() / "names" / EVIL_SHOWN) in written and str(out.resolve() / "names" / BAD_SHOWN) in written
    assert _mode(out / "bin" / "su") == 0o755 and _mode(out / "bin" / "sg") == 0o755  # no setuid/setgid root binary
    assert _mode(out / "shared") == 0o775 and _mode(out / "shared" / "open") == 0o664  # nothing world-writable
    me = (os.geteuid(), os.getegid())
    owned = out / "names" / "owned"
    assert (owned.stat().st_uid, owned.stat().st_gid) == me  # the user running vmkeep owns the copy
    assert _mode(owned) == 0o640 and owned.stat().st_mtime == MTIME and (out / "shared").stat().st_mtime == MTIME
    # the real names, bytes and all, on disk
    assert (out / "names" / EVIL).read_bytes() == b"evil\n" and (out / "names" / BAD).read_bytes() == b"bad\n"

    kept = tmp_path / "kept"
    _get(cli, repo, "/", kept, "--preserve-owner")
    assert _mode(kept / "bin" / "su") == 0o4755 and _mode(kept / "bin" / "sg") == 0o2755
    assert _mode(kept / "shared") == 0o1777 and _mode(kept / "shared" / "open") == 0o666
    owned = kept / "names" / "owned"
    assert (owned.stat().st_uid, owned.stat().st_gid) == (1234, 5678) and _mode(owned) == 0o640
    assert (kept / "names").stat().st_uid == 1234 and (kept / "bin" / "su").stat().st_uid == 0
    assert owned.stat().st_mtime == MTIME

    # root only: anyone else is told so before anything is opened
    refused = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              VMKEEP, "files", "get", "fsvm", "/", "--repo", repo, "--disk", "disk",
                              "--output", str(tmp_path / "nobody"), "--preserve-owner"],
                             capture_output=True, text=True, env=cli.env, timeout=120)
    assert refused.returncode == 2 and "--preserve-owner" in refused.stderr and "root" in refused.stderr, \
        refused.stderr
    assert not (tmp_path / "nobody").exists()


def test_a_symlink_planted_in_the_output_is_never_followed(hostile: tuple[Cli, str], tmp_path: Path) -> None:
    cli, repo = hostile
    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "etc").symlink_to(victim)
    failed = _get(cli, repo, "/etc", out, ok=False)
    assert failed.returncode != 0 and "symbolic link" in failed.stderr, failed.stderr
    assert list(victim.iterdir()) == []
    assert os.readlink(out / "etc") == str(victim)


def test_a_directory_swapped_for_a_symlink_mid_copy_is_never_followed(hostile: tuple[Cli, str],
                                                                      tmp_path: Path) -> None:
    """Another local user swaps an already restored directory for a link to theirs while the copy
    runs: the directory's mode and times are set through its descriptor, not its path."""
    cli, repo = hostile
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    os.utime(victim, (1e9, 1e9))
    out = tmp_path / "out"
    swapped = threading.Event()

    def attacker() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (out / "race" / "b.bin").exists():  # a/ is done, b.bin is being copied
                (out / "race" / "a").rename(out / "race" / "a.moved")
                (out / "race" / "a").symlink_to(victim)
                swapped.set()
                return
            time.sleep(0.0005)

    thread = threading.Thread(target=attacker)
    thread.start()
    try:
        _get(cli, repo, "/race", out)
    finally:
        thread.join()
    assert swapped.is_set()
    assert _mode(victim) == 0o700 and victim.stat().st_mtime == 1e9  # untouched
    assert _mode(out / "race" / "a.moved") == 0o751 and (out / "race" / "a.moved").stat().st_mtime == MTIME


def test_names_with_control_characters_are_printed_escaped(hostile: tuple[Cli, str]) -> None:
    cli, repo = hostile
    listed = cli.run("files", "ls", "fsvm", "/names", "--repo", repo, "--disk", "disk")
    assert "\x1b" not in listed.stdout and EVIL_SHOWN in listed.stdout and BAD_SHOWN in listed.stdout, listed.stdout
    entries = cli.json("files", "ls", "fsvm", "/names", "--repo", repo, "--disk", "disk")["entries"]
    assert {e["path"] for e in entries} == {"/names/owned", f"/names/{EVIL_SHOWN}", f"/names/{BAD_SHOWN}"}
    owned = next(e for e in entries if e["path"] == "/names/owned")
    assert (owned["uid"], owned["gid"], owned["mode"], owned["mtime"]) == (1234, 5678, 0o640, MTIME)

    found = cli.run("files", "find", "fsvm", "*", "--repo", repo, "--disk", "disk", "--json")
    assert "\x1b" not in found.stdout and "\\u001b" not in found.stdout
    paths = {m["path"] for m in json.loads(found.stdout)["matches"]}
    assert {f"/names/{EVIL_SHOWN}", f"/names/{BAD_SHOWN}", "/bin/su"} <= paths


def test_shown_escapes_what_could_drive_a_terminal() -> None:
    from vmkeep.engine.files import shown

    assert shown("/etc/nginx/nginx.conf") == "/etc/nginx/nginx.conf" and shown("café ☕") == "café ☕"
    assert shown(f"/{EVIL}") == f"/{EVIL_SHOWN}" and shown(BAD) == BAD_SHOWN
    assert shown("a\\b\x7f\x00\r\t") == "a\\\\b\\x7f\\x00\\r\\t"
    assert shown("c1\x85\x9b[2J") == "c1\\u0085\\u009b[2J"  # C1 (NEL, CSI) are not bytes: told apart from \\x85
    assert shown("txt.\u202eexe") == "txt.\\u202eexe" and shown("line\u2028sep") == "line\\u2028sep"
