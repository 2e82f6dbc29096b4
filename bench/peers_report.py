"""Tables (for docs/performance.md) and PNG charts of the peers benchmark's results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Doc = dict[str, Any]


def _measured_rows(runs: dict[str, dict[str, float]]) -> list[str]:
    rows = ["| tool | seconds | GB/s | CPU s | peak MiB |", "|---|---:|---:|---:|---:|"]
    rows += [f"| {k} | {v['seconds']:.2f} | {v['gb_s']:.2f} | {v['cpu_seconds']:.1f} | {v['peak_rss_mib']:.0f} |"
             for k, v in runs.items()]
    return rows


def _full(s: Doc, gib: float) -> list[str]:
    return [f"### 1. Full backup of the running VM ({gib:.0f} GiB disk)", "", *_measured_rows(s["runs"]), "",
            "![full backup throughput](../bench/peers-full.png)"]


def _restore(s: Doc, gib: float) -> list[str]:
    return [f"### 4. Restore of the full point to a raw file ({gib:.0f} GiB)", "", *_measured_rows(s["runs"]), "",
            "![restore throughput](../bench/peers-restore.png)"]


def _incremental(s: Doc, gib: float) -> list[str]:
    rows = [f"### 2. Incremental after the guest rewrote part of its {gib:.0f} GiB disk", "",
            "| rewritten | tool | seconds | CPU s | peak MiB | stored MiB added |", "|---|---|---:|---:|---:|---:|"]
    for frac in next(iter(s["runs"].values())):
        for tool, per in s["runs"].items():
            v = per[frac]
            rows.append(f"| {frac} ({v['rewritten_mib']:.0f} MiB) | {tool} | {v['seconds']:.2f} | "
                        f"{v['cpu_seconds']:.1f} | {v['peak_rss_mib']:.0f} | {v['stored_added_mib']:.0f} |")
    return [*rows, "", "![incremental backup time](../bench/peers-incremental.png)"]


def _dedup(s: Doc, gib: float) -> list[str]:
    rows = [f"### 3. {s['clones']} VMs cloned from one template ({gib:.0f} GiB), "
            f"each rewriting {s['unique_write_per_clone']:.0%} of its disk with its own data", "",
            "| tool | stored MiB, one VM | stored MiB, all clones | all / one | backup seconds, all |",
            "|---|---:|---:|---:|---:|"]
    for tool, v in s["runs"].items():
        after = v["stored_mib_after_each"]
        rows.append(f"| {tool} | {after[0]:.0f} | {after[-1]:.0f} | {v['all_clones_over_one']:.2f} | "
                    f"{v['backup_seconds_total']:.0f} |")
    return [*rows, "", "![stored bytes as clones are added](../bench/peers-dedup.png)"]


def _chain(s: Doc, gib: float) -> list[str]:
    rows = [f"### 5. A full and {s['days']} daily incrementals ({s['rewrite_per_day']:.0%} rewritten each day), "
            "then restore of the latest", "",
            "| tool | all backups s | stored MiB | restore of the latest s | restore CPU s | restore peak MiB |",
            "|---|---:|---:|---:|---:|---:|"]
    for tool, v in s["runs"].items():
        r = v["restore_latest"]
        rows.append(f"| {tool} | {sum(v['backup_seconds_per_day']):.1f} | {v['stored_mib_per_day'][-1]:.0f} | "
                    f"{r['seconds']:.2f} | {r['cpu_seconds']:.1f} | {r['peak_rss_mib']:.0f} |")
    return [*rows, "", "![a month of incrementals](../bench/peers-chain.png)"]


SECTIONS = {"full": _full, "incremental": _incremental, "dedup": _dedup, "restore": _restore, "chain": _chain}


def markdown(doc: Doc) -> list[str]:
    """The peers section: how it was run, each scenario's table and chart, then every target."""
    gib = doc["disk_gib"]
    lines = ["", f"Disk of a running VM: {gib:.0f} GiB (half incompressible, a quarter text-like, a quarter never "
             f"written); median of {doc['repeat']}; {doc['cpus']} CPUs; written by `bench/peers.py`"
             f"{' (--quick)' if doc.get('quick') else ''}. Guest writes are new data, half incompressible and half "
             "text-like, in 4 MiB pieces. Every run starts with the free memory touched; restores also start with "
             "an empty page cache (a repository written days ago is not in memory). CPU = user + system seconds "
             "of the tool and its children; memory = "
             "largest resident set among them.", ""]
    for name, render in SECTIONS.items():
        if name in doc["scenarios"]:
            lines += [*render(doc["scenarios"][name], gib), ""]
    lines += ["### Targets", "", "| target | measured | wanted | met |", "|---|---:|---:|---|"]
    for s in doc["scenarios"].values():
        lines += [f"| {t['name']} | {t['measured']:.2f} | {t['target']} | {'yes' if t['met'] else 'no'} |"
                  for t in s["targets"]]
    profiles = [(n, s["profile"]) for n, s in doc["scenarios"].items() if s.get("profile")]
    for name, prof in profiles:
        lines += ["", f"py-spy, {name} (share of samples on top of the stack, all vmkeep processes):", "",
                  "| function | share |", "|---|---:|"]
        lines += [f"| `{p['function']}` | {p['share']:.1%} |" for p in prof]
    return [*lines, ""]


def charts(doc: Doc, out: Path) -> list[Path]:
    """One PNG per scenario that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    gib = doc["disk_gib"]
    color = {"limit": "#888", "vmkeep": "#2a6"}

    def bars(name: str, runs: dict[str, dict[str, float]], title: str) -> None:
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(runs) + 1.2))
        labels = list(runs)
        ax.barh(labels, [runs[k]["gb_s"] for k in labels],
                color=[next((c for key, c in color.items() if key in k), "#36c") for k in labels])
        ax.set(title=title, xlabel="GB/s")
        ax.invert_yaxis()
        save(fig, name)

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = out / f"peers-{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made.append(path)

    sc = doc["scenarios"]
    if "full" in sc:
        bars("full", sc["full"]["runs"], f"full backup, {gib:.0f} GiB disk")
    if "restore" in sc:
        bars("restore", sc["restore"]["runs"], f"restore of the full point, {gib:.0f} GiB")
    if "incremental" in sc:
        runs = sc["incremental"]["runs"]
        fracs = list(next(iter(runs.values())))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / len(runs)
        for i, (tool, per) in enumerate(runs.items()):
            ax.bar([x + i * width for x in range(len(fracs))], [per[f]["seconds"] for f in fracs], width, label=tool)
        ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(fracs))], [f"{f} rewritten" for f in fracs])
        ax.set(title=f"incremental backup, {gib:.0f} GiB disk", ylabel="seconds")
        ax.legend()
        save(fig, "incremental")
    if "dedup" in sc:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for tool, v in sc["dedup"]["runs"].items():
            after = v["stored_mib_after_each"]
            ax.plot(range(1, len(after) + 1), [m / 1024 for m in after], marker="o", label=tool)
        ax.set(title=f"stored bytes, clones of one {gib:.0f} GiB template", xlabel="clones backed up", ylabel="GiB")
        ax.legend()
        save(fig, "dedup")
    if "chain" in sc:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
        for tool, v in sc["chain"]["runs"].items():
            left.plot([m / 1024 for m in v["stored_mib_per_day"]], label=tool)
            right.bar(tool, v["restore_latest"]["seconds"])
        left.set(title="stored over the month", xlabel="day", ylabel="GiB")
        left.legend()
        right.set(title="restore of the latest point", ylabel="seconds")
        save(fig, "chain")
    return made
