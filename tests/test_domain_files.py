"""A VM vmkeep removes (a boot check's sandbox, an instant recovery, a failed restore's copy) takes
the console log and socket directory made for it along; files of shared directories stay."""

from __future__ import annotations

from pathlib import Path

from vmkeep.hypervisors.libvirt.domain_xml import host_paths_to_create, remove_own_host_files


def _xml(own: Path, shared: Path) -> str:
    return f"""<domain type='qemu'><name>copy-1</name><devices>
      <serial type='unix'><source mode='bind' path='{own}/console.sock'/><log file='{own}/console.log'/></serial>
      <channel type='unix'><source mode='bind' path='{shared}/agent.sock'/></channel>
    </devices></domain>"""


def test_own_directories_go_shared_ones_stay(tmp_path: Path) -> None:
    own, shared = tmp_path / "copy-1", tmp_path / "shared"
    xml = _xml(own, shared)
    assert host_paths_to_create(xml) == sorted([str(own), str(shared)])
    for d in (own, shared):
        d.mkdir()
    for f in (own / "console.log", own / "console.sock", shared / "agent.sock", shared / "other.log"):
        f.write_text("x")
    remove_own_host_files(xml, "copy-1")
    assert not own.exists()
    assert sorted(p.name for p in shared.iterdir()) == ["agent.sock", "other.log"]


def test_a_directory_holding_more_than_the_vms_files_stays(tmp_path: Path) -> None:
    own = tmp_path / "copy-1"
    own.mkdir()
    (own / "console.log").write_text("x")
    (own / "notes.txt").write_text("the administrator's")
    remove_own_host_files(_xml(own, tmp_path / "shared"), "copy-1")
    assert sorted(p.name for p in own.iterdir()) == ["notes.txt"]
