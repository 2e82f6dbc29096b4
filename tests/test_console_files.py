"""File-level restore from the console and the API, on a real point of a real ext4 disk (the file
restore tests' crafted filesystem, backed up into an encrypted repository the master registered):
browse in Chromium, download a file and a folder (tar), search one point and across the VM's
points, the API's twins, the auditor refused, the sessions closed afterwards.

libguestfs is heavy: run under ``flock /tmp/vmkeep-heavy.lock``. The module opens two points'
filesystems in all (the browser and the API share the admin's session of the first)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tests.conftest import MiB, fresh_cli
from tests.console_support import AUDITOR, form_login, log_in, shoot
from tests.test_files import MTIME, backed_up, guest_fs
from tests.test_server import Server
from vmkeep.engine.files import Entry
from vmkeep.errors import VmkeepError
from vmkeep.server.app import create_app
from vmkeep.server.file_access import _member, disposition
from vmkeep.server.file_sessions import FileSessions, PointRef, RegisteredRepo, SessionsFull

__all__ = ["guest_fs"]  # the crafted ext4 disk, a module fixture shared with tests/test_files.py
LATIN1_CONTENT = b"a name in Latin-1, as old Samba shares wrote them\n"
OPENING = 120_000  # ms: a point's filesystems open in 10-30 s under emulation, slower with the machine busy


@pytest.fixture(scope="module")
def points(console_master: Server, console_api: httpx.Client, guest_fs: tuple[Path, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two points of VM fsvm in an encrypted repository registered through the API (its passphrase
    sealed): the ids of the newest and the older one, and the repository's path. The disk is the
    file restore tests' tree plus /etc/caf\\xe9.txt, a name that is not UTF-8."""
    cli = fresh_cli()
    base = tmp_path_factory.mktemp("files")
    tree = base / "tree"
    shutil.copytree(guest_fs[0], tree, symlinks=True)
    (Path(os.fsdecode(os.fsencode(tree / "etc") + b"/caf\xe9.txt"))).write_bytes(LATIN1_CONTENT)
    image = base / "fs.img"
    subprocess.run(["truncate", "-s", str(32 * MiB), str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(image)], check=True)
    repo = base / "repo"
    older = backed_up(cli, image, str(repo))
    newest = str(cli.json("disk", "backup", str(image), "--repo", str(repo), "--name", "fsvm", "--format",
                          "raw")["point"])
    reply = console_api.post("/api/repositories", json={"name": "files", "location": str(repo),
                                                       "passphrase": cli.env["VMKEEP_PASSPHRASE"]})
    assert reply.status_code == 201, reply.text
    listed = {p["point_id"]: p for p in console_api.get("/api/points", params={"vm": "fsvm"}).json()}
    assert set(listed) == {older, newest}
    yield {"older": older, "newest": newest, "repo": repo}


def our_processes(repo: Path) -> list[str]:
    """The exports (nbdkit) serving this module's repository."""
    found = subprocess.run(["pgrep", "-af", str(repo)], capture_output=True, text=True).stdout.splitlines()
    return [line for line in found if "nbdkit" in line]


