"""The console end to end, as an administrator who never read the docs would use it: in Debian's
chromium against a real master on PostgreSQL, a real proxy process and a lab VM on the local
libvirt — add the host, protect the VM with a policy selecting it by a glob, run it and watch it
reach 100 %, restore the VM as a new one and see it running, download one of its files and compare
it with the guest's own checksum; an auditor cannot restore."""

from __future__ import annotations

import hashlib
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MiB, fresh_cli
from tests.console_support import AUDITOR, csrf_of, log_in
from tests.test_scale_out import start_proxy, stop, wait_for
from tests.test_server import Server
from vmkeep.lab import LOCAL_URI
from vmkeep.lab.vm import LabVM, create_lab_vm, destroy_lab_vm


@pytest.fixture(scope="module")
def guest() -> Iterator[tuple[LabVM, dict[str, str]]]:
    """A lab VM with an ext4 filesystem of known files on its second disk: (VM, path → SHA-256 the
    guest itself computed)."""
    vm = create_lab_vm(f"vmkeep-ce-{secrets.token_hex(3)}", disks=2, size=32 * MiB)
    try:
        yield vm, vm.make_files("vdb")
    finally:
        vm.destroy()


def agent_answers(name: str) -> bool:
    reply = subprocess.run(["virsh", "-c", LOCAL_URI, "qemu-agent-command", name, '{"execute":"guest-ping"}'],
                           capture_output=True, text=True, timeout=30)
    return '"return"' in reply.stdout


def test_protect_watch_restore_and_download_from_the_browser(
        chromium: Any, console_master: Server, console_api: httpx.Client, guest: tuple[LabVM, dict[str, str]],
        tmp_path: Path) -> None:
    vm, files = guest
    cli = fresh_cli()
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    assert console_api.post("/api/repositories", json={"name": "main", "location": repo,
                                                       "passphrase": cli.env["VMKEEP_PASSPHRASE"]}).status_code == 201
    token = console_api.post("/api/tokens", json={"name": "proxy"}).json()["token"]
    proxy = start_proxy(console_master, token, "p1")
    copy = f"{vm.name}-copy"
    page = log_in(chromium, console_master)
    problems: list[str] = []  # script errors, Content-Security-Policy refusals
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    try:
        # the local libvirt host, added and discovered from the inventory page
        page.get_by_role("navigation", name="Main").get_by_role("link", name="Inventory").click()
        page.get_by_label("Name", exact=True).fill("local")
        page.get_by_label("Kind").select_option("libvirt")
        page.get_by_role("textbox", name="Address").fill("qemu:///system")
        page.get_by_role("button", name="Add hypervisor").click()
        page.get_by_role("button", name="Discover the VMs of local now").click()
        page.get_by_label("VM name").fill(vm.name)
        page.get_by_role("button", name="Filter").click()
        assert vm.name in page.get_by_role("list", name="Hypervisors, hosts and VMs").inner_text()
        assert console_api.put("/api/hypervisors/local/restore-locations",
                               json={"locations": [str(tmp_path)]}).status_code == 200

        # a policy selecting the VM by a glob; its preview shows the VM before it is saved
        page.get_by_role("navigation", name="Main").get_by_role("link", name="Policies").click()
        page.get_by_role("link", name="create one").click()
        page.get_by_label("Name", exact=True).fill("lab")
        page.get_by_label("Repository").select_option("main")
        page.get_by_label("Name globs").fill(vm.name[:-2] + "*")
        preview = page.locator("#policy-preview")
        preview.get_by_text(vm.name).wait_for()
        page.get_by_role("button", name="Create policy").click()
        page.get_by_role("button", name="Run lab now").click()
        page.wait_for_url(re.compile(r".*/jobs/\d+$"))

        # the job's page follows the backup to its end without a reload
        live = page.locator("#job-live")
        live.and_(page.locator("[data-status=succeeded]")).wait_for(timeout=240_000)
        row = page.locator(f"article.jobvm[data-vm='{vm.name}']")
        assert row.locator("progress").get_attribute("value") == "100"
        assert "100 %" in row.locator("[data-progress]").inner_text()
        job = console_api.get("/api/jobs").json()[0]
        assert job["status"] == "succeeded" and job["vms"][0]["vm"] == vm.name, job
        point = job["vms"][0]["point_id"]
        lines = console_api.get(f"/api/jobs/{job['id']}/log").json()  # what the proxy logged reached the page
        assert lines and lines[-1]["vm"] == vm.name
        assert lines[-1]["message"] in row.inner_text()

        # restore as a new VM through the wizard, and see it running
        page.goto(f"{console_master.url}/points/vm/{vm.name}")
        page.locator(f"tr[data-point='{point}']").get_by_role("link", name="Restore…").click()
        page.get_by_label("Name of the new VM").fill(copy)
        page.get_by_label("Storage (where its disks go)").fill(str(tmp_path / "copy"))
        assert page.get_by_label("Start the VM after the restore").is_checked()
        page.get_by_role("button", name="Start the restore").click()
        page.wait_for_url(re.compile(r".*/restores/\d+$"))
        status = page.locator("#restore-progress [data-fact=status]")
        page.locator("#restore-progress:not([hx-get])").wait_for(timeout=240_000)  # polling stops at the end
        assert status.inner_text() == "succeeded", page.inner_text("#restore-progress")
        wait_for("the restored VM's guest agent", lambda: agent_answers(copy), timeout=120)

        # one file of the point, downloaded from the browser, is the file the guest wrote
        page.goto(f"{console_master.url}/points/{point}/files")
        page.get_by_role("link", name="etc/").click(timeout=120_000)  # the point's filesystems open first
        with page.expect_download() as download:
            page.get_by_role("link", name="Download numbers.txt").click()
        got = Path(download.value.path()).read_bytes()
        assert hashlib.sha256(got).hexdigest() == files["etc/numbers.txt"]
        assert problems == []
    finally:
        page.context.close()
        stop(proxy)
        destroy_lab_vm(copy)

    # an auditor sees the points but cannot restore: no button, and a forged post changes nothing
    page = log_in(chromium, console_master, *AUDITOR)
    page.goto(f"{console_master.url}/points/vm/{vm.name}")
    assert page.locator(f"tr[data-point='{point}']").count() == 1
    assert page.get_by_role("link", name="Restore…").count() == 0
    csrf = csrf_of(page.content())
    before = console_api.get("/api/restores").json()
    refused = page.request.post(f"{console_master.url}/points/vm/{vm.name}/restore",
                                form={"csrf": csrf, "point": point, "mode": "new", "hypervisor": "local",
                                      "as_name": f"{vm.name}-x", "storage": str(tmp_path / "x")},
                                headers={"Origin": console_master.url})
    assert refused.status == 403
    assert console_api.get("/api/restores").json() == before
    page.context.close()
