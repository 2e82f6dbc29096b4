"""The simulator's process: XAPI's HTTPS endpoint on the master (127.0.0.1) and a pool member
(127.0.0.2), same port, certificate from the lab CA naming both.

``python -m vmkeep.lab.xapi.server --state DIR --listen 127.0.0.1:PORT --password-file F``
prints one JSON line when it serves, logs to DIR/xapi.log and stops on SIGTERM, ending every
qemu-nbd it started. XML-RPC at POST / and /RPC2; GET /export_raw_vdi and PUT /import_raw_vdi
as XAPI's HTTP handlers (including its quirks: an export error inside a 200, chunked
transfer-encoding refused).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import threading
import xmlrpc.client
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import parse_qs, urlsplit

from vmkeep.lab.tls import LAB_PKI, issue_server_cert
from vmkeep.lab.xapi.api import MASTER_ADDRESS, MEMBER_ADDRESS, Sim
from vmkeep.lab.xapi.model import XapiError

log = logging.getLogger(__name__)


class XapiServer(ThreadingHTTPServer):
    """One listening address; TLS is set up in the request's own thread (a slow handshake
    holds up no one else)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], sim: Sim, ctx: ssl.SSLContext, member: bool) -> None:
        super().__init__(address, Handler)
        self.sim, self.ctx, self.member = sim, ctx, member

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(30)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers and body are two writes
        try:
            tls = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS handshake with %s failed: %s", client_address, exc)
            return
        tls.settimeout(None)
        try:
            Handler(tls, client_address, self)
        finally:
            tls.close()


