"""Progress of a proxy's backup, restore or repository maintenance, written into its row every second
for the API to show."""

from __future__ import annotations

import threading

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from vmkeep.catalog.models import JobVM, MaintenanceRun, RestoreJob
from vmkeep.catalog.replica_models import Replica
from vmkeep.progress import Task

FLUSH_SECONDS = 1.0


class _RowTask:
    def __init__(self, owner: RowProgress) -> None:
        self.owner = owner

    def advance(self, nbytes: int) -> None:
        with self.owner.lock:
            self.owner.done += nbytes

    def finish(self) -> None:
        pass


class RowProgress:
    """A Progress (see vmkeep.progress) whose sum lands in the ``progress_bytes`` of a
    backup's or restore's row; worker threads only add to counters, one thread writes them out."""

    def __init__(self, sessions: sessionmaker[Session], row_id: int,
                 table: type[JobVM] | type[RestoreJob] | type[MaintenanceRun] | type[Replica] = JobVM) -> None:
        self.sessions, self.row_id, self.table = sessions, row_id, table
        self.lock = threading.Lock()
        self.done = self.total = 0
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write_out, daemon=True)
        self._writer.start()

    def task(self, label: str, total: int) -> Task:
        with self.lock:
            self.total += total
        return _RowTask(self)

    def _flush(self) -> None:
        with self.lock:
            done, total = self.done, self.total
        with self.sessions() as session:
            session.execute(update(self.table).where(self.table.id == self.row_id)
                            .values(progress_bytes=done, total_bytes=total))
            session.commit()

    def _write_out(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            try:
                self._flush()
            except Exception:  # progress is best effort: never fail the backup over it
                continue

    def close(self) -> None:
        self._stop.set()
        self._writer.join()
        self._flush()
