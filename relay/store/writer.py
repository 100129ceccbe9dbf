"""`AsyncStore`: the server's one writer thread, group commit, and space given back."""

from __future__ import annotations

import asyncio
import logging
import os
import queue as stdlib_queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from relay.store.queries import Store
from relay.store.rows import FileStats, NewMessage, StorageError

log = logging.getLogger("relay.store")
T = TypeVar("T")

# Space comes back after an outage drains: when at least this many pages (4 KiB each) and this
# share of the file are free, VACUUM_STEP pages at a time.
VACUUM_MIN_PAGES = 2560
VACUUM_FREE_SHARE = 0.5
VACUUM_STEP = 2048
FULL_VACUUM_LIMIT = 64 * 2**20


def _vacuum_step(store: Store) -> FileStats:
    store.conn.execute(f"PRAGMA incremental_vacuum({VACUUM_STEP})").fetchall()
    return store.file_stats()


def _convert_to_incremental(store: Store) -> None:
    store.conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    store.conn.execute("VACUUM")


@dataclass
class _Job:
    work: Callable[[Store], Any]
    future: Future[Any] = field(default_factory=Future)
    # A job whose success becomes a 250 to a client: refused once the queue file is gone.
    acknowledges: bool = False
    # Runs alone and outside any transaction (VACUUM cannot run inside one).
    bare: bool = False


def _is_storage_fault(exc: BaseException) -> bool:
    """A failure of the disk or the file (full, I/O error, read-only), not of our own SQL."""
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.IntegrityError | sqlite3.ProgrammingError
    )


