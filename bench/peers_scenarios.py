"""The five scenarios of the peers benchmark, each run side by side for every tool on the same
bytes and returning its figures, the targets it checks and, for a missed target, a py-spy
profile of vmkeep's side.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.peers_lab import (
    ENV,
    SHM,
    VM,
    WORK,
    Contender,
    Measured,
    cleanup_vms,
    clone_vm,
    drop_checkpoints,
    du,
    export_uri,
    fresh,
    fresh_vm,
    guest_rewrites,
    init_repo,
    median,
    median_rounds,
    profile,
    run_measured,
    template_segments,
    virtnbdbackup,
    vmkeep_backup,
)
from bench.repo_bench import VMKEEP
from vmkeep.lab.images import make_image

Result = dict[str, object]


@dataclass
class Context:
    size: int
    repeat: int
    days: int
    clones: int
    profile_dir: Path | None  # profile vmkeep where a target is missed

    @property
    def image(self) -> Path:
        return WORK / "disk.qcow2"

    def gb_s(self, run: Measured) -> Measured:
        return {**run, "gb_s": round(self.size / 1e9 / run["seconds"], 3)}


def target(name: str, measured: float, at_least: float | None = None, at_most: float | None = None) -> Result:
    met = (at_least is None or measured >= at_least) and (at_most is None or measured <= at_most)
    bound = f"≥ {at_least}" if at_least is not None else f"≤ {at_most}"
    return {"name": name, "measured": round(measured, 3), "target": bound, "met": met}


def maybe_profile(ctx: Context, targets: list[Result], name: str, cmd: list[str] | str,
                  setup: Callable[[], None] | None = None) -> list[Result]:
    """py-spy of vmkeep's run when one of ``targets`` is missed (and --profile asked for it)."""
    if ctx.profile_dir is None or all(t["met"] for t in targets):
        return []
    if setup is not None:
        setup()
    return profile(name, cmd, ctx.profile_dir)


# 1 and 4 ----------------------------------------------------------------------------------------

REPO, REPO_ENC, REPO_SHM, VNB = WORK / "repo", WORK / "repo-enc", SHM / "repo-enc", WORK / "virtnbdbackup"


def full_backup(ctx: Context) -> Result:
    """Full backup of the running VM: vmkeep (compressed; compressed + encrypted, on the disk and on
    tmpfs), virtnbdbackup (plain, --compress), against the read and read + write limits."""
    fresh_vm(ctx.image, ctx.size)
    raw = WORK / "copy.raw"
    export: list[tuple[str, Callable[[], None]]] = []  # the references' pull-mode export, while one runs

    def reference(cmd: Callable[[str], list[str] | str], *paths: Path) -> Contender:
        def setup() -> None:
            fresh(*paths)()
            export.append(export_uri())

        def cleanup() -> None:
            export.pop()[1]()
            fresh(*paths)()
        return Contender(lambda: cmd(export[-1][0]), setup, cleanup, shell=True)

    def vmkeep(repo: Path, encrypt: bool, keep: bool) -> Contender:
        return Contender(lambda: vmkeep_backup(repo, full=True, encrypted=encrypt),
                         lambda: init_repo(repo, encrypt=encrypt),
                         (lambda: None) if keep else fresh(repo))

    def vnb(compress: bool) -> Contender:
        return Contender(lambda: virtnbdbackup("copy", VNB, compress=compress), fresh(VNB))

    # The last round leaves the encrypted repository and virtnbdbackup's compressed copy for the
    # restore scenario.
    runs = median_rounds(ctx.repeat, {
        "read limit (nbdcopy → null:)": reference(lambda uri: f"nbdcopy '{uri}' null:"),
        "read + write limit (nbdcopy → raw file, sync)": reference(lambda uri: f"nbdcopy '{uri}' {raw} && sync", raw),
        "vmkeep (compressed)": vmkeep(REPO, False, keep=False),
        "vmkeep (compressed + encrypted)": vmkeep(REPO_ENC, True, keep=True),
        "vmkeep (compressed + encrypted), repository on tmpfs": vmkeep(REPO_SHM, True, keep=False),
        "virtnbdbackup (copy)": vnb(False),
        "virtnbdbackup (copy, --compress)": vnb(True),
    })
    runs = {k: ctx.gb_s(v) for k, v in runs.items()}
    enc, shm = runs["vmkeep (compressed + encrypted)"]["gb_s"], runs[
        "vmkeep (compressed + encrypted), repository on tmpfs"]["gb_s"]
    targets = [
        target("full backup: vmkeep encrypted / virtnbdbackup --compress", enc / runs[
            "virtnbdbackup (copy, --compress)"]["gb_s"], at_least=1.0),
        target("full backup: vmkeep encrypted / read + write limit", enc / runs[
            "read + write limit (nbdcopy → raw file, sync)"]["gb_s"], at_least=0.8),
        target("full backup: vmkeep encrypted on tmpfs / read limit", shm / runs[
            "read limit (nbdcopy → null:)"]["gb_s"], at_least=0.5),
    ]
    prof = maybe_profile(ctx, targets, "full-backup-tmpfs", vmkeep_backup(REPO_SHM, full=True),
                         lambda: init_repo(REPO_SHM))
    fresh(REPO_SHM)()
    return {"runs": runs, "targets": targets, "profile": prof}


