"""The simulator's NBD servers: qemu-nbd per exported VDI behind a counting TCP forwarder.

XAPI serves a VDI's data over NBD with TLS on each host, the export name carrying the session
(``/<vdi-uuid>?session_id=OpaqueRef:…``). Here each (VDI, export name) gets a read-only qemu-nbd
(with ``-l`` for a snapshot's internal snapshot) on a unix socket, exporting under exactly that
name, so a client asking for another name fails the handshake. A TCP listener on 127.0.0.1
relays bytes both ways unchanged (TLS ends in qemu-nbd), using splice(2) so the relay costs no
Python per byte: the backup benchmark compares reads through it with nbdcopy through it. The
relay knows what XAPI knows: which VDIs have a connection open (they are "attached"), how many
bytes each VDI sent, and, for fault injection, it cuts a VDI's connections once a number of
bytes went out and refuses new ones.

qemu-nbd gets SIGTERM when the thread that started it ends (so none outlives the simulator),
and the simulator's request threads are short-lived: the servers are started and stopped from
one long-lived thread.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import nbd

from vmkeep.errors import ImageError
from vmkeep.lab.xapi.certs import host_cert_dir, host_cert_pem
from vmkeep.lab.xapi.images import Images, image_opts
from vmkeep.transport.nbd_client import unix_socket_of
from vmkeep.transport.qemu_nbd import serve_on_socket

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes moved per splice: a pipe this large needs one round trip per 1 MiB read
F_SETPIPE_SZ = 1031
UPSTREAM_BUFFER = 256 << 10


@dataclass(eq=False)
class _Conn:
    client: socket.socket
    upstream: socket.socket
    vdi: str
    pumps: int = 2  # relay threads still running; the last one closes the sockets
    done: bool = False

    def cut(self) -> None:
        """Stop both directions now (the relay threads see the shutdown and end)."""
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@dataclass(eq=False)
class _Export:
    vdi: str
    exportname: str
    tls: bool
    port: int
    listener: socket.socket
    socket: Path
    server: ExitStack  # the qemu-nbd process; closed from the spawner thread
    stopped: threading.Event = field(default_factory=threading.Event)
    conns: set[_Conn] = field(default_factory=set)
    thread: threading.Thread | None = None


class NbdServers:
    """NBD exports of VDIs on 127.0.0.1 ports, with XAPI's view of who is connected."""

    def __init__(self, state: Path, images: Images) -> None:
        self.state = state
        self.images = images
        self._lock = threading.Lock()  # the exports
        self._stats = threading.Lock()  # counters, budgets, connections
        self._exports: dict[tuple[str, str, bool], _Export] = {}
        self._open: Counter[str] = Counter()
        self._sent: Counter[str] = Counter()
        self._budget: dict[str, int] = {}  # vdi -> bytes it may still send (break_after)
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="xapi-nbd-servers")
        images.add_listener(lambda uuid: self.drop(uuid))

    # ---- the interface ---------------------------------------------------------------------

    def host_cert(self, host: str) -> str:
        """PEM of ``host``'s self-signed NBD certificate (CN = host)."""
        return host_cert_pem(self.state, host)

    def export(self, vdi_uuid: str, exportname: str, host: str, *, tls: bool) -> int:
        """Serve the VDI under ``exportname`` and return its port on 127.0.0.1. One server per
        (VDI, export name, TLS or not): a second host asking gets the first one's server (and
        certificate), a plain request never gets a TLS server."""
        with self.images.lock, self._lock:  # this order everywhere: Images calls drop() under its lock
            found = self._exports.get((vdi_uuid, exportname, tls))
            if found is not None:
                return found.port
            path, snapshot = self.images.source(vdi_uuid)
            certs = host_cert_dir(self.state, host) if tls else None
            server = ExitStack()
            uri = self._spawner.submit(self._start, server, path, snapshot, exportname, certs).result()
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            listener.settimeout(0.2)  # the accept loop looks at `stopped` this often
            port = listener.getsockname()[1]
            ex = _Export(vdi_uuid, exportname, tls, port, listener, Path(unix_socket_of(uri)), server)
            ex.thread = threading.Thread(target=self._accept, args=(ex,), name=f"xapi-nbd-{port}", daemon=True)
            ex.thread.start()
            self._exports[(vdi_uuid, exportname, tls)] = ex
        log.info("NBD export %r of VDI %s (%s, %s) on 127.0.0.1:%d", exportname, vdi_uuid,
                 f"snapshot {snapshot}" if snapshot else "live disk", "TLS" if tls else "plain", port)
        return port

    def attached(self) -> set[str]:
        """VDI uuids with an NBD connection open now."""
        with self._stats:
            return {vdi for vdi, n in self._open.items() if n > 0}

    def bytes_sent(self, vdi_uuid: str) -> int:
        """Bytes sent to NBD clients of the VDI so far (TLS records included)."""
        with self._stats:
            return self._sent[vdi_uuid]

    def break_after(self, vdi_uuid: str, after_bytes: int) -> None:
        """Cut the VDI's connections once ``after_bytes`` more bytes went out to its clients, and
        refuse new connections from then on (until :meth:`mend`)."""
        with self._stats:
            self._budget[vdi_uuid] = max(0, after_bytes)
            exhausted = after_bytes <= 0
        log.info("NBD fault: connections to VDI %s cut after %d more bytes", vdi_uuid, after_bytes)
        if exhausted:
            self._cut(vdi_uuid)

    def mend(self, vdi_uuid: str) -> None:
        """Undo :meth:`break_after`."""
        with self._stats:
            self._budget.pop(vdi_uuid, None)

    def drop(self, vdi_uuid: str | None = None, exportname_prefix: str | None = None) -> None:
        """Stop the servers of a VDI and/or whose export name starts with the prefix (None: any),
        cutting their connections."""
        with self._lock:
            gone = [ex for key, ex in self._exports.items()
                    if (vdi_uuid is None or ex.vdi == vdi_uuid)
                    and (exportname_prefix is None or ex.exportname.startswith(exportname_prefix))]
            for ex in gone:
                del self._exports[(ex.vdi, ex.exportname, ex.tls)]
        for ex in gone:
            self._stop(ex)

    def drop_session(self, session_ref: str) -> None:
        """Stop the servers whose export name carries this session (it logged out)."""
        with self._lock:
            names = {ex.exportname for ex in self._exports.values()
                     if ex.exportname.endswith(f"session_id={session_ref}")}
        for name in names:
            self.drop(exportname_prefix=name)

    def close(self) -> None:
        self.drop()
        self._spawner.shutdown(wait=True)

    # ---- qemu-nbd ----------------------------------------------------------------------------

    def _start(self, server: ExitStack, path: Path, snapshot: str | None, exportname: str,
               certs: Path | None) -> str:
        """Runs in the spawner thread: qemu-nbd up and answering a handshake; returns its URI."""
        tls: list[str] = []
        if certs is not None:
            tls = ["--object", f"tls-creds-x509,id=tls0,dir={str(certs).replace(',', ',,')},endpoint=server,"
                   "verify-peer=off,sanity-check=off", "--tls-creds", "tls0"]
        load = ["--load-snapshot", f"snapshot.name={snapshot}"] if snapshot else []

        def command(sock: Path) -> list[str]:
            return ["qemu-nbd", f"--socket={sock}", "--read-only", "--persistent", "--shared=0",
                    "--cache=writeback", f"--export-name={exportname}", *tls, *load,
                    "--image-opts", image_opts(path)]

        def ready(uri: str) -> None:
            h = nbd.NBD()
            try:
                if certs is not None:
                    h.set_tls(nbd.TLS_REQUIRE)
                    h.set_tls_certificates(str(certs))
                    h.set_tls_verify_peer(False)
                h.set_export_name(exportname)
                h.connect_unix(unix_socket_of(uri))
                h.shutdown()
            except nbd.Error as exc:
                raise ImageError(f"qemu-nbd does not serve {exportname!r}: {exc}") from exc

        return server.enter_context(serve_on_socket(command, f"qemu-nbd exporting {path}", ready))

    def _stop(self, ex: _Export) -> None:
        ex.stopped.set()
        with self._stats:
            conns = list(ex.conns)
        for conn in conns:
            conn.cut()
        try:
            ex.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() at once
        except OSError:
            pass
        if ex.thread is not None:
            ex.thread.join()
        ex.listener.close()
        self._spawner.submit(ex.server.close).result()
        log.info("NBD export %r of VDI %s on port %d stopped", ex.exportname, ex.vdi, ex.port)

    # ---- the relay ---------------------------------------------------------------------------

    def _accept(self, ex: _Export) -> None:
        while not ex.stopped.is_set():
            try:
                client, peer = ex.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            client.setblocking(True)
            with self._stats:
                refused = self._budget.get(ex.vdi) == 0
            if refused or ex.stopped.is_set():
                log.info("NBD connection from %s to VDI %s refused (fault injected)", peer, ex.vdi)
                client.close()
                continue
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(str(ex.socket))
            except OSError as exc:
                log.warning("NBD connection to VDI %s: qemu-nbd at %s does not answer: %s", ex.vdi, ex.socket, exc)
                client.close()
                upstream.close()
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client, upstream, ex.vdi)
            with self._stats:
                ex.conns.add(conn)
                self._open[ex.vdi] += 1
            log.debug("NBD connection from %s to VDI %s (port %d)", peer, ex.vdi, ex.port)
            threading.Thread(target=self._pump_up, args=(ex, conn), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(ex, conn), daemon=True).start()

    def _finish(self, ex: _Export, conn: _Conn) -> None:
        """One direction ended: the connection is over (counted closed at once), the last relay
        thread closes the sockets."""
        conn.cut()
        with self._stats:
            if not conn.done:
                conn.done = True
                self._open[ex.vdi] -= 1
                ex.conns.discard(conn)
            conn.pumps -= 1
            last = conn.pumps == 0
        if last:
            conn.client.close()
            conn.upstream.close()
            log.debug("NBD connection to VDI %s closed", ex.vdi)

    def _pump_up(self, ex: _Export, conn: _Conn) -> None:
        """Client -> qemu-nbd: requests are small; plain copies."""
        buf = bytearray(UPSTREAM_BUFFER)
        view = memoryview(buf)
        try:
            while True:
                n = conn.client.recv_into(buf)
                if n == 0:
                    break
                conn.upstream.sendall(view[:n])
        except OSError:
            pass
        finally:
            self._finish(ex, conn)

    def _pump_down(self, ex: _Export, conn: _Conn) -> None:
        """qemu-nbd -> client: the bulk of the bytes, moved by splice(2) through a pipe."""
        r, w = os.pipe()
        try:
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
            except OSError:  # above /proc/sys/fs/pipe-max-size: the default size still works
                pass
            src, dst = conn.upstream.fileno(), conn.client.fileno()
            while True:
                n = os.splice(src, w, CHUNK)
                if n == 0:
                    break
                allowed, exhausted = self._take(ex.vdi, n)
                left = allowed
                while left:
                    left -= os.splice(r, dst, left)
                with self._stats:
                    self._sent[ex.vdi] += allowed
                if exhausted:
                    log.info("NBD fault: VDI %s sent its allowance; cutting its connections", ex.vdi)
                    self._cut(ex.vdi)
                    break
        except OSError:
            pass
        finally:
            os.close(r)
            os.close(w)
            self._finish(ex, conn)

    def _take(self, vdi: str, n: int) -> tuple[int, bool]:
        """How many of ``n`` bytes the VDI may send, and whether its allowance is used up."""
        with self._stats:
            budget = self._budget.get(vdi)
            if budget is None:
                return n, False
            allowed = min(n, budget)
            self._budget[vdi] = budget - allowed
            return allowed, budget - allowed == 0

    def _cut(self, vdi: str) -> None:
        with self._stats:
            conns = [c for ex in list(self._exports.values()) if ex.vdi == vdi for c in ex.conns]
        for conn in conns:
            conn.cut()
