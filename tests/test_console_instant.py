"""Instant recovery through the server and its console, with a real proxy and a lab VM: the
wizard starts it, the restore row says the VM runs from the backup, its guest agent answers; the
restore's page discards it (nothing left: no domain, no export, no state) and the API finishes a
second one to storage (the VM keeps running from its own disks)."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MiB, fresh_cli
from tests.console_support import AUDITOR, audit_actions, form_login, log_in, shoot
from tests.test_console_scenario import agent_answers
from tests.test_recovery import cleanup
from tests.test_scale_out import local_host_and_proxy, stop, wait_for
from tests.test_server import Server
from vmkeep.engine import instant
from vmkeep.hypervisors.libvirt.instant import OVERLAYS
from vmkeep.lab import LOCAL_URI
from vmkeep.lab.vm import LabVM, create_lab_vm


@dataclass
class Lab:
    vm: LabVM
    point: str
    locations: Path


@pytest.fixture(scope="module")
def lab(console_master: Server, console_api: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A lab VM backed up once into an encrypted repository registered with the master (its point
    in the catalog), the local libvirt host discovered, a restore location, and a proxy on this host."""
    cli = fresh_cli()
    guest = create_lab_vm(f"vmkeep-ci-{secrets.token_hex(3)}", disks=1, size=32 * MiB)
    proxy = None
    try:
        folder = tmp_path_factory.mktemp("instant")
        repo = str(folder / "repo")
        cli.run("repo", "init", repo, "--encrypt")
        result = json.loads(cli.run("backup", guest.name, "--repo", repo, "--json").stdout)["vms"][0]
        assert result["ok"], result
        assert console_api.post("/api/repositories", json={"name": "main", "location": repo, "passphrase":
                                                           cli.env["VMKEEP_PASSPHRASE"]}).status_code == 201
        proxy = local_host_and_proxy(console_master, console_api, folder)
        yield Lab(guest, result["point"], folder)
    finally:
        if proxy is not None:
            stop(proxy)
        guest.destroy()


def restore(api: httpx.Client, restore_id: int) -> dict[str, Any]:
    reply = api.get(f"/api/restores/{restore_id}")
    assert reply.status_code == 200
    return dict(reply.json())


def settled(api: httpx.Client, restore_id: int, timeout: float = 180) -> dict[str, Any]:
    """The restore once its proxy has done the step asked (not queued or running any more)."""
    return wait_for(f"restore {restore_id} to settle", lambda: (r := restore(api, restore_id))["status"] not in (
        "queued", "running") and r, timeout=timeout)  # type: ignore[no-any-return]