def full_restore(ctx: Context) -> Result:
    """Restore of the full point (left by full_backup) to a raw file: vmkeep vs virtnbdrestore vs
    the write limit."""
    out, vout = WORK / "restored.raw", WORK / "vnb-restore"
    runs = median_rounds(ctx.repeat, {
        "write limit (qemu-img convert → raw, sync)": Contender(
            lambda: f"qemu-img convert -U -O raw {ctx.image} {out} && sync", fresh(out), fresh(out), shell=True),
        "vmkeep": Contender(lambda: restore_cmd(REPO_ENC, out), fresh(out), fresh(out), shell=True),
        "virtnbdrestore": Contender(lambda: vnb_restore_cmd(VNB, vout), fresh(vout), fresh(vout), shell=True),
    }, cold=True)
    fresh(out, vout, VNB, REPO, REPO_ENC)()
    runs = {k: ctx.gb_s(v) for k, v in runs.items()}
    targets = [target("restore of the full point: vmkeep / virtnbdrestore",
                      runs["vmkeep"]["gb_s"] / runs["virtnbdrestore"]["gb_s"], at_least=1.0)]
    return {"runs": runs, "targets": targets}


def restore_cmd(repo: Path, out: Path, vm: str = VM) -> str:
    return f"{VMKEEP} restore {vm} --repo {repo} --disk vda --output {out} --format raw && sync"


def vnb_restore_cmd(backup: Path, out: Path) -> str:
    return f"virtnbdrestore -i {backup} -o {out} --noprogress && sync"


# 2 ----------------------------------------------------------------------------------------------

FRACTIONS = (0.01, 0.05, 0.25)


def incrementals(ctx: Context) -> Result:
    """After a full, the guest rewrites 1 %, 5 % and 25 % of the disk before each incremental
    (--repeat times per fraction): seconds, CPU and stored bytes added, per tool."""
    repo, vnb = WORK / "repo-inc", WORK / "vnb-inc"
    tools = {"vmkeep": (repo, lambda: vmkeep_backup(repo)), "virtnbdbackup": (vnb, lambda: virtnbdbackup("inc", vnb))}
    out: dict[str, dict[str, Measured]] = {}
    for tool, (store, command) in tools.items():
        fresh_vm(ctx.image, ctx.size)
        if tool == "vmkeep":
            init_repo(repo)
            run_measured(vmkeep_backup(repo, full=True))
        else:
            fresh(vnb)()
            run_measured(virtnbdbackup("full", vnb))
        out[tool] = {}
        for fraction in FRACTIONS:
            runs = []
            for r in range(ctx.repeat):
                written = guest_rewrites(fraction, f"inc-{fraction}-{r}", ctx.size)
                before = du(store)
                m = run_measured(command())
                runs.append({**m, "stored_added_mib": (du(store) - before) / (1 << 20),
                             "rewritten_mib": written / (1 << 20)})
            out[tool][f"{fraction:.0%}"] = median(runs)
        fresh(store)()
    targets = [target(f"incremental after {k} rewritten: virtnbdbackup seconds / vmkeep seconds",
                      out["virtnbdbackup"][k]["seconds"] / out["vmkeep"][k]["seconds"], at_least=1.0)
               for k in out["vmkeep"]]
    return {"runs": out, "targets": targets}


# 3 ----------------------------------------------------------------------------------------------


