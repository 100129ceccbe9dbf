"""The bookkeeping of rescue mailboxes (relay.rescue): which copies exist and when they can go."""

from __future__ import annotations

from relay.store.base import Connected
from relay.store.rows import QUEUED, RescueCopy


class RescueCopies(Connected):
    def rescue_candidates(self, domain: str, limit: int = 500) -> list[tuple[str, str]]:
        """(message id, address) of the domain's waiting recipients that have no copy yet."""
        rows = self.conn.execute(
            "SELECT r.message_id, r.address FROM recipients r WHERE r.domain = ? AND r.state = ?"
            " AND NOT EXISTS (SELECT 1 FROM rescue_copies c"
            " WHERE c.message_id = r.message_id AND c.address = r.address)"
            " ORDER BY r.message_id LIMIT ?",
            (domain, QUEUED, limit),
        ).fetchall()
        return [(row[0], row[1]) for row in rows]

    def save_rescue_copy(self, copy: RescueCopy, now: float) -> None:
        self._in_transaction()
        self.conn.execute(
            "INSERT OR REPLACE INTO rescue_copies (message_id, address, domain, file, written_at)"
            " VALUES (?,?,?,?,?)",
            (copy.message_id, copy.address, copy.domain, copy.file, now),
        )

    def note_rescued_gone(self, now: float) -> int:
        """Copies whose original is no longer waiting (delivered, bounced, deleted) start their
        `rescue_keep` now; returns how many did."""
        self._in_transaction()
        return self.conn.execute(
            "UPDATE rescue_copies SET gone_at = ? WHERE gone_at IS NULL AND NOT EXISTS"
            " (SELECT 1 FROM recipients r WHERE r.message_id = rescue_copies.message_id"
            " AND r.address = rescue_copies.address AND r.state = ?)",
            (now, QUEUED),
        ).rowcount

    def rescue_copies_gone(self) -> list[tuple[RescueCopy, float]]:
        """Every copy whose original left the queue, with when it left (oldest first)."""
        rows = self.conn.execute(
            "SELECT message_id, address, domain, file, gone_at FROM rescue_copies"
            " WHERE gone_at IS NOT NULL ORDER BY gone_at"
        ).fetchall()
        return [(RescueCopy(*row[:4]), row[4]) for row in rows]

    def forget_rescue_copies(self, copies: list[RescueCopy]) -> None:
        self._in_transaction()
        self.conn.executemany(
            "DELETE FROM rescue_copies WHERE message_id = ? AND address = ?",
            [(c.message_id, c.address) for c in copies],
        )

    def rescue_counts(self) -> dict[str, int]:
        """Copies kept per domain (their originals waiting or delivered less than rescue_keep
        ago): relay_rescue_messages."""
        rows = self.conn.execute("SELECT domain, COUNT(*) FROM rescue_copies GROUP BY domain")
        return {row[0]: row[1] for row in rows}