def test_instant_recovery_from_the_wizard_then_discard(chromium: Any, console_master: Server,
                                                       console_api: httpx.Client, lab: Lab) -> None:
    copy = f"{lab.vm.name}-i"
    page = log_in(chromium, console_master)
    try:
        page.goto(f"{console_master.url}/points/vm/{lab.vm.name}/restore?point={lab.point}")
        page.get_by_label("Instant recovery: run the VM from the backup now").check()
        assert page.get_by_label("Name of the new VM").is_hidden()
        page.get_by_label("Hypervisor").select_option("local")
        page.get_by_label("Name the VM runs under").fill(copy)
        shoot(page, "restore-wizard-instant")
        page.get_by_label("Name the VM runs under").fill(lab.vm.name)  # taken: the original runs there
        page.get_by_role("button", name="Start the restore").click()
        assert "already has a VM" in page.locator("#instant_name-error").inner_text()
        assert page.get_by_label("Instant recovery: run the VM from the backup now").is_checked()
        page.get_by_label("Name the VM runs under").fill(copy)
        page.get_by_role("button", name="Start the restore").click()
        page.wait_for_url(re.compile(r"/restores/\d+$"))
        restore_id = int(page.url.rsplit("/", 1)[1])
        page.locator("[data-fact=status]").filter(has_text="instant").wait_for(timeout=180_000)
        job = restore(console_api, restore_id)
        assert (job["mode"], job["step"], job["new_name"], job["proxy"], job["finished"]) == (
            "instant", "start", copy, "p1", None)
        assert set(job["disks"]) == {"vda"}  # the layer its writes go to
        wait_for("the recovered VM's guest agent", lambda: agent_answers(copy), timeout=180)
        state = json.loads((instant.STATE / copy / "state.json").read_text())
        assert not (instant.STATE / copy / "passphrase").stat().st_mode & 0o077  # the exports' secret: owner only
        assert "runs from the backup" in page.locator("[data-fact=instant]").inner_text()
        shoot(page, "restore-instant")

        # an auditor sees it but cannot discard it; a finish outside the restore locations is refused
        auditor = form_login(console_master, *AUDITOR)
        trail = audit_actions(console_api)
        page_text = auditor.get(f"/restores/{restore_id}").text
        assert "Discard the VM" not in page_text
        assert auditor.post(f"/restores/{restore_id}/discard", headers={"Origin": console_master.url},
                            data={"csrf": re.search(r'name="csrf" value="([^"]+)"', page_text).group(1)  # type: ignore[union-attr]
                                  }).status_code == 403
        page.get_by_label("Move its disks to").fill("/etc")
        page.get_by_role("button", name="Finish: keep the VM").click()
        assert "restore locations" in page.locator("#storage-error").inner_text()
        assert restore(console_api, restore_id)["status"] == "instant" and audit_actions(console_api) == trail

        page.get_by_role("button", name="Discard the VM and its changes").click()
        page.locator("[data-fact=status]").filter(has_text="discarded").wait_for(timeout=120_000)
        job = restore(console_api, restore_id)
        assert (job["status"], job["step"], job["error"]) == ("discarded", "discard", None) and job["finished"]
        assert subprocess.run(["virsh", "-c", LOCAL_URI, "domstate", copy], capture_output=True).returncode != 0
        assert not (instant.STATE / copy).exists() and not (OVERLAYS / copy).exists()
        assert all(not Path(f"/proc/{pid}").exists() for pid in state["exports"].values())  # no nbdkit left
        assert ("admin", "restore-instant-discard") in audit_actions(console_api)
        again = console_api.post(f"/api/restores/{restore_id}/discard")
        assert again.status_code == 409 and "not running instantly" in again.json()["detail"]
    finally:
        page.context.close()
        cleanup(copy)


def test_instant_recovery_finishes_to_storage_through_the_api(console_api: httpx.Client, lab: Lab) -> None:
    copy = f"{lab.vm.name}-f"
    try:
        started = console_api.post("/api/restores", json={"vm": lab.vm.name, "point": lab.point, "hypervisor": "local",
                                                          "mode": "instant", "as_name": copy})
        assert started.status_code == 202, started.text
        restore_id = started.json()["id"]
        assert settled(console_api, restore_id)["status"] == "instant"
        wait_for("the recovered VM's guest agent", lambda: agent_answers(copy), timeout=180)
        refused = console_api.post(f"/api/restores/{restore_id}/finish", json={"storage": "/var/lib"})
        assert refused.status_code == 403 and "restore locations" in refused.text
        target = lab.locations / "moved"
        asked = console_api.post(f"/api/restores/{restore_id}/finish", json={"storage": str(target)})
        assert asked.status_code == 202, asked.text
        job = settled(console_api, restore_id)
        assert (job["status"], job["step"], job["storage"], job["error"]) == ("succeeded", "finish", str(target), None)
        assert job["disks"] == {"vda": str(target / f"{copy}-vda.qcow2")} and Path(job["disks"]["vda"]).exists()
        assert job["progress_bytes"] and job["progress_bytes"] == job["total_bytes"]
        assert agent_answers(copy)  # still running, from its own disk now
        assert not (instant.STATE / copy).exists() and not (OVERLAYS / copy).exists()
    finally:
        cleanup(copy)
