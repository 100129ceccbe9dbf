"""What the query mixins share: one connection, a clock, transactions, SQL errors translated."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import ParamSpec, Self, TypeVar

from relay.store.rows import StorageError

T = TypeVar("T")
P = ParamSpec("P")


def _translated(method: Callable[P, T]) -> Callable[P, T]:
    """Reads outside `transaction` get the same boundary: no sqlite3 error leaves this module."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from exc

    return wrapper


class Connected:
    """A connection to the queue; the parts of Store each build on it."""

    conn: sqlite3.Connection
    clock: Callable[[], float]

    def transaction(self, work: Callable[[Self], T]) -> T:
        raise NotImplementedError  # Store's; declared here so the parts can call it

    def _delete(self, message_id: str) -> None:
        self._in_transaction()
        for table in ("attempts", "recipients", "bodies"):
            column = "message_id"
            self.conn.execute(f"DELETE FROM {table} WHERE {column} = ?", (message_id,))
        self.conn.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def set_state(self, message_id: str, state: str) -> None:
        self._in_transaction()
        self.conn.execute("UPDATE messages SET state = ? WHERE id = ?", (state, message_id))

    def _in_transaction(self) -> None:
        """Writes that must be part of a caller's transaction say so, and check it."""
        if not self.conn.in_transaction:
            raise AssertionError("call inside Store.transaction (or AsyncStore.run)")


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
