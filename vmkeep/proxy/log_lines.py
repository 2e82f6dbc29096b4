"""A backup's log lines into the catalog (``job_vm_logs``), so the job's page, the API and the CLI
show what the proxy did for that VM without anyone reading the proxy's stderr.

While a backup task runs, a handler on the ``vmkeep`` logger collects its INFO-and-above lines,
secrets masked (vmkeep.logs.Redacting), and one thread writes them in batches. A proxy runs
several backups at once, each with its own handler: a line that names its VM (``extra={"vm": …}``)
goes to that VM's backup, a line without one to the backup whose thread logged it, or, from the
engine's worker threads (``vmkeep-disk_0``, …), to the only backup running (with two running it
cannot be told whose it is, and goes to stderr only). The proxy's own lines (its heartbeat) stay
out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from vmkeep.catalog.models import JobVMLog
from vmkeep.logs import Redacting

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
MAX_LINES = 500  # per task; the catalog keeps at most as many per backup row (migration 0014)
MESSAGE_CHARS = 4000
ENGINE_THREADS = ("vmkeep", "scratch-watch")  # the names of the threads a backup starts (disk readers, …)


class CatalogLog(logging.Handler):
    """Collects one backup's log lines; :meth:`close` writes the last of them."""

    active: ClassVar[set[CatalogLog]] = set()
    active_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, sessions: sessionmaker[Session], job_vm_id: int, job_id: int, vm: str) -> None:
        super().__init__(logging.INFO)
        self.addFilter(Redacting())
        self.sessions, self.job_vm_id, self.job_id, self.vm = sessions, job_vm_id, job_id, vm
        self.thread = threading.get_ident()  # the task's own thread
        self.guard = threading.Lock()  # emit runs in any thread, the writer in its own
        self.pending: list[dict[str, Any]] = []
        self.taken = 0
        self.dropped = 0
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write_out, name=f"log-lines-{job_vm_id}", daemon=True)
        self._writer.start()

    def mine(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` belongs to this backup (see the module's docstring)."""
        vm, job = getattr(record, "vm", None), getattr(record, "job", None)
        if vm is not None:
            return bool(vm == self.vm and (job is None or job == self.job_id))
        if job is not None and job != self.job_id:
            return False
        if record.thread == self.thread:
            return True
        if not (record.threadName or "").startswith(ENGINE_THREADS):
            return False  # the proxy's heartbeat, another task's thread
        with CatalogLog.active_lock:
            return CatalogLog.active == {self}

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == __name__ or not self.mine(record):
            return  # never its own complaints: a failing write would feed itself
        message = record.getMessage()
        if record.exc_text:
            message += "\n" + record.exc_text
        line = {"job_vm_id": self.job_vm_id, "at": datetime.fromtimestamp(record.created, UTC),
                "level": record.levelname[:10], "logger": record.name[:200], "message": message[:MESSAGE_CHARS]}
        with self.guard:
            if self.taken >= MAX_LINES:
                self.dropped += 1
                return
            self.taken += 1
            self.pending.append(line)

    def flush(self) -> None:
        """Write what was collected; a catalog that does not answer loses these lines (they are
        on stderr too), never the backup."""
        with self.guard:
            batch, self.pending = self.pending, []
        if not batch:
            return
        try:
            with self.sessions() as session:
                session.execute(insert(JobVMLog), batch)
                session.commit()
        except Exception as exc:  # best effort, like progress
            log.warning("backup %s: %d log lines not written to the catalog: %s", self.job_vm_id, len(batch), exc)

    def _write_out(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        if self._writer.is_alive() and self._writer is not threading.current_thread():
            self._writer.join()
        self.flush()
        if self.dropped:
            log.info("backup %s: %d log lines beyond the first %d kept on stderr only", self.job_vm_id,
                     self.dropped, MAX_LINES)
        super().close()


@contextmanager
def catalog_log(sessions: sessionmaker[Session], job_vm_id: int, job_id: int, vm: str) -> Iterator[CatalogLog]:
    """The ``vmkeep`` loggers' lines of this backup go into the catalog while the block runs."""
    handler = CatalogLog(sessions, job_vm_id, job_id, vm)
    logger = logging.getLogger("vmkeep")
    with CatalogLog.active_lock:
        CatalogLog.active.add(handler)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        with CatalogLog.active_lock:
            CatalogLog.active.discard(handler)
        handler.close()