def linger(sock: ssl.SSLSocket, seconds: float = 2.0, limit: int = 64 << 20) -> None:
    """Read what the client still sends before closing: closing with unread data makes the kernel
    send RST, and the client loses the error reply it has not read yet (a refused import)."""
    sock.settimeout(seconds)
    got = 0
    try:
        while got < limit:
            data = sock.recv(1 << 20)
            if not data:
                return
            got += len(data)
    except (OSError, ssl.SSLError):
        return


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: XapiServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.client_address[0], format % args)

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
        log.warning("%s %s", self.client_address[0], format % args)

    def handle_one_request(self) -> None:
        """As the base class, with a handler's failure logged (the base class hides it)."""
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError, ssl.SSLError):
            self.close_connection = True
        except Exception:
            log.exception("%s %s failed", self.command, self.path)
            self.close_connection = True

    def _reply(self, status: int, body: bytes = b"", ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        if urlsplit(self.path).path not in ("/", "/RPC2"):
            self._reply(404, b"not found")
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            params, method = xmlrpc.client.loads(body)
        except Exception as exc:  # not XML-RPC: XAPI answers 500 too
            self._reply(500, f"cannot parse the XML-RPC request: {exc}".encode())
            return
        reply = self.server.sim.call(str(method), params, member=self.server.member)
        out = xmlrpc.client.dumps((reply,), methodresponse=True, allow_none=True).encode()
        self._reply(200, out, "text/xml")

    # --- HTTP handlers -------------------------------------------------------------------------
    def _vdi(self, op: str) -> tuple[str, str] | None:
        """The session check, fault injection and the VDI of an HTTP call -> (ref, uuid); None
        after replying an error."""
        query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        sim = self.server.sim
        with sim.store.lock:
            if query.get("session_id") not in sim.sessions:
                self._reply(401, b"Unauthorised")
                return None
            try:
                sim.session = query["session_id"]
                name = query.get("vdi", "")
                ref = name if name.startswith("OpaqueRef:") else sim.store.by_uuid("VDI", name)
                rec = sim.store.get("VDI", ref)
                sim.inject(op, (ref,))
                if op == "import_raw_vdi" and sim.in_use(ref, running_only=True):
                    raise XapiError("VDI_IN_USE", ref, op)
            except XapiError as exc:
                self._reply(500, " ".join(exc.details).encode())
                return None
            if query.get("format", "raw") != "raw":
                self._reply(500, f"VDI_IO_ERROR format {query['format']} is not served by the lab".encode())
                return None
            self.query = query
            return ref, str(rec["uuid"])

    def _drain(self) -> None:
        """Read and drop a refused request's body, so the connection stays in step."""
        left = int(self.headers.get("Content-Length") or 0)
        if "Content-Length" not in self.headers:
            self.close_connection = True
            linger(self.connection)
            return
        while left > 0:
            data = self.rfile.read(min(left, 1 << 20))
            if not data:
                break
            left -= len(data)

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/export_raw_vdi":
            self._reply(404, b"not found")
            return
        found = self._vdi("export_raw_vdi")
        if found is None:
            return
        ref, uuid = found
        sim = self.server.sim
        if sim.store.get("VDI", ref)["type"] == "cbt_metadata":
            # XAPI's known behaviour: the handler already said 200 when it finds no data to send
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(f"HTTP/1.1 500 Internal Error\r\n\r\nVDI_INCOMPATIBLE_TYPE {ref} cbt_metadata\r\n"
                             .encode())
            self.close_connection = True
            return
        from vmkeep.lab.xapi.streams import export_stream

        size = sim.images.size(uuid)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        sent = 0
        for chunk in export_stream(sim.images, uuid):
            self.wfile.write(chunk)
            sent += len(chunk)
        log.info("export_raw_vdi %s: %d bytes sent", uuid, sent)

    def do_PUT(self) -> None:
        if urlsplit(self.path).path != "/import_raw_vdi":
            self._reply(404, b"not found")
            return
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._reply(403, b"transfer-encoding chunked is not supported by import_raw_vdi")
            self.close_connection = True
            return
        found = self._vdi("import_raw_vdi")
        if found is None:
            self._drain()
            return
        ref, uuid = found
        from vmkeep.lab.xapi.api_vdi import _refresh
        from vmkeep.lab.xapi.streams import StreamError, import_stream

        sim = self.server.sim
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
        try:
            import_stream(sim.images, uuid, cast(BinaryIO, self.rfile), int(length) if length is not None else None,
                          chunked=self.query.get("chunked") == "true")
        except StreamError as exc:
            log.info("import_raw_vdi %s failed: %s %s", uuid, exc.code, exc)
            self.close_connection = True
            self._reply(500, str(exc).encode())
            linger(self.connection)  # the rest of the body, if the client still sends it
            return
        with sim.store.lock:
            if sim.store.exists("VDI", ref):
                _refresh(sim, ref)
        log.info("import_raw_vdi %s done", uuid)
        self._reply(200)


def serve(state: Path, listen: str, password: str) -> None:
    host, _, port_s = listen.rpartition(":")
    if host != MASTER_ADDRESS:
        raise SystemExit(f"--listen must be {MASTER_ADDRESS}:PORT (the member listens on {MEMBER_ADDRESS})")
    port = int(port_s)
    for old in ("sr", "images", "nbd"):  # the object model is in memory: start from an empty pool
        shutil.rmtree(state / old, ignore_errors=True)
    from vmkeep.lab.xapi.images import Images
    from vmkeep.lab.xapi.nbd import NbdServers

    images = Images(state / "images")
    nbd = NbdServers(state / "nbd", images)
    sim = Sim(state, password, images, nbd)
    cert, key = state / "server-cert.pem", state / "server-key.pem"
    issue_server_cert(cert, key, "vmkeep lab XAPI", (MASTER_ADDRESS, MEMBER_ADDRESS), ("localhost",))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    servers = [XapiServer((MASTER_ADDRESS, port), sim, ctx, member=False),
               XapiServer((MEMBER_ADDRESS, port), sim, ctx, member=True)]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threads = [threading.Thread(target=s.serve_forever, name=f"xapi-{'member' if s.member else 'master'}", daemon=True)
               for s in servers]
    for t in threads:
        t.start()
    log.info("XAPI simulator serves https://%s:%d/ (member %s), pid %d", MASTER_ADDRESS, port, MEMBER_ADDRESS,
             os.getpid())
    print(json.dumps({"url": f"https://{MASTER_ADDRESS}:{port}/", "member_url": f"https://{MEMBER_ADDRESS}:{port}/",
                      "pid": os.getpid(), "ca_file": str(LAB_PKI / "ca-cert.pem")}), flush=True)
    stop.wait()
    log.info("stopping")
    for s in servers:
        s.shutdown()
        s.server_close()
    nbd.close()
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The lab's XAPI simulator (not a product feature).")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--listen", default=f"{MASTER_ADDRESS}:8443")
    parser.add_argument("--password-file", type=Path, required=True)
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    args.state.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=args.state / "xapi.log", level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
    try:
        serve(args.state, args.listen, args.password_file.read_text().strip())
    except BaseException:
        log.exception("the simulator failed")
        raise
    logging.shutdown()
    # everything it started is stopped; idle keep-alive connections' threads need not be waited for
    os._exit(0)


if __name__ == "__main__":
    main()