def _file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file `path` names now; None when no file is there.

    os.stat on the path, never a descriptor: closing one would drop SQLite's locks.
    """
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


class AsyncStore:
    """The server's handle on the queue: one writer thread, group commit, asyncio futures.

    SQLite allows one writer at a time and every commit costs an fsync, so concurrent SMTP
    sessions hand their work to one thread that runs everything waiting in one transaction (each
    job in its own savepoint, so one job's failure does not fail the others) and commits once.
    A job's future resolves only after that commit returned: a client's 250 always follows its
    own durable commit.
    """

    MAX_BATCH = 256

    def __init__(
        self,
        path: str,
        clock: Callable[[], float] = time.time,
        on_write_error: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.clock = clock
        self.on_write_error = on_write_error
        # Called (in the writer thread) after each commit that wrote rows: the disk changed.
        self.on_commit: Callable[[], None] | None = None
        # The last write fault (disk full, I/O error, read-only), until a commit succeeds again.
        self.write_fault: str | None = None
        # Set for good once the queue file was deleted or replaced under the running server.
        self.detached: str | None = None
        self._identity: tuple[int, int] | None = None
        self._jobs: stdlib_queue.SimpleQueue[_Job | None] = stdlib_queue.SimpleQueue()
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name="relay-store", daemon=True)
        self._thread.start()
        self._ready.result()  # re-raises StorageError from opening the queue

    async def run(self, work: Callable[[Store], T]) -> T:
        """Runs `work(store)` in the writer thread within a committed transaction."""
        job = _Job(work)
        self._jobs.put(job)
        return await asyncio.wrap_future(job.future)

    async def maintain(self) -> str | None:
        """Gives free pages back to the filesystem once most of the file is free (an outage
        drained); a line for the log when it did, else None.

        Incremental: at most VACUUM_STEP pages per writer turn, so a session waiting for its
        commit waits one step (milliseconds), not for the whole file. A queue file from before
        auto_vacuum was set needs one full VACUUM to convert; that is done only while the live
        data is small (FULL_VACUUM_LIMIT), when copying it is quick.
        """
        stats = await self.run(Store.file_stats)
        if stats.free_pages < VACUUM_MIN_PAGES or stats.free_share < VACUUM_FREE_SHARE:
            return None
        started, before = time.monotonic(), stats.size
        if not stats.incremental:
            if stats.size - stats.free_pages * stats.page_size > FULL_VACUUM_LIMIT:
                return None
            job = _Job(_convert_to_incremental, bare=True)
            self._jobs.put(job)
            await asyncio.wrap_future(job.future)
        else:
            while stats.free_pages:
                stats = await self.run(_vacuum_step)
        after = (await self.run(Store.file_stats)).size
        seconds = time.monotonic() - started
        return f"queue file {before / 2**20:.1f} MB -> {after / 2**20:.1f} MB in {seconds:.2f} s"

    async def put(self, message: NewMessage) -> None:
        """Queues a message; returns once it is durable (the caller may then say 250)."""
        job = _Job(lambda store: store.insert(message), acknowledges=True)
        self._jobs.put(job)
        await asyncio.wrap_future(job.future)

    def problems(self) -> list[str]:
        """Why the queue cannot be trusted right now (for /healthz); empty when it can."""
        found = [self.detached] if self.detached else []
        if self.write_fault:
            found.append(f"queue write failed: {self.write_fault}")
        return found

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            store = Store(self.path, self.clock)
        except StorageError as exc:
            self._ready.set_exception(exc)
            return
        if self.path != ":memory:":
            self._identity = _file_identity(self.path)
        self._ready.set_result(None)
        try:
            while (job := self._jobs.get()) is not None:
                if job.bare:
                    self._run_bare(store, job)
                    continue
                batch = [job]
                while len(batch) < self.MAX_BATCH:
                    try:
                        more = self._jobs.get_nowait()
                    except stdlib_queue.Empty:
                        break
                    if more is None or more.bare:
                        self._jobs.put(more)  # after this batch (order kept for None)
                        break
                    batch.append(more)
                # A caller that gave up (cancelled) before its job started loses nothing: drop
                # the job. Once running, a job can no longer be cancelled, so its result is
                # always set: cancelling a done future here used to kill this thread.
                batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
                batch = self._refuse_if_detached(batch)
                if batch:
                    self._commit_or_fail(store, batch)
        finally:
            store.close()

    def _run_bare(self, store: Store, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.work(store))
        except Exception as exc:
            job.future.set_exception(StorageError(str(exc)))

    def _refuse_if_detached(self, batch: list[_Job]) -> list[_Job]:
        """Fails the jobs that would become a 250 once the queue file is no longer at its path.

        After `rm queue.db*` (or a file copied over it) SQLite keeps writing to the unlinked
        file, and everything acknowledged since would vanish at the next start. Checked before
        every group commit: one stat of the path. Deliveries of the mail already in the open
        file go on (it is the only copy left); new mail gets 451 until a restart.
        """
        if self._identity is None:
            return batch
        if self.detached is None and _file_identity(self.path) != self._identity:
            self.detached = f"queue file {self.path} was deleted or replaced while in use"
            log.error("%s: refusing new mail until relay is restarted", self.detached)
        if self.detached is None:
            return batch
        kept = []
        for job in batch:
            if job.acknowledges:
                job.future.set_exception(StorageError(self.detached))
            else:
                kept.append(job)
        return kept

    def _fault(self, exc: BaseException) -> None:
        if self.on_write_error is not None:
            self.on_write_error()
        self.write_fault = str(exc)

    def _commit_or_fail(self, store: Store, batch: list[_Job]) -> None:
        """Any surprise fails this batch's callers and keeps the writer (the queue) alive."""
        try:
            self._commit(store, batch)
        except Exception as exc:
            log.exception("queue writer error")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(StorageError(f"queue writer error: {exc}"))

    def _commit(self, store: Store, batch: list[_Job]) -> None:
        results: list[tuple[_Job, bool, Any]] = []
        faulted = False
        conn = store.conn
        changes = conn.total_changes
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    results.append((job, True, job.work(store)))
                    conn.execute("RELEASE job")
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    if _is_storage_fault(exc):
                        self._fault(exc)
                        faulted = True
                    if isinstance(exc, sqlite3.Error):
                        exc = StorageError(str(exc))
                    results.append((job, False, exc))
            conn.execute("COMMIT")
            if self.on_commit is not None and conn.total_changes != changes:
                self.on_commit()
        except sqlite3.Error as exc:
            log.error("queue commit failed: %s", exc)
            self._fault(exc)
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("rollback failed")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(StorageError(str(exc)))
            return
        if not faulted:
            self.write_fault = None
        for job, ok, value in results:
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)
