"""The lab's XAPI simulator through the official XenAPI SDK: its protocol, rules and errors are
XAPI's (docs/xen.md), so the Xen connector tested against it would fail against a pool where
it breaks them. One simulator (a real process over HTTPS) serves the whole module."""

from __future__ import annotations

import base64
import http.client
import ssl
import struct
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import nbd
import pytest
import XenAPI

from tests.conftest import free_port
from vmkeep.lab import xapi
from vmkeep.lab.vcsim import lab_pattern

MiB = 1 << 20
BLOCK = 64 << 10
NULL = "OpaqueRef:NULL"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[xapi.Xapi]:
    state = tmp_path_factory.mktemp("xapi")
    started = xapi.start(f"127.0.0.1:{free_port()}", lab_vm=True, state=state)
    try:
        yield started
    finally:
        assert xapi.stop(state)


@pytest.fixture
def x(sim: xapi.Xapi) -> Iterator[Any]:
    s = xapi.session(sim)
    yield s.xenapi
    s.xenapi.session.logout()


def failure(fn: Any, *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as err:
        fn(*args)
    return list(err.value.details)


def raw(sim: xapi.Xapi, method: str, *args: Any) -> dict[str, Any]:
    """A call without the SDK (which hides SESSION_INVALID by logging in again)."""
    proxy = xmlrpc.client.ServerProxy(sim.url, context=ssl.create_default_context(cafile=sim.ca_file))
    return dict(getattr(proxy, method)(*args))


def disk_vdis(x: Any, vm: str) -> list[str]:
    recs = [x.VBD.get_record(b) for b in x.VM.get_VBDs(vm)]
    return [r["VDI"] for r in sorted(recs, key=lambda r: int(r["userdevice"])) if r["type"] == "Disk"]


def vbd(vm: str, vdi: str) -> dict[str, Any]:
    return {"VM": vm, "VDI": vdi, "userdevice": "0", "bootable": True, "mode": "RW", "type": "Disk", "empty": False,
            "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}}


def vdi_record(sr: str, size: int) -> dict[str, Any]:
    return {"name_label": "new", "name_description": "", "SR": sr, "virtual_size": str(size), "type": "user",
            "sharable": False, "read_only": False, "other_config": {}}


def test_login_member_and_session_rules(sim: xapi.Xapi, x: Any) -> None:
    assert x.pool.get_name_label(x.pool.get_all()[0]) == "vmkeep-lab-pool"
    bad = XenAPI.Session(sim.url, transport=xmlrpc.client.SafeTransport(
        context=ssl.create_default_context(cafile=sim.ca_file)))
    assert failure(bad.xenapi.login_with_password, "root", "wrong", "2.21", "t") == \
        ["SESSION_AUTHENTICATION_FAILED", "root", "Authentication failure"]
    member = sim.url.replace("127.0.0.1", "127.0.0.2")  # the certificate names the member too
    with pytest.raises(XenAPI.Failure) as err:
        xapi.session(sim, member)
    assert err.value.details == ["HOST_IS_SLAVE", "127.0.0.1"]
    assert raw(sim, "VM.get_all", "OpaqueRef:nope")["ErrorDescription"] == ["SESSION_INVALID", "OpaqueRef:nope"]
    s = raw(sim, "session.login_with_password", "root", sim.password, "2.21", "t")["Value"]
    raw(sim, "session.logout", s)
    assert raw(sim, "VM.get_all", s)["ErrorDescription"] == ["SESSION_INVALID", s]
    assert raw(sim, "VM.frobnicate", s)["ErrorDescription"] == ["MESSAGE_METHOD_UNKNOWN", "VM.frobnicate"]
    assert raw(sim, "VM.get_record", s)["ErrorDescription"] == ["MESSAGE_PARAMETER_COUNT_MISMATCH",
                                                                  "VM.get_record", "2", "1"]


def test_records_marshal_like_xapi(x: Any) -> None:
    hosts = {r["name_label"]: r for r in x.host.get_all_records().values()}
    assert (hosts["xen1"]["address"], hosts["xen2"]["address"]) == ("127.0.0.1", "127.0.0.2")
    pool = x.pool.get_record(x.pool.get_all()[0])
    assert pool["master"] == x.host.get_by_name_label("xen1")[0]
    vms = x.VM.get_all_records()
    assert sum(r["is_control_domain"] for r in vms.values()) == 2
    assert sum(r["is_a_template"] for r in vms.values()) == 1
    vm = x.VM.get_by_name_label(xapi.LAB_VM)[0]
    rec = vms[vm]
    assert rec["power_state"] == "Running" and rec["resident_on"] == pool["master"]
    assert rec["memory_static_max"] == "268435456" and rec["VCPUs_max"] == "1"  # ints are strings
    assert isinstance(rec["snapshot_time"], xmlrpc.client.DateTime)
    vdi = x.VDI.get_record(disk_vdis(x, vm)[0])
    assert vdi["virtual_size"] == str(64 * MiB) and vdi["cbt_enabled"] is False
    assert int(vdi["physical_utilisation"]) >= 12 * MiB  # the lab VM's known data
    srs = {r["name_label"]: r for r in x.SR.get_all_records().values()}
    assert {k: srs[k]["type"] for k in srs} == {"Local storage": "ext", "Shared NFS": "nfs", "ISO library": "iso"}
    assert isinstance(srs["Local storage"]["physical_size"], str)
    assert failure(x.VM.get_record, "OpaqueRef:0") == ["HANDLE_INVALID", "VM", "OpaqueRef:0"]
    assert failure(x.VDI.get_by_uuid, "nope") == ["UUID_INVALID", "VDI", "nope"]
    x.VM.add_to_other_config(vm, "k", "v")
    assert failure(x.VM.add_to_other_config, vm, "k", "w")[0] == "MAP_DUPLICATE_KEY"
    x.VM.remove_from_other_config(vm, "k")
    assert "k" not in x.VM.get_other_config(vm)
    nets = {r["name_label"]: ref for ref, r in x.network.get_all_records().items()}
    lab_net = nets["Lab network 1"]
    assert failure(x.network.add_purpose, lab_net, "fast") == ["INVALID_VALUE", "purpose", "fast"]
    assert failure(x.network.add_purpose, lab_net, "insecure_nbd")[0] == "NETWORK_INCOMPATIBLE_PURPOSES"
    x.network.add_purpose(lab_net, "nbd")
    x.network.remove_purpose(lab_net, "nbd")
    assert x.network.get_purpose(lab_net) == []
    eth0 = nets["Pool-wide network associated with eth0"]
    x.network.remove_purpose(eth0, "nbd")
    try:
        assert x.VDI.get_nbd_info(disk_vdis(x, vm)[0]) == []  # no network allows NBD
    finally:
        x.network.add_purpose(eth0, "nbd")


def test_snapshot_destroy_and_power_rules(sim: xapi.Xapi, x: Any) -> None:
    vm = x.VM.get_by_uuid(xapi.create_vm(sim, "snapper", [8 * MiB, 4 * MiB]))
    vdis = disk_vdis(x, vm)
    snap = x.VM.snapshot(vm, "s1")
    rec = x.VM.get_record(snap)
    assert (rec["is_a_snapshot"], rec["snapshot_of"], rec["power_state"]) == (True, vm, "Halted")
    assert x.VM.get_snapshots(vm) == [snap]
    svdis = disk_vdis(x, snap)
    for orig, copy in zip(vdis, svdis, strict=True):
        r = x.VDI.get_record(copy)
        assert (r["is_a_snapshot"], r["snapshot_of"]) == (True, orig)
        assert r["virtual_size"] == x.VDI.get_virtual_size(orig)
        assert xapi.snapshot_name(sim, r["uuid"]) == r["uuid"]
    cds = [x.VBD.get_record(b) for b in x.VM.get_VBDs(snap) if x.VBD.get_type(b) == "CD"]
    assert [(c["VDI"], c["empty"], c["userdevice"]) for c in cds] == [(NULL, True, "3")]
    assert x.VIF.get_MAC(x.VM.get_VIFs(snap)[0]) == x.VIF.get_MAC(x.VM.get_VIFs(vm)[0])
    assert failure(x.VM.snapshot_with_quiesce, vm, "q") == ["VM_SNAPSHOT_WITH_QUIESCE_NOT_SUPPORTED", vm]
    assert failure(x.VM.snapshot, snap, "again")[0] == "OPERATION_NOT_ALLOWED"
    assert failure(x.VM.destroy, vm) == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    assert failure(x.VDI.destroy, vdis[0]) == ["VDI_IN_USE", vdis[0], "destroy"]
    assert failure(x.VM.start, vm, False, False) == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    x.VM.destroy(snap)
    assert all(x.VDI.get_is_a_snapshot(v) for v in svdis)  # VM.destroy keeps the VDIs
    x.VM.hard_shutdown(vm)
    x.VM.destroy(vm)
    for v in [*vdis, *svdis]:
        assert x.VDI.get_VBDs(v) == []
        x.VDI.destroy(v)
    vss = x.VM.get_by_uuid(xapi.create_vm(sim, "quiet", 4 * MiB, vss=True, cd=False, networks=()))
    assert x.VM.get_is_a_snapshot(x.VM.snapshot_with_quiesce(vss, "q1"))
    x.VM.clean_shutdown(vss)
    xen2 = x.host.get_by_name_label("xen2")[0]
    x.VM.start_on(vss, xen2, False, False)
    assert x.VM.get_resident_on(vss) == xen2 and x.host.get_resident_VMs(xen2)[-1] == vss
    x.VM.hard_shutdown(vss)
    assert (x.VM.get_power_state(vss), x.VM.get_resident_on(vss)) == ("Halted", NULL)
    assert failure(x.VM.snapshot_with_quiesce, vss, "q2") == ["VM_BAD_POWER_STATE", vss, "running", "halted"]
    assert failure(x.VBD.create, vbd(vss, disk_vdis(x, vss)[0])) == ["DEVICE_ALREADY_EXISTS", "0"]
    iso = x.SR.get_by_name_label("ISO library")[0]
    assert failure(x.VDI.create, vdi_record(iso, 512)) == ["SR_OPERATION_NOT_SUPPORTED", iso]


def connect(info: dict[str, Any], tmp: Path) -> nbd.NBD:
    """As the connector does: trust exactly the certificate get_nbd_info gave."""
    tmp.mkdir(exist_ok=True)
    (tmp / "ca-cert.pem").write_text(info["cert"])
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(f"nbds://{info['address']}:{info['port']}/{quote(info['exportname'], safe='')}"
                  f"?tls-certificates={tmp}")
    return h


def test_cbt_changed_blocks_data_destroy_and_attachment(sim: xapi.Xapi, x: Any, tmp_path: Path) -> None:
    vm = x.VM.get_by_uuid(xapi.create_vm(sim, "tracked", 4 * MiB))
    vdi = disk_vdis(x, vm)[0]
    uuid = x.VDI.get_uuid(vdi)
    x.VDI.enable_cbt(vdi)
    s1 = disk_vdis(x, x.VM.snapshot(vm, "s1"))[0]
    xapi.guest_write(sim, uuid, 5 * BLOCK + 100, b"changed")
    xapi.guest_write(sim, uuid, 17 * BLOCK, b"\1" * BLOCK)
    s2 = disk_vdis(x, x.VM.snapshot(vm, "s2"))[0]
    bits = base64.b64decode(x.VDI.list_changed_blocks(s1, s2))
    assert len(bits) == 4 * MiB // BLOCK // 8
    assert [b for b in range(64) if bits[b >> 3] & (0x80 >> (b & 7))] == [5, 17]  # MSB first
    assert failure(x.VDI.enable_cbt, s1) == ["OPERATION_NOT_ALLOWED", "VDI is a snapshot"]
    assert failure(x.VDI.data_destroy, vdi) == ["OPERATION_NOT_ALLOWED", "VDI is not a snapshot with CBT enabled"]

    info = x.VDI.get_nbd_info(s2)
    assert info and info[0]["subject"] == "xen1" and info[0]["exportname"].startswith(f"/{x.VDI.get_uuid(s2)}?")
    h = connect(info[0], tmp_path / "certs")
    try:
        assert h.pread(len(b"changed"), 5 * BLOCK + 100) == b"changed"
        assert x.VDI.get_uuid(s2) in xapi.attached(sim)
        assert any(x.VBD.get_currently_attached(b) for b in x.VDI.get_VBDs(s2))  # XAPI's dom0 VBD
        assert failure(x.VDI.list_changed_blocks, s1, s2) == ["VDI_IN_USE", s2, "list_changed_blocks"]
        assert failure(x.VDI.data_destroy, s2) == ["VDI_IN_USE", s2, "data_destroy"]
    finally:
        h.shutdown()
    assert xapi.reads(sim, x.VDI.get_uuid(s2)) > 0
    deadline = time.monotonic() + 5
    while x.VDI.get_uuid(s2) in xapi.attached(sim) and time.monotonic() < deadline:
        time.sleep(0.05)  # the relay sees the close a moment later
    assert not any(x.VBD.get_currently_attached(b) for b in x.VDI.get_VBDs(s2))
    x.VDI.data_destroy(s1)
    r = x.VDI.get_record(s1)
    assert (r["type"], r["physical_utilisation"]) == ("cbt_metadata", "0")
    assert failure(x.VDI.get_nbd_info, s1) == ["VDI_INCOMPATIBLE_TYPE", s1, "cbt_metadata"]
    assert base64.b64decode(x.VDI.list_changed_blocks(s1, s2)) == bits  # metadata is a valid vdi_from
    x.VDI.disable_cbt(vdi)
    x.VDI.enable_cbt(vdi)
    s3 = disk_vdis(x, x.VM.snapshot(vm, "s3"))[0]
    assert failure(x.VDI.list_changed_blocks, s2, s3) == ["VDI_NO_CBT_METADATA", s2]
    # a VM whose disk is CBT metadata does not start
    snap_vm = x.VBD.get_VM(x.VDI.get_VBDs(s1)[0])  # data_destroy left the snapshot VM's VBD
    halted = x.VM.create({k: v for k, v in x.VM.get_record(snap_vm).items() if k != "uuid"})
    x.VBD.create(vbd(halted, s1))
    assert failure(x.VM.start, halted, False, False) == ["VDI_INCOMPATIBLE_TYPE", s1, "cbt_metadata"]
    # a read cut short: after nbd_break the VDI's connections are refused
    xapi.nbd_break(sim, x.VDI.get_uuid(s3), 0)
    with pytest.raises(nbd.Error):
        connect(x.VDI.get_nbd_info(s3)[0], tmp_path / "certs").pread(512, 0)


def test_http_errors_inside_200_and_faults(sim: xapi.Xapi, x: Any) -> None:
    vm = x.VM.get_by_uuid(xapi.create_vm(sim, "exported", MiB, running=False))
    vdi = disk_vdis(x, vm)[0]
    x.VDI.enable_cbt(vdi)
    snap = disk_vdis(x, x.VM.snapshot(vm, "m"))[0]
    x.VDI.data_destroy(snap)
    s = xapi.session(sim)
    try:
        body = get(sim, f"/export_raw_vdi?session_id={s.handle}&vdi={x.VDI.get_uuid(snap)}&format=raw")
        assert body.startswith(b"HTTP/1.1 500 Internal Error")  # XAPI's error inside a 200
        xapi.fault(sim, "export_raw_vdi", "VDI_IO_ERROR")
        status, text = request(sim, "GET", f"/export_raw_vdi?session_id={s.handle}&vdi={vdi}&format=raw")
        assert (status, text.split()[0]) == (500, b"VDI_IO_ERROR")
        assert len(get(sim, f"/export_raw_vdi?session_id={s.handle}&vdi={vdi}&format=raw")) == MiB
    finally:
        s.xenapi.session.logout()


def test_fault_injection(sim: xapi.Xapi, x: Any) -> None:
    vm = x.VM.get_by_name_label(xapi.LAB_VM)[0]
    xapi.fault(sim, "VM.snapshot", "OTHER_OPERATION_IN_PROGRESS", times=1)
    assert failure(x.VM.snapshot, vm, "f") == ["OTHER_OPERATION_IN_PROGRESS", "VM", vm, "snapshot"]
    snap = x.VM.snapshot(vm, "f")
    vdi = disk_vdis(x, snap)[0]
    xapi.fault(sim, "VDI.destroy", "VDI_IN_USE", times=2)
    assert failure(x.VDI.destroy, vdi) == failure(x.VDI.destroy, vdi) == ["VDI_IN_USE", vdi, "destroy"]
    x.VM.destroy(snap)
    x.VDI.destroy(vdi)
    with pytest.raises(XenAPI.Failure):  # fails after making the VM: a failed call changes nothing
        xapi.create_vm(sim, "half-made", [MiB, -1])
    assert x.VM.get_by_name_label("half-made") == []


def test_http_export_import(sim: xapi.Xapi, x: Any) -> None:
    vdi = disk_vdis(x, x.VM.get_by_name_label(xapi.LAB_VM)[0])[0]
    uuid = x.VDI.get_uuid(vdi)
    s = xapi.session(sim)
    ref = s.handle
    try:
        assert request(sim, "GET", f"/export_raw_vdi?session_id=OpaqueRef:bad&vdi={uuid}")[0] == 401
        data = get(sim, f"/export_raw_vdi?session_id={ref}&vdi={uuid}&format=raw")
        assert len(data) == 64 * MiB
        for offset, length in xapi.LAB_DATA:  # the lab VM's known data
            assert data[offset:offset + length] == lab_pattern(offset, length)
        assert data[16 * MiB:17 * MiB] == bytes(MiB)
        conn = http.client.HTTPSConnection("127.0.0.1", int(sim.url.rsplit(":", 1)[1].strip("/")),
                                           context=ssl.create_default_context(cafile=sim.ca_file))
        conn.putrequest("PUT", f"/import_raw_vdi?session_id={ref}&vdi={vdi}&format=raw&chunked=true")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        assert conn.getresponse().status == 403
        body = struct.pack("<QI", BLOCK, 4) + b"abcd" + struct.pack("<QI", 0, 0)
        imp = f"/import_raw_vdi?session_id={ref}&chunked=true&vdi="
        assert request(sim, "PUT", imp + vdi, body)[0] == 500  # the VDI of a running VM
        local = x.SR.get_by_name_label("Local storage")[0]
        new = x.VDI.create(vdi_record(local, MiB))
        assert request(sim, "PUT", imp + new, body) == (200, b"")
        data = get(sim, f"/export_raw_vdi?session_id={ref}&vdi={new}&format=raw")
        assert data[BLOCK:BLOCK + 4] == b"abcd" and data.count(0) == MiB - 4
        beyond = struct.pack("<QI", MiB - 2, 4) + b"abcd" + struct.pack("<QI", 0, 0)
        status, text = request(sim, "PUT", imp + new, beyond)
        assert status == 500 and b"VDI_IO_ERROR" in text
        x.VDI.destroy(new)
    finally:
        s.xenapi.session.logout()



def request(sim: xapi.Xapi, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", int(sim.url.rsplit(":", 1)[1].strip("/")),
                                       context=ssl.create_default_context(cafile=sim.ca_file))
    conn.request(method, path, body=body)
    reply = conn.getresponse()
    return reply.status, reply.read()


def get(sim: xapi.Xapi, path: str) -> bytes:
    status, data = request(sim, "GET", path)
    assert status == 200
    return data
