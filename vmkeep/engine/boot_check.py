"""Verified restore: does a restore point boot? (the check SureBackup made familiar)

First every chunk of the point is read back and re-hashed (a point that does not read back is a
failure, named by its chunk, without booting). Then the point boots as an instant recovery in a
sandbox — no network interfaces — and must show a heartbeat: its guest agent answers a ping, or
its serial console prints a marker. An optional script then runs on the host against the VM
(``VMKEEP_VERIFY_VM``, ``VMKEEP_VERIFY_URI``); exit 0 passes. The sandbox is removed on every
path, and the outcome is recorded beside the point in the repository.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmkeep.engine import instant
from vmkeep.engine.mount import PointSpec
from vmkeep.errors import UsageError, VmkeepError
from vmkeep.hypervisors.base import Connector, SandboxBoot
from vmkeep.repository.points import Manifest
from vmkeep.repository.repo import Repository
from vmkeep.repository.verify import verify

log = logging.getLogger(__name__)

SANDBOX_PREFIX = "vmkeep-verify-"


def boot_check(repo: Repository, spec_base: PointSpec, connector: Connector, vm: str, point: str | None, *,
               timeout: float = 300.0, marker: str | None = None, script: Path | None = None) -> dict[str, Any]:
    """Check the point; the outcome (also recorded in the repository): passed, why, timings."""
    if not isinstance(connector, SandboxBoot):
        raise UsageError(f"{connector.uri}: this hypervisor's connector cannot boot a restore point in a sandbox")
    manifest = repo.find_point(vm, point)
    started = time.monotonic()
    result: dict[str, Any] = {"vm": vm, "point": manifest.point_id, "at": datetime.now(UTC).isoformat(),
                              "heartbeat": f"console marker {marker!r}" if marker else "guest agent ping"}
    chunks = verify(repo, only=[manifest])
    result["chunks_checked"] = chunks.chunks_checked
    if not chunks.ok:
        first = next(iter(chunks.bad_chunks.values()), None) or next(iter(chunks.broken_points.values()))[0]
        result.update(passed=False, reason=f"the point does not read back ({len(chunks.bad_chunks)} bad chunks; "
                                           f"first: {first}); it was not booted")
        return _done(repo, manifest, result, started)
    name = f"{SANDBOX_PREFIX}{secrets.token_hex(4)}"
    result["sandbox"] = name
    try:
        sandbox = instant.start(repo, spec_base, connector, vm, manifest.point_id, name, sandbox=True)
    except VmkeepError as exc:
        result.update(passed=False, reason=f"the sandbox did not start: {exc}")
        return _done(repo, manifest, result, started)
    try:
        booted = time.monotonic()
        alive = connector.wait_heartbeat(name, timeout=timeout, marker=marker)
        result["seconds_to_heartbeat"] = round(time.monotonic() - booted, 1) if alive else None
        if not alive:
            result.update(passed=False, reason=f"no heartbeat ({result['heartbeat']}) within {timeout:.0f} s")
        elif script is not None:
            result.update(_run_script(script, name, connector.uri, timeout))
        else:
            result.update(passed=True, reason=None)
    finally:
        try:
            instant.discard(connector, sandbox)
        except VmkeepError as exc:  # the outcome stands and is recorded; the leftover is named
            log.warning("removing the boot-check sandbox %s failed: %s", name, exc)
            result.setdefault("warnings", []).append(f"the sandbox {name} could not be removed: {exc}")
    return _done(repo, manifest, result, started)


def _run_script(script: Path, name: str, uri: str, timeout: float) -> dict[str, Any]:
    """The user's check of the running sandbox: exit 0 passes."""
    env = {**os.environ, "VMKEEP_VERIFY_VM": name, "VMKEEP_VERIFY_URI": uri}
    log.info("running %s against the sandbox %s", script, name)
    try:
        proc = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, (proc.stdout + proc.stderr).strip()[-500:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        rc, out = -1, str(exc)
    return {"script": {"path": str(script), "exit": rc, "output": out}, "passed": rc == 0,
            "reason": None if rc == 0 else f"the script {script} exited {rc}: {out}"}


def _done(repo: Repository, manifest: Manifest, result: dict[str, Any], started: float) -> dict[str, Any]:
    result["seconds"] = round(time.monotonic() - started, 1)
    repo.record_check(manifest, result)
    return result
