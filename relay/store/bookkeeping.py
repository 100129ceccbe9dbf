"""What delivery writes: outcomes, schedules, destination states, remembered recipients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from relay.store.base import Connected
from relay.store.ids import address_key
from relay.store.rows import QUEUED, DestinationState, Outcome


class Bookkeeping(Connected):
    def record(self, message_id: str, outcomes: Sequence[Outcome]) -> bool:
        """Stores one attempt's outcomes; deletes the message once no recipient is left queued.

        Returns True when the message left the queue. Call inside a transaction. A message the
        operator deleted meanwhile is simply gone: its outcomes are dropped.
        """
        self._in_transaction()
        now = self.clock()
        for outcome in outcomes:
            self.conn.execute(
                "UPDATE recipients SET state = ?, attempts = attempts + 1, last_reply = ?,"
                " next_attempt_at = ?, bounce_requested = 0, hold_reason = ?"
                " WHERE message_id = ? AND address = ? AND state = ?",
                (
                    outcome.state,
                    outcome.reply,
                    outcome.next_attempt_at,
                    outcome.held,
                    message_id,
                    outcome.address,
                    QUEUED,
                ),
            )
            self.conn.execute(
                "INSERT INTO attempts (message_id, address, at, host, reply) VALUES (?,?,?,?,?)",
                (message_id, outcome.address, now, outcome.host, outcome.reply),
            )
        return self.remove_if_done(message_id)

    def remove_if_done(self, message_id: str) -> bool:
        left = self.conn.execute(
            "SELECT COUNT(*) FROM recipients WHERE message_id = ? AND +state = ?",
            (message_id, QUEUED),
        ).fetchone()[0]
        if left:
            return False
        self._delete(message_id)
        return True

    def mark_warned(self, message_id: str) -> None:
        self._in_transaction()
        self.conn.execute("UPDATE messages SET warned = 1 WHERE id = ?", (message_id,))

    def reschedule(self, domain: str | None, when: float) -> int:
        """Makes every queued recipient (of one domain, or all) due at `when`: recovery, ETRN.
        Not those held for an operator: the primary refused them, and will again."""
        self._in_transaction()
        sql = (
            "UPDATE recipients SET next_attempt_at = ?"
            " WHERE state = ? AND next_attempt_at > ? AND hold_reason IS NULL"
        )
        params: list[Any] = [when, QUEUED, when]
        if domain is not None:
            sql += " AND domain = ?"
            params.append(domain.lower())
        return self.conn.execute(sql, params).rowcount

    def save_destination(self, state: DestinationState) -> None:
        self._in_transaction()
        self.conn.execute(
            "INSERT OR REPLACE INTO destinations (domain, up, since, last_error, last_success,"
            " updated_at) VALUES (?,?,?,?,?,?)",
            (
                state.domain,
                None if state.up is None else int(state.up),
                state.since,
                state.last_error,
                state.last_success,
                self.clock(),
            ),
        )

    def save_verdicts(self, verdicts: Sequence[tuple[str, bool, float]]) -> None:
        """Remembers (address, accepted, checked_at) answers; call inside a transaction."""
        self._in_transaction()
        self.conn.executemany(
            "INSERT OR REPLACE INTO recipient_verdicts (address, accepted, checked_at)"
            " VALUES (?,?,?)",
            [(address, int(accepted), at) for address, accepted, at in verdicts],
        )

    def forget_addresses(self, addresses: Sequence[str]) -> list[str]:
        """Drops what is remembered of `addresses`; returns those that were known. In a
        transaction."""
        self._in_transaction()
        known = []
        for address in addresses:
            key = address_key(address)
            cursor = self.conn.execute("DELETE FROM recipient_verdicts WHERE address = ?", (key,))
            if cursor.rowcount:
                known.append(key)
        return known
