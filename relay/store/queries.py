"""`Store`: synchronous access to the queue over one connection (the CLI, the writer thread)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

from relay.store.base import _translated
from relay.store.bookkeeping import Bookkeeping
from relay.store.controls import Controls
from relay.store.reads import Reads
from relay.store.rescue import RescueCopies
from relay.store.rows import QUEUED, FileStats, NewMessage, StorageError
from relay.store.schema import _connect, _migrate

T = TypeVar("T")


class Store(Reads, Bookkeeping, Controls, RescueCopies):
    """Synchronous access to the queue over one connection. Not shared between threads."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        try:
            self.conn = _connect(path)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open queue {path}: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"cannot open queue {path}: {exc.strerror or exc}") from exc
        try:
            _migrate(self.conn)
        except sqlite3.Error as exc:
            self.conn.close()
            raise StorageError(f"cannot open queue {path}: {exc}") from exc
        except BaseException:
            self.conn.close()  # a queue too new for us: do not leak the connection
            raise

    def close(self) -> None:
        self.conn.close()

    def transaction(self, work: Callable[[Store], T]) -> T:
        """Runs `work` in one IMMEDIATE transaction and commits it durably."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(self)
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from exc
        return result

    def insert(self, message: NewMessage) -> None:
        """Adds a message and its recipients; call inside a transaction."""
        self._in_transaction()
        self.conn.execute(
            "INSERT INTO messages (id, sender, size, received_at, state, client_ip, helo,"
            " smtputf8, eightbit, envid, ret, warned, auth) VALUES (?,?,?,?,?,?,?,?,?,?,?,0,?)",
            (
                message.id,
                message.sender,
                len(message.body),
                message.received_at,
                QUEUED,
                message.client_ip,
                message.helo,
                int(message.smtputf8),
                int(message.eightbit),
                message.envid,
                message.ret,
                message.auth,
            ),
        )
        self.conn.execute(
            "INSERT INTO bodies (message_id, data) VALUES (?, ?)", (message.id, message.body)
        )
        self.conn.executemany(
            "INSERT INTO recipients (message_id, address, domain, state, attempts,"
            " next_attempt_at, notify, orcpt) VALUES (?,?,?,?,0,?,?,?)",
            [
                (message.id, r.address, r.domain, QUEUED, message.received_at, r.notify, r.orcpt)
                for r in message.recipients
            ],
        )

    def put(self, message: NewMessage) -> None:
        self.transaction(lambda store: store.insert(message))

    @_translated
    def file_stats(self) -> FileStats:
        """The queue file's size and how much of it is free pages (for `relay status`)."""
        page_size = int(self.conn.execute("PRAGMA page_size").fetchone()[0])
        pages = int(self.conn.execute("PRAGMA page_count").fetchone()[0])
        free = int(self.conn.execute("PRAGMA freelist_count").fetchone()[0])
        mode = int(self.conn.execute("PRAGMA auto_vacuum").fetchone()[0])
        return FileStats(page_size, pages, free, mode == 2)

    @_translated
    def data_version(self) -> int:
        """Changes when another connection (the CLI) commits: the server's cue to look again."""
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])
