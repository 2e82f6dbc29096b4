"""Datastore files over HTTPS: the ``/folder`` URL of vCenter and ESXi, for reading a snapshot's
disk (byte ranges) and for writing a restored one back; and the streaming upload both the
``/folder`` PUT and the NFC import send a restored disk with.

A restore never stages a disk on the proxy: :class:`StreamUpload` runs one HTTP request on a
thread of its own whose body is fed, through a short in-memory queue, by whatever the restore
writes next, so the data goes out while the following chunks are still being read.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import httpx

from vmkeep.hypervisors.base import HypervisorError
from vmkeep.hypervisors.vmware.session import Session, Target

log = logging.getLogger(__name__)

QUEUE_DEPTH = 2  # blocks waiting to be sent: what a stream holds in memory besides the one in flight
# a server that takes nothing for 2 minutes has given up; its answer may take longer (it may
# finish writing the disk first)
TIMEOUT = httpx.Timeout(120, connect=30, read=600)
ABORT_WAIT = 5.0  # seconds an abort waits for the sending thread; a send stuck longer fails on its timeout
ZERO_BLOCK = bytes(4 << 20)
_END, _ABORT = object(), object()


def folder_url(target: Target, datacenter: str, datastore: str, path: str) -> str:
    return (f"{target.base_url}/folder/{quote(path)}?"
            + urlencode({"dcPath": datacenter, "dsName": datastore}))


class UploadAborted(Exception):
    """Raised inside the request body to break the connection off."""


class StreamUpload:
    """One HTTP request (``method`` to ``url``) whose body is what :meth:`send` is given, sent
    as it comes by a thread of its own; :meth:`finish` ends the body and checks the answer,
    :meth:`abort` breaks the request off. ``length``: the body's size when known (a
    Content-Length, as the ``/folder`` PUT wants), else the body is sent chunked."""

    def __init__(self, session: Session, method: str, url: str, *, what: str, content_type: str,
                 length: int | None = None) -> None:
        self.what = what
        self.sent = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._reply: httpx.Response | None = None
        headers = {"Cookie": session.cookie, "Content-Type": content_type}
        if length is not None:
            headers["Content-Length"] = str(length)
        verify: Any = session.context if session.context is not None else False
        log.info("%s %s (%s)", method, url.split("?", 1)[0], what)
        self._thread = threading.Thread(target=self._run, args=(method, url, headers, verify),
                                        name="vmkeep-upload", daemon=True)
        self._thread.start()

    def _body(self) -> Iterator[bytes]:
        while True:
            block = self._queue.get()
            if block is _END:
                return
            if block is _ABORT:
                raise UploadAborted(f"{self.what} was cancelled")
            yield block

    def _run(self, method: str, url: str, headers: dict[str, str], verify: Any) -> None:
        try:
            with httpx.Client(verify=verify, timeout=TIMEOUT) as client:
                self._reply = client.request(method, url, content=self._body(), headers=headers)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread in send/finish
            self._error = exc
        finally:
            self._done.set()

    def send(self, data: bytes) -> None:
        """Queue ``data`` for the body; blocks while the queue is full (the network is slower),
        fails at once if the request ended early (the server answered or the connection broke)."""
        if not data:
            return
        while not self._done.is_set():
            try:
                self._queue.put(data, timeout=0.5)
                self.sent += len(data)
                return
            except queue.Full:
                continue
        self._raise(ended_early=True)

    def finish(self) -> httpx.Response:
        """End the body and wait for the server's answer; raises unless it is a success."""
        while not self._done.is_set():
            try:
                self._queue.put(_END, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._raise(ended_early=False)
        assert self._reply is not None
        log.info("%s: %s after %d bytes", self.what, self._reply.status_code, self.sent)
        return self._reply

    def abort(self) -> None:
        """Break the request off (the body raises inside the client, which closes the connection);
        waits at most ABORT_WAIT for it, so that Ctrl-C is not held up by a stuck network."""
        if self._done.is_set():
            return
        try:
            while True:  # make room: the sender may be waiting on a full queue
                self._queue.get_nowait()
        except queue.Empty:
            pass
        try:
            self._queue.put_nowait(_ABORT)
        except queue.Full:
            pass
        self._thread.join(timeout=ABORT_WAIT)

    def _raise(self, *, ended_early: bool) -> None:
        reply, error = self._reply, self._error
        if error is not None:
            raise HypervisorError(f"{self.what} failed after {self.sent} bytes: {error}") from error
        if reply is not None and reply.status_code >= 300:
            raise HypervisorError(f"{self.what}: the server refused it with {reply.status_code} "
                                  f"{reply.text.strip()[:300]}")
        if ended_early:
            raise HypervisorError(f"{self.what}: the server answered {reply.status_code if reply else 'nothing'} "
                                  "before the upload was complete")


class FolderWriter:
    """A restored disk written over an existing flat file with one ``/folder`` PUT, in order:
    data as it comes, zeros sent as zeros (a PUT replaces the whole file). Nothing is staged."""

    sequential = True

    def __init__(self, upload: StreamUpload) -> None:
        self.upload = upload
        self.at = 0

    def encode(self, data: bytes, offset: int) -> bytes:
        return data

    def write(self, encoded: bytes, offset: int) -> None:
        self._check(offset)
        self.upload.send(encoded)
        self.at += len(encoded)

    def zero(self, offset: int, length: int) -> None:
        self._check(offset)
        while length:
            n = min(length, len(ZERO_BLOCK))
            self.upload.send(ZERO_BLOCK if n == len(ZERO_BLOCK) else ZERO_BLOCK[:n])
            self.at += n
            length -= n

    def _check(self, offset: int) -> None:
        if offset != self.at:
            raise HypervisorError(f"{self.upload.what}: data for offset {offset} came when the upload is at "
                                  f"{self.at}; a datastore upload takes the disk in order")


def put_stream(session: Session, datacenter: str, datastore: str, path: str, size: int) -> StreamUpload:
    """A PUT of ``size`` bytes to ``[datastore] path``, fed by :meth:`StreamUpload.send`."""
    return StreamUpload(session, "PUT", folder_url(session.target, datacenter, datastore, path),
                        what=f"uploading [{datastore}] {path}", content_type="application/octet-stream", length=size)