def test_browse_download_and_search_in_the_browser(chromium: Any, console_master: Server, console_api: httpx.Client,
                                                    points: dict[str, Any], guest_fs: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    tree, _image = guest_fs
    page = log_in(chromium, console_master)
    problems: list[str] = []
    page.on("console", lambda message: problems.extend([message.text] if message.type == "error" else []))
    page.goto(f"{console_master.url}/points/{points['newest']}/files")
    assert "Opening the point's filesystems" in page.inner_text("#files-area")  # at once, then polled
    page.locator("table.files-table").wait_for(timeout=OPENING)
    names = page.locator("td.files-name").all_inner_texts()
    assert names[:2] == ["data/", "etc/"] and any(n.startswith("escape") and "→ ../../" in n for n in names)
    assert "ext4" in page.inner_text("#files-area")
    page.get_by_role("link", name="etc/").click()
    conf_row = page.locator("tr[data-path='/etc/app.conf']")
    conf_row.wait_for()
    cells = conf_row.locator("td").all_inner_texts()
    assert cells[1] == "file" and cells[2] == "10 B"  # binary units
    assert "2020" in cells[3] and "UTC" not in cells[3]  # 2020-01-02 03:04:05 UTC, in the browser's zone (India)
    assert page.get_by_role("navigation", name="Folder").inner_text().split() == ["/", "etc"]
    with page.expect_download() as got:  # the link keeps the name's bytes; the server reads them as they are
        page.get_by_role("link", name="Download caf\\xe9.txt").click()
    assert Path(got.value.path()).read_bytes() == LATIN1_CONTENT

    page.get_by_role("navigation", name="Folder").get_by_role("link", name="/", exact=True).click()
    page.get_by_role("link", name="data/").click()
    page.get_by_role("link", name="deep/").click()
    page.locator("tr[data-path='/data/deep/note.txt']").wait_for()
    shoot(page, "files")
    with page.expect_download() as got:
        page.get_by_role("link", name="Download note.txt").click()
    note = tmp_path / "note.txt"
    got.value.save_as(note)
    assert got.value.suggested_filename == "note.txt"
    assert note.read_bytes() == (tree / "data" / "deep" / "note.txt").read_bytes()

    page.get_by_role("navigation", name="Folder").get_by_role("link", name="data").click()
    with page.expect_download() as got:
        page.get_by_role("link", name="Download blob.bin").click()
    blob = tmp_path / "blob.bin"
    got.value.save_as(blob)
    original = (tree / "data" / "blob.bin").read_bytes()
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == hashlib.sha256(original).hexdigest()

    with page.expect_download() as got:
        page.get_by_role("link", name="Download this folder (tar)").click()
    assert got.value.suggested_filename == "data.tar"
    archive = tmp_path / "data.tar"
    got.value.save_as(archive)
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == ["data", "data/blob.bin", "data/deep", "data/deep/note.txt"]
        assert all(m.uid == 0 and m.uname == "" and m.mtime == MTIME for m in members.values())
        assert tar.extractfile("data/blob.bin").read() == original  # type: ignore[union-attr]
        assert tar.extractfile("data/deep/note.txt").read() == b"deep inside\n"  # type: ignore[union-attr]

    # search this point, then the VM's newest points (the older one opens meanwhile; results come as they are found)
    page.get_by_label("Find by name or glob").fill("*.conf")
    page.get_by_role("button", name="Search").click()
    assert page.locator("tr[data-match]").evaluate_all("rows => rows.map(r => r.dataset.match)") == ["/etc/app.conf"]
    page.locator("#files-points").select_option("3")
    page.get_by_role("button", name="Search").click()
    found = page.locator("#files-search")
    found.locator("h2", has_text="in 2 of the newest 2 points").wait_for(timeout=2 * OPENING)
    assert found.locator("tr[data-match='/etc/app.conf']").count() == 2
    shoot(page, "files-search")
    with page.expect_download() as got:
        found.get_by_role("link", name="Download /etc/app.conf").last.click()  # from the older point
    assert Path(got.value.path()).read_bytes() == b"key=value\n"
    found.get_by_role("link", name="/etc/app.conf").first.click()  # to its folder in the newest point
    page.locator("tr[data-path='/etc/app.conf']").wait_for()
    assert problems == []

    # each download is audited with its path
    entries = [e for e in console_api.get("/api/audit", params={"limit": 100}).json() if e["action"] == "file-download"]
    paths = [e["detail"]["path"] for e in entries]
    assert {"/data/deep/note.txt", "/data/blob.bin", "/data", "/etc/app.conf"} <= set(paths)
    assert all(e["user"] == "admin" and e["target"].startswith("fsvm@") for e in entries)

    # the older point's files closed from its page (the newest stays open for the API's test)
    page.goto(f"{console_master.url}/points/{points['older']}/files")
    page.locator("table.files-table").wait_for()
    exports = len(our_processes(points["repo"]))
    page.get_by_role("button", name="Close the point's files").click()
    page.wait_for_url(f"{console_master.url}/points/vm/fsvm")
    assert len(our_processes(points["repo"])) == exports - 1
    page.context.close()


def test_the_api_lists_downloads_and_searches(console_master: Server, console_api: httpx.Client,
                                              points: dict[str, Any]) -> None:
    point = points["newest"]
    listed = console_api.get(f"/api/points/{point}/files", params={"path": "/etc"}, timeout=180)
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["vm"] == "fsvm" and body["filesystems"][0]["kind"] == "ext4" and body["path"] == "/etc"
    conf = {e["name"]: e for e in body["entries"]}["app.conf"]
    assert conf["kind"] == "file" and conf["size"] == 10 and conf["mode"] == 0o640
    root = {e["name"]: e for e in console_api.get(f"/api/points/{point}/files").json()["entries"]}
    assert root["hostetc"]["kind"] == "link" and root["hostetc"]["target"] == "/etc"  # never followed

    one = console_api.get(f"/api/points/{point}/files/download", params={"path": "/etc/app.conf"})
    assert one.status_code == 200 and one.content == b"key=value\n"
    assert one.headers["content-disposition"].startswith('attachment; filename="app.conf"')
    whole = console_api.get(f"/api/points/{point}/files/download", params={"path": "/"})
    with tarfile.open(fileobj=io.BytesIO(whole.content)) as tar:
        escape = tar.getmember("fsvm/escape")
        assert escape.issym() and escape.linkname == "../../../../../../tmp/vmkeep-escape-target"
        assert tar.getmember("fsvm/etc/app.conf").mode == 0o640
        assert all(m.name.startswith("fsvm") and ".." not in m.name.split("/") for m in tar.getmembers())
    missing = console_api.get(f"/api/points/{point}/files", params={"path": "/no/such"})
    assert missing.status_code == 404 and "No such file" in missing.text
    assert console_api.get(f"/api/points/{point}/files", params={"path": "etc"}).status_code == 400

    hits = console_api.get(f"/api/points/{point}/files/search", params={"pattern": "note.*"}).json()
    assert [(m["point"], m["path"]) for m in hits["matches"]] == [(point, "/data/deep/note.txt")]
    across = console_api.get("/api/vms/fsvm/files/search", params={"pattern": "*.conf", "points": 1}).json()
    assert across["points_searched"] == [point] and len(across["matches"]) == 1
    schema = console_api.get("/openapi.json").json()["paths"]
    for path in ("/api/points/{point}/files", "/api/points/{point}/files/download",
                 "/api/points/{point}/files/search", "/api/vms/{vm}/files/search"):
        assert "files" in schema[path]["get"]["tags"], path
    assert console_api.delete(f"/api/points/{point}/files").status_code == 204
    assert console_api.delete(f"/api/points/{point}/files").status_code == 404  # closed already
    assert our_processes(points["repo"]) == []


def test_an_auditor_cannot_browse_or_download(chromium: Any, console_master: Server, console_api: httpx.Client,
                                              points: dict[str, Any]) -> None:
    point = points["newest"]
    api = console_master.client(console_master.login(*AUDITOR))
    for path in ("files", "files/download?path=/etc/app.conf", "files/search?pattern=x"):
        assert api.get(f"/api/points/{point}/{path}").status_code == 403, path
    assert api.get("/api/vms/fsvm/files/search", params={"pattern": "x"}).status_code == 403
    admin = form_login(console_master)
    unknown = admin.get("/points/20200101T000000Z-000000/files/search", params={"pattern": "x"})
    assert unknown.status_code == 404 and "no restore point 20200101T000000Z-000000" in unknown.text
    client = form_login(console_master, *AUDITOR)
    for path in ("files", "files/part", "files/download?path=/etc/app.conf", "files/search?pattern=x"):
        reply = client.get(f"/points/{point}/{path}")
        assert reply.status_code == 403 and "restore-only" in reply.text, path
    assert client.post(f"/points/{point}/files/close", headers={"Origin": console_master.url}).status_code == 403
    page = log_in(chromium, console_master, *AUDITOR)
    page.goto(f"{console_master.url}/points/{point}/files")
    assert "cannot browse or download" in page.inner_text("main") and page.locator("table.files-table").count() == 0
    page.context.close()
    assert our_processes(points["repo"]) == []  # nothing was opened for the auditor
    assert all(e["user"] != AUDITOR[0] for e in console_api.get("/api/audit").json() if e["action"] == "file-download")


def test_an_unreachable_repository_is_said_clearly(chromium: Any, console_master: Server, console_api: httpx.Client,
                                                   points: dict[str, Any], guest_fs: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    cli = fresh_cli()
    repo = tmp_path / "gone"
    cli.run("repo", "init", str(repo), "--encrypt")
    point = str(cli.json("disk", "backup", str(guest_fs[1]), "--repo", str(repo), "--name", "gonevm", "--format",
                         "raw")["point"])
    assert console_api.post("/api/repositories", json={"name": "gone", "location": str(repo),
                                                       "passphrase": cli.env["VMKEEP_PASSPHRASE"]}).status_code == 201
    shutil.move(repo, tmp_path / "moved")  # the disk holding it was unmounted, say
    page = log_in(chromium, console_master)
    page.goto(f"{console_master.url}/points/{point}/files")
    error = page.locator("#files-area").get_by_role("alert")
    error.wait_for(timeout=OPENING)
    assert "could not be opened" in error.inner_text() and str(repo) in error.inner_text()
    assert page.get_by_role("link", name="Try again").count() == 1
    page.context.close()
    assert console_api.get(f"/api/points/{point}/files").status_code == 502


def test_tar_members_and_file_names_are_made_safe() -> None:
    """Modes lose setuid/setgid/sticky/world-write and owners, as `vmkeep files get` does; a guest's
    file name cannot break out of the Content-Disposition header."""
    header = _member(Entry("/bin/su", "file", 3, 0o6777, 1000, 1000, MTIME), "x/su")
    info = tarfile.TarInfo.frombuf(header[:tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
    assert info.mode == 0o775 and info.uid == 0 and info.name == "x/su"
    assert disposition('evil"\r\nSet-Cookie: x=1;.txt') == (
        'attachment; filename="evil___Set-Cookie: x=1_.txt"; filename*=UTF-8\'\'evil___Set-Cookie%3A%20x%3D1_.txt')
    assert disposition("caf\udce9 ü.txt").startswith('attachment; filename="caf_ _.txt"')


class RecordingOpener:
    """Opens nothing heavy: records which points were opened and released (the manager's rules
    are what is tested), and fails for a VM named broken as an unreachable repository does."""

    def __init__(self) -> None:
        self.released: list[str] = []

    def __call__(self, stack: ExitStack, point: PointRef) -> Any:
        if point.vm == "broken":
            raise VmkeepError("repository files (/srv/gone) cannot be read: No such file or directory")
        stack.callback(self.released.append, point.vm)
        return SimpleNamespace(filesystems=[])


def ref(number: int, vm: str) -> PointRef:
    return PointRef(number, vm, f"p{number}", datetime.now(UTC), ("vda",),
                    RegisteredRepo("r", "/srv/r", "id", False, None, None))


def test_file_sessions_close_when_idle_full_or_stopping() -> None:
    """The least recently used idle session makes room (a user's own once they hold their share),
    a busy one never does, idle ones close, a failed open keeps its error until retried,
    everything closes when the server stops."""
    opener = RecordingOpener()
    released = opener.released
    manager = FileSessions(opener, max_sessions=3, idle_seconds=60)  # one user may hold two
    try:
        a, b = manager.get("ann", ref(1, "a")), manager.get("ann", ref(2, "b"))
        a.future.result(5), b.future.result(5)
        assert manager.get("ann", ref(1, "a")) is a  # reused, and now the most recently used
        with b.streaming():  # a download of b under way: ann's a makes room for her c instead
            c = manager.get("ann", ref(3, "c"))
            c.future.result(5)
            with c.lock:  # c in a call, b streaming: ann has no room, others still have
                with pytest.raises(SessionsFull, match="you have 2"):
                    manager.get("ann", ref(4, "d"))
                x = manager.get("bob", ref(1, "x"))
                x.future.result(5)
                with x.lock, pytest.raises(SessionsFull, match="3 points' files are open"):
                    manager.get("cat", ref(5, "y"))  # all three in use
                manager.get("cat", ref(5, "y")).future.result(5)  # bob's x, idle again, makes room
                manager.sweep(time.monotonic() + 61)  # the idle y closes, the busy b and c stay
        time.sleep(0.2)
        assert sorted(released) == ["a", "x", "y"] and manager.find("ann", 1) is None
        manager.sweep(time.monotonic() + 61)
        assert sorted(released) == ["a", "b", "c", "x", "y"]

        broken = manager.get("ann", ref(4, "broken"))
        with pytest.raises(VmkeepError):
            broken.future.result(5)
        assert broken.state == "failed" and "No such file" in (broken.error or "")
        assert manager.get("ann", ref(4, "broken")) is broken  # its error stays on the page
        assert manager.get("ann", ref(4, "broken"), retry=True) is not broken
        d = manager.get("ann", ref(5, "d"))
        d.future.result(5)
    finally:
        manager.close_all()
    assert released.count("d") == 1 and d.closed


def test_the_server_closes_file_sessions_when_it_stops(console_master: Server) -> None:
    """The application's lifespan closes the sessions still open (the master stopping)."""
    app = create_app(console_master.database)
    opener = RecordingOpener()
    app.state.file_sessions = FileSessions(opener)

    async def serve_a_while() -> None:
        async with app.router.lifespan_context(app):  # as uvicorn starts and stops it
            app.state.file_sessions.get("ann", ref(1, "a")).future.result(5)
            assert opener.released == []

    with ThreadPoolExecutor(1) as thread:  # Playwright's loop runs in this one
        thread.submit(asyncio.run, serve_a_while()).result()
    assert opener.released == ["a"]


def test_a_disk_with_two_filesystems(chromium: Any, console_master: Server, console_api: httpx.Client,
                                     points: dict[str, Any], tmp_path: Path) -> None:
    """A partitioned disk (a small FAT partition first, as EFI puts it, then ext4): the page shows the
    largest first, offers both, and switching remounts in the same appliance."""
    image, first = tmp_path / "two.img", tmp_path / "first"
    (first / "docs").mkdir(parents=True)
    (first / "docs" / "one.txt").write_text("on the first\n")
    second = tmp_path / "TWO.TXT"
    second.write_text("on the second\n")
    subprocess.run(["truncate", "-s", str(64 * MiB), str(image)], check=True)
    subprocess.run(["sfdisk", "-q", str(image)], input="label: dos\nstart=2048, size=40960, type=c\n"
                   "start=43008, type=83\n", text=True, check=True)  # 20 MiB FAT, then 43 MiB ext4
    subprocess.run(["mkfs.vfat", "-n", "SECOND", "--offset", "2048", str(image), "20480"], check=True,
                   capture_output=True)
    subprocess.run(["mcopy", "-i", f"{image}@@{2048 * 512}", str(second), "::/TWO.TXT"], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-E", f"offset={43008 * 512}", "-d", str(first), str(image), "44032K"],
                   check=True)
    cli = fresh_cli()
    point = str(cli.json("disk", "backup", str(image), "--repo", str(points["repo"]), "--name", "twofs", "--format",
                         "raw")["point"])
    assert console_api.post("/api/repositories/files/rebuild").status_code == 200

    page = log_in(chromium, console_master)
    page.goto(f"{console_master.url}/points/{point}/files")
    page.locator("table.files-table").wait_for(timeout=OPENING)
    picker = page.get_by_label("Filesystem")
    assert picker.locator("option").all_inner_texts() == ["/dev/sda1 (vfat, disk disk, 20.0 MiB)",
                                                          "/dev/sda2 (ext4, disk disk, 43.0 MiB)"]
    assert page.locator("td.files-name").all_inner_texts() == ["docs/", "lost+found/"]
    picker.select_option("/dev/sda1")
    page.get_by_role("button", name="Show").click()
    page.locator("tr[data-path='/TWO.TXT']").wait_for()
    with page.expect_download() as got:
        page.get_by_role("link", name="Download TWO.TXT").click()
    assert Path(got.value.path()).read_bytes() == b"on the second\n"
    page.get_by_label("Filesystem").select_option("/dev/sda2")
    page.get_by_role("button", name="Show").click()
    page.locator("tr[data-path='/docs']").wait_for()
    page.context.close()
    assert console_api.delete(f"/api/points/{point}/files").status_code == 204
    assert our_processes(points["repo"]) == []
