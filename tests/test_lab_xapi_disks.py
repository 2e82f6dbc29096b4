"""The XAPI simulator's disks: qcow2 images with internal snapshots, CBT from QEMU's own
persistent bitmaps, NBD over TLS through the counting relay, and the HTTP import/export bodies.

Run under ``flock /tmp/vmkeep-heavy.lock`` (qemu-img, qemu-io and qemu-nbd).
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import nbd
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from vmkeep.errors import ImageError
from vmkeep.lab.xapi.images import Images, NoCbtMetadata
from vmkeep.lab.xapi.nbd import NbdServers
from vmkeep.lab.xapi.streams import StreamError, export_stream, import_stream

MiB = 1 << 20
SIZE = 64 * MiB
BLOCK = 64 << 10


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Images, NbdServers, Path]]:
    state = tmp_path_factory.mktemp("xapi-state")
    images = Images(state)
    servers = NbdServers(state, images)
    try:
        yield images, servers, state / "sr-local"
    finally:
        servers.close()


def new_uuid() -> str:
    return str(uuidlib.uuid4())


def set_blocks(bitmap: bytes) -> list[int]:
    return [i for i in range(len(bitmap) * 8) if bitmap[i >> 3] & (0x80 >> (i & 7))]


def live_disk(images: Images, sr: Path, *, cbt: bool = True) -> str:
    vdi = new_uuid()
    images.create(sr, vdi, SIZE)
    if cbt:
        images.enable_cbt(vdi)
    return vdi


def snapshot(images: Images, vdi: str) -> str:
    snap = new_uuid()
    images.snapshot(vdi, snap)
    return snap


def client_dir(tmp_path: Path, pem: str) -> Path:
    """As the connector does: the cert get_nbd_info returned, alone, as libnbd's CA."""
    d = tmp_path / "nbd-client"
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca-cert.pem").write_text(pem)
    return d


def nbds_uri(port: int, exportname: str, certs: Path) -> str:
    return f"nbds://127.0.0.1:{port}/{quote(exportname, safe='')}?tls-certificates={certs}"


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def until(check, timeout: float = 2.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.01)
    return bool(check())


def snapshot_raw(images: Images, snap: str, out: Path) -> bytes:
    name = images.snapshot_name(snap)
    assert name == snap
    subprocess.run(["qemu-img", "convert", "-U", "-l", f"snapshot.name={name}", "-O", "raw",
                    str(images.path(snap)), str(out)], check=True)
    return out.read_bytes()


def test_changed_blocks_are_exactly_the_blocks_written_between_two_snapshots(sim) -> None:  # type: ignore[no-untyped-def]
    images, _, sr = sim
    vdi = live_disk(images, sr)
    images.write(vdi, 0, b"before the first snapshot" * 100)
    s1 = snapshot(images, vdi)
    images.write(vdi, 1 * MiB, os.urandom(64 << 10))  # block 16 exactly
    images.write(vdi, 5 * MiB + 100 * 1024, os.urandom(4096))  # inside block 81
    s2 = snapshot(images, vdi)
    bitmap = images.changed_blocks(s1, s2)
    assert len(bitmap) == SIZE // BLOCK // 8
    assert set_blocks(bitmap) == [16, 81]
    assert bitmap[2] == 0x80 and bitmap[10] == 0x40  # most significant bit first

    images.write(vdi, 3 * MiB - 2048, b"x" * 4096)  # straddles blocks 47 and 48
    s3 = snapshot(images, vdi)
    assert set_blocks(images.changed_blocks(s2, s3)) == [47, 48]
    assert set_blocks(images.changed_blocks(s1, s3)) == [16, 47, 48, 81]  # both frozen bitmaps OR-ed
    assert set_blocks(images.changed_blocks(s2, s2)) == []
    with pytest.raises(NoCbtMetadata):
        images.changed_blocks(s3, s1)
    # the log lives in the image itself: one frozen bitmap per snapshot plus the enabled one
    assert sorted(images.bitmaps(vdi)) == ["cbt-1", "cbt-2", "cbt-3", "cbt-4"]

    # destroying the middle snapshot merges its bitmap into the next: s1 -> s3 stays whole
    images.destroy(s2)
    assert set_blocks(images.changed_blocks(s1, s3)) == [16, 47, 48, 81]
    assert sorted(images.bitmaps(vdi)) == ["cbt-1", "cbt-3", "cbt-4"]  # s2 ended cbt-2