def clones_dedup(ctx: Context) -> Result:
    """``ctx.clones`` VMs cloned from one template, each then rewriting 2 % of its disk with its own
    data, all backed up: stored bytes after each clone for vmkeep (one repository), virtnbdbackup
    (one --compress copy per VM) and borg (fixed 4 MiB chunker, zstd, over each clone's raw image)."""
    template = WORK / "template.qcow2"
    template.unlink(missing_ok=True)
    make_image(template, ctx.size, template_segments(ctx.size))
    repo, vnb, borg, src = WORK / "repo-clones", WORK / "vnb-clones", WORK / "borg-clones", WORK / "borg-src"
    init_repo(repo)
    fresh(vnb, borg, src)()
    src.mkdir()
    subprocess.run(["borg", "init", "--encryption", "repokey-blake2", str(borg)], env=ENV, check=True,
                   capture_output=True)
    names = [f"{VM}-clone{i}" for i in range(ctx.clones)]
    stored: dict[str, list[int]] = {"vmkeep": [], "virtnbdbackup": [], "borg (fixed 4 MiB chunks)": []}
    seconds: dict[str, float] = dict.fromkeys(stored, 0.0)
    try:
        for i, vm in enumerate(names):
            clone = WORK / f"{vm}.qcow2"
            clone_vm(template, clone, vm)
            guest_rewrites(0.02, f"clone-{i}", ctx.size, vm)
            seconds["vmkeep"] += run_measured(vmkeep_backup(repo, vm))["seconds"]
            seconds["virtnbdbackup"] += run_measured(virtnbdbackup("copy", vnb / vm, vm))["seconds"]
            cleanup_vms(vm)
            raw = src / "disk.raw"
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(clone), str(raw)], check=True)
            seconds["borg (fixed 4 MiB chunks)"] += run_measured(
                f"cd {src} && borg create --chunker-params fixed,{4 << 20} --compression zstd,1 "
                f"{borg}::clone{i} disk.raw", shell=True)["seconds"]
            raw.unlink()
            clone.unlink()
            for tool, path in (("vmkeep", repo), ("virtnbdbackup", vnb), ("borg (fixed 4 MiB chunks)", borg)):
                stored[tool].append(du(path))
    finally:
        cleanup_vms(*names)
    fresh(repo, vnb, borg, src, template)()
    runs = {tool: {"stored_mib_after_each": [round(b / (1 << 20), 1) for b in sizes],
                   "all_clones_over_one": round(sizes[-1] / sizes[0], 3),
                   "backup_seconds_total": round(seconds[tool], 1)} for tool, sizes in stored.items()}
    growth = stored["vmkeep"][-1] / stored["vmkeep"][0]
    targets = [target(f"{ctx.clones} clones: vmkeep stored / one VM's stored", growth, at_most=1.3)]
    return {"runs": runs, "targets": targets, "clones": ctx.clones, "unique_write_per_clone": 0.02}


# 5 ----------------------------------------------------------------------------------------------


def daily_chain(ctx: Context) -> Result:
    """Per tool, from the same disk and the same daily 5 % rewrites: a full, then ``ctx.days``
    daily incrementals; then restore of the latest point (vmkeep: one full index; virtnbdrestore:
    replays the chain)."""
    repo, vnb = WORK / "repo-chain", WORK / "vnb-chain"
    tools = {"vmkeep": (repo, lambda day: vmkeep_backup(repo)),
             "virtnbdbackup": (vnb, lambda day: virtnbdbackup("full" if day == 0 else "inc", vnb))}
    runs: dict[str, dict[str, object]] = {}
    for tool, (store, command) in tools.items():
        fresh_vm(ctx.image, ctx.size)  # both chains start from the same bytes
        if tool == "vmkeep":
            init_repo(repo)
        else:
            fresh(vnb)()
        per_day, stored = [], []
        for day in range(ctx.days + 1):
            if day:
                guest_rewrites(0.05, f"day-{day}", ctx.size)
            per_day.append(round(run_measured(command(day))["seconds"], 2))
            stored.append(round(du(store) / (1 << 20), 1))
        runs[tool] = {"backup_seconds_per_day": per_day, "stored_mib_per_day": stored}
    drop_checkpoints()
    out, vout = WORK / "chain-restored.raw", WORK / "chain-vnb-restore"
    latest = median_rounds(ctx.repeat, {
        "vmkeep": Contender(lambda: restore_cmd(repo, out), fresh(out), fresh(out), shell=True),
        "virtnbdbackup": Contender(lambda: vnb_restore_cmd(vnb, vout), fresh(vout), fresh(vout), shell=True),
    }, cold=True)
    for tool, measured in latest.items():
        runs[tool]["restore_latest"] = measured
    cleanup_vms(VM)
    ratio = runs["virtnbdbackup"]["restore_latest"]["seconds"] / runs["vmkeep"]["restore_latest"]["seconds"]  # type: ignore[index]
    targets = [target(f"restore of the {ctx.days}th incremental: virtnbdrestore seconds / vmkeep seconds", ratio,
                      at_least=5.0)]
    prof = maybe_profile(ctx, targets, "chain-restore", restore_cmd(repo, out), fresh(out))
    fresh(out, vout, repo, vnb)()
    return {"runs": runs, "targets": targets, "days": ctx.days, "rewrite_per_day": 0.05, "profile": prof}


SCENARIOS = {"full": full_backup, "incremental": incrementals, "dedup": clones_dedup, "restore": full_restore,
             "chain": daily_chain}