def test_disable_cbt_breaks_the_chain(sim) -> None:  # type: ignore[no-untyped-def]
    images, _, sr = sim
    vdi = live_disk(images, sr)
    s1 = snapshot(images, vdi)
    images.disable_cbt(vdi)
    assert images.bitmaps(vdi) == []
    images.write(vdi, 0, b"a" * 512)
    images.enable_cbt(vdi)
    s2 = snapshot(images, vdi)
    images.write(vdi, 2 * MiB, b"b" * 512)
    s3 = snapshot(images, vdi)
    with pytest.raises(NoCbtMetadata) as caught:
        images.changed_blocks(s1, s3)
    assert caught.value.vdi == s1
    with pytest.raises(NoCbtMetadata):
        images.changed_blocks(s1, s2)
    assert set_blocks(images.changed_blocks(s2, s3)) == [32]

    plain = live_disk(images, sr, cbt=False)  # never enabled: its snapshots have no log at all
    p1, p2 = snapshot(images, plain), snapshot(images, plain)
    with pytest.raises(NoCbtMetadata):
        images.changed_blocks(p1, p2)


def test_data_destroy_frees_the_space_and_keeps_changed_blocks(sim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    images, servers, sr = sim
    vdi = live_disk(images, sr)
    images.write(vdi, 0, os.urandom(8 * MiB))
    s1 = snapshot(images, vdi)
    assert images.allocated(s1) == 8 * MiB
    images.write(vdi, 0, os.urandom(8 * MiB))  # the live disk no longer shares s1's clusters
    s2 = snapshot(images, vdi)
    used = os.stat(images.path(vdi)).st_blocks * 512

    images.data_destroy(s1)
    freed = used - os.stat(images.path(vdi)).st_blocks * 512
    assert freed >= 7 * MiB, f"only {freed} bytes freed"
    assert images.kind(s1) == "metadata" and images.allocated(s1) == 0
    assert images.snapshot_name(s1) is None
    listing = subprocess.run(["qemu-img", "snapshot", "-U", "-l", str(images.path(vdi))],
                             capture_output=True, text=True, check=True).stdout
    assert s1 not in listing and s2 in listing
    # still valid as the start of a change log
    assert set_blocks(images.changed_blocks(s1, s2)) == list(range(8 * MiB // BLOCK))
    # its data cannot be read any more
    with pytest.raises(StreamError) as caught:
        export_stream(images, s1)
    assert caught.value.code == "VDI_INCOMPATIBLE_TYPE"
    with pytest.raises(ImageError):
        servers.export(s1, f"/{s1}?session_id=OpaqueRef:x", "xen1", tls=True)
    # a live disk destroyed while snapshots remain keeps its file until the last one goes
    path = images.path(vdi)
    images.destroy(vdi)
    assert path.exists()
    assert snapshot_raw(images, s2, tmp_path / "s2.raw")[:8]  # s2 still readable
    images.destroy(s2)
    assert path.exists()
    images.destroy(s1)
    assert not path.exists()


def test_nbd_over_tls_with_the_returned_certificate(sim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    images, servers, sr = sim
    vdi = live_disk(images, sr)
    data = os.urandom(2 * MiB)
    images.write(vdi, 10 * MiB, data)
    snap = snapshot(images, vdi)
    images.write(vdi, 10 * MiB, b"\0" * 4096)  # the live disk moves on; the snapshot does not

    pem = servers.host_cert("xen1")
    cert = x509.load_pem_x509_certificate(pem.encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "xen1"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ips = {str(ip) for ip in cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)}
    assert ips == {"127.0.0.1", "127.0.0.2"}

    exportname = f"/{snap}?session_id=OpaqueRef:{new_uuid()}"
    port = servers.export(snap, exportname, "xen1", tls=True)
    assert servers.export(snap, exportname, "xen2", tls=True) == port  # one server per (VDI, name, TLS)
    assert servers.export(snap, exportname, "xen1", tls=False) != port
    certs = client_dir(tmp_path, pem)
    h = connect(nbds_uri(port, exportname, certs))
    try:
        assert h.get_size() == SIZE
        assert h.is_read_only()
        assert h.pread(2 * MiB, 10 * MiB) == data
        extents: list[tuple[int, int]] = []

        def record(meta: str, offset: int, entries: list[int], err: int) -> int:
            at = offset
            for i in range(0, len(entries), 2):
                extents.append((at, entries[i + 1]))
                at += entries[i]
            return 0

        h.block_status(SIZE, 0, record)
        holes = [at for at, flags in extents if flags & nbd.STATE_HOLE]
        assert extents[0] == (0, 3) and 0 in holes  # a sparse snapshot shows its holes
        assert (10 * MiB, 0) in extents
    finally:
        h.shutdown()

    with pytest.raises(nbd.Error):  # another session's export name: the handshake fails
        connect(nbds_uri(port, f"/{snap}?session_id=OpaqueRef:{new_uuid()}", certs))
    with pytest.raises(nbd.Error):  # plain NBD to a TLS server
        connect(f"nbd://127.0.0.1:{port}/{quote(exportname, safe='')}")
    other = client_dir(tmp_path / "other", servers.host_cert("xen2"))
    with pytest.raises(nbd.Error):  # xen2's certificate does not vouch for xen1's server
        connect(nbds_uri(port, exportname, other))

    plain = f"/{vdi}?session_id=OpaqueRef:{new_uuid()}"  # a network with purpose insecure_nbd
    h = connect(f"nbd://127.0.0.1:{servers.export(vdi, plain, 'xen1', tls=False)}/{quote(plain, safe='')}")
    try:
        assert h.pread(4096, 10 * MiB) == bytes(4096)  # the live disk
    finally:
        h.shutdown()
    servers.drop(exportname_prefix=f"/{vdi}?")
    assert not [key for key in servers._exports if key[0] == vdi]


def test_attached_bytes_sent_and_break_after(sim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    images, servers, sr = sim
    vdi = live_disk(images, sr)
    images.write(vdi, 0, os.urandom(8 * MiB))
    snap = snapshot(images, vdi)
    exportname = f"/{snap}?session_id=OpaqueRef:{new_uuid()}"
    port = servers.export(snap, exportname, "xen1", tls=True)
    uri = nbds_uri(port, exportname, client_dir(tmp_path, servers.host_cert("xen1")))

    assert snap not in servers.attached()
    before = servers.bytes_sent(snap)
    h = connect(uri)
    assert servers.attached() >= {snap}
    h.pread(MiB, 0)
    assert servers.bytes_sent(snap) - before >= MiB
    h.shutdown()
    assert until(lambda: snap not in servers.attached())

    servers.break_after(snap, 3 * MiB)
    h = connect(uri)
    with pytest.raises(nbd.Error):
        for i in range(8):
            h.pread(MiB, i * MiB)
    assert i >= 2  # cut mid-way, not at once
    assert until(lambda: snap not in servers.attached())
    with pytest.raises(nbd.Error):  # and refused from then on
        connect(uri)
    servers.mend(snap)
    h = connect(uri)
    assert len(h.pread(MiB, 7 * MiB)) == MiB
    h.shutdown()

    # data_destroy stops the servers of the snapshot first
    images.data_destroy(snap)
    with pytest.raises(nbd.Error):
        connect(uri)


def chunked(*chunks: tuple[int, bytes]) -> bytes:
    body = b"".join(struct.pack("<QI", offset, len(data)) + data for offset, data in chunks)
    return body + struct.pack("<QI", 0, 0)


def test_chunked_import_writes_only_the_sent_ranges(sim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    images, _, sr = sim
    vdi = live_disk(images, sr)
    old = os.urandom(4 * MiB)
    images.write(vdi, 0, old)  # what the import must leave alone between its chunks
    s1 = snapshot(images, vdi)
    chunks = [(0, os.urandom(64 << 10)), (3 * MiB + 512, os.urandom(1000)), (40 * MiB, os.urandom(5 * MiB))]
    body = chunked(*chunks)
    import_stream(images, vdi, io.BytesIO(body), len(body), chunked=True)

    reference = tmp_path / "reference.raw"
    expected = bytearray(SIZE)
    expected[:len(old)] = old
    for offset, data in chunks:
        expected[offset:offset + len(data)] = data
    reference.write_bytes(expected)
    subprocess.run(["qemu-img", "compare", "-U", "-q", "-f", "raw", "-F", "qcow2", str(reference),
                    str(images.path(vdi))], check=True)
    # the writes went through QEMU, so the enabled bitmap recorded them
    s2 = snapshot(images, vdi)
    assert set_blocks(images.changed_blocks(s1, s2)) == [0, 48] + list(range(640, 640 + 80))
    assert images.allocated(vdi) < 10 * MiB  # holes never sent stay holes

    too_far = chunked((SIZE - 100, b"x" * 200))
    with pytest.raises(StreamError) as caught:
        import_stream(images, vdi, io.BytesIO(too_far), len(too_far), chunked=True)
    assert caught.value.code == "VDI_IO_ERROR"
    truncated = chunked((0, b"y" * 100))[:-12]
    with pytest.raises(StreamError):
        import_stream(images, vdi, io.BytesIO(truncated), None, chunked=True)

    raw = bytearray(SIZE)
    raw[7 * MiB:7 * MiB + 3] = b"raw"
    import_stream(images, vdi, io.BytesIO(bytes(raw)), SIZE, chunked=False)
    reference.write_bytes(raw)
    subprocess.run(["qemu-img", "compare", "-U", "-q", "-f", "raw", "-F", "qcow2", str(reference),
                    str(images.path(vdi))], check=True)
    with pytest.raises(StreamError) as caught:
        import_stream(images, vdi, io.BytesIO(bytes(SIZE - 512)), SIZE - 512, chunked=False)
    assert caught.value.code == "VDI_IO_ERROR"


def test_export_stream_equals_the_image(sim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    images, _, sr = sim
    vdi = live_disk(images, sr)
    images.write(vdi, 0, os.urandom(MiB))
    images.write(vdi, 33 * MiB + 7, os.urandom(3 * MiB))
    snap = snapshot(images, vdi)
    images.write(vdi, 0, os.urandom(MiB))

    live = tmp_path / "live.raw"
    with live.open("wb") as f:
        for piece in export_stream(images, vdi):
            f.write(piece)
    assert live.stat().st_size == SIZE
    subprocess.run(["qemu-img", "compare", "-U", "-q", "-f", "raw", "-F", "qcow2", str(live),
                    str(images.path(vdi))], check=True)

    exported = b"".join(export_stream(images, snap))
    assert exported == snapshot_raw(images, snap, tmp_path / "snap.raw")
    assert exported[:MiB] != live.read_bytes()[:MiB]

    copy = new_uuid()
    images.copy(snap, sr, copy)
    assert images.size(copy) == SIZE and images.bitmaps(copy) == []
    assert b"".join(export_stream(images, copy)) == exported


def test_changed_blocks_across_a_resize(sim) -> None:  # type: ignore[no-untyped-def]
    images, _, sr = sim
    vdi = live_disk(images, sr)
    s1 = snapshot(images, vdi)
    images.resize(vdi, 2 * SIZE)  # qcow2 grows the bitmaps with the disk
    images.write(vdi, 100 * MiB, b"z" * 512)
    s2 = snapshot(images, vdi)
    assert images.size(s1) == SIZE and images.size(s2) == 2 * SIZE
    bitmap = images.changed_blocks(s1, s2)
    assert len(bitmap) == 2 * SIZE // BLOCK // 8  # sized by the later snapshot
    assert set_blocks(bitmap) == [1600]
    with pytest.raises(ImageError):
        images.resize(vdi, SIZE)
