"""Operator commands (relay queue hold, release, delete, flush, bounce) and their audit trail.

Each is one transaction, audited in it; unknown ids are reported, like postsuper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from relay.store.base import Connected
from relay.store.rows import HELD, QUEUED, Actor, AuditEntry, Operated, Selection


class Operations(Connected):
    def select(self, selection: Selection) -> list[str]:
        """The ids of the messages `selection` matches, oldest first."""
        where: list[str] = []
        params: list[Any] = []
        if selection.domain is not None:
            where.append(
                "EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id"
                " AND r.domain = ? AND r.state = ?)"
            )
            params += [selection.domain.lower(), QUEUED]
        if selection.recipient is not None:
            where.append(
                "EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id"
                " AND r.address = ? COLLATE NOCASE AND r.state = ?)"
            )
            params += [selection.recipient, QUEUED]
        if selection.sender is not None:
            where.append("m.sender = ? COLLATE NOCASE")
            params.append(selection.sender)
        if selection.received_before is not None:
            where.append("m.received_at < ?")
            params.append(selection.received_before)
        if not where and not selection.everything:
            return []
        sql = "SELECT m.id FROM messages m"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [row[0] for row in self.conn.execute(sql + " ORDER BY m.received_at, m.id", params)]

    def chosen(self, ids: Sequence[str], selection: Selection) -> tuple[list[str], list[str]]:
        """(the named ids that exist and the selected ones, oldest first; the named missing)."""
        named, missing = self._existing(ids)
        found = named
        if not selection.empty:
            found = list(dict.fromkeys([*named, *self.select(selection)]))
        return found, missing

    def _existing(self, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        found: list[str] = []
        missing: list[str] = []
        for message_id in dict.fromkeys(ids):
            row = self.conn.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,))
            (found if row.fetchone() else missing).append(message_id)
        return found, missing

    def audit(self, action: str, ids: Sequence[str], actor: Actor) -> None:
        """Notes an operator action for the server's log; call inside the action's transaction."""
        self._in_transaction()
        self.conn.execute(
            "INSERT INTO audit (at, uid, user, action, ids, logged) VALUES (?,?,?,?,?,0)",
            (self.clock(), actor.uid, actor.user, action, " ".join(ids)),
        )

    def unlogged_audit(self) -> list[AuditEntry]:
        """Operator actions the server has not logged yet, oldest first."""
        rows = self.conn.execute(
            "SELECT id, at, uid, user, action, ids FROM audit WHERE logged = 0 ORDER BY id"
        ).fetchall()
        return [AuditEntry(r[0], r[1], r[2], r[3] or "", r[4], r[5].split()) for r in rows]

    def mark_audit_logged(self, last_id: int, forget_before: float) -> None:
        """Call inside a transaction: entries up to `last_id` are in the log; old ones go."""
        self._in_transaction()
        self.conn.execute("UPDATE audit SET logged = 1 WHERE id <= ? AND logged = 0", (last_id,))
        self.conn.execute("DELETE FROM audit WHERE logged = 1 AND at < ?", (forget_before,))

    def _operate(
        self,
        action: str,
        ids: Sequence[str],
        selection: Selection | None,
        actor: Actor | None,
        work: Callable[[str], bool | None],
    ) -> Operated:
        """Runs `work` on each named and selected id; `work` returning False skips that id.

        Only a named id is reported as skipped: `flush` of the whole queue need not list every
        held message.
        """

        def run(store: Operations) -> Operated:
            found, missing = store.chosen(ids, selection or Selection())
            named = set(ids) - set(missing)
            done: list[str] = []
            skipped: list[str] = []
            for message_id in found:
                if work(message_id) is not False:
                    done.append(message_id)
                elif message_id in named:
                    skipped.append(message_id)
            if done and actor is not None:
                store.audit(action, done, actor)
            return Operated(done, missing, skipped)

        return self.transaction(run)

    def hold(
        self, ids: Sequence[str], selection: Selection | None = None, actor: Actor | None = None
    ) -> Operated:
        return self._operate("hold", ids, selection, actor, lambda i: self.set_state(i, HELD))

    def release(
        self, ids: Sequence[str], selection: Selection | None = None, actor: Actor | None = None
    ) -> Operated:
        """Back to the active queue, due now (like `postsuper -H`, which also requeues)."""

        def release_one(message_id: str) -> None:
            self.set_state(message_id, QUEUED)
            self._make_due(message_id)
            # A recipient held for its bounce is tried again too: the operator said so.
            self.conn.execute(
                "UPDATE recipients SET hold_reason = NULL WHERE message_id = ?", (message_id,)
            )

        return self._operate("release", ids, selection, actor, release_one)

    def delete(
        self, ids: Sequence[str], selection: Selection | None = None, actor: Actor | None = None
    ) -> Operated:
        return self._operate("delete", ids, selection, actor, self._delete)

    def _make_due(self, message_id: str) -> None:
        self.conn.execute(
            "UPDATE recipients SET next_attempt_at = ? WHERE message_id = ? AND +state = ?",
            (self.clock(), message_id, QUEUED),
        )

    def flush(
        self,
        ids: Sequence[str] = (),
        selection: Selection | None = None,
        actor: Actor | None = None,
    ) -> Operated:
        """Makes queued (not held) mail due now, like `postqueue -f` / `postqueue -i ID`.

        With neither ids nor a selection: every queued message (postqueue -f). Held messages
        stay held: flushing is not releasing.
        """
        if not ids and (selection is None or selection.empty):
            selection = Selection(everything=True)

        def flush_one(message_id: str) -> bool:
            held = self.conn.execute(
                "SELECT 1 FROM messages WHERE id = ? AND state = ?", (message_id, HELD)
            ).fetchone()
            if held:
                return False
            self._make_due(message_id)
            return True

        return self._operate("flush", ids, selection, actor, flush_one)

    def request_bounce(
        self, ids: Sequence[str], selection: Selection | None = None, actor: Actor | None = None
    ) -> Operated:
        """Marks the remaining recipients to be failed (with a DSN) by the delivery engine."""

        def mark(message_id: str) -> None:
            self.conn.execute(
                "UPDATE recipients SET bounce_requested = 1, next_attempt_at = ?"
                " WHERE message_id = ? AND +state = ?",
                (self.clock(), message_id, QUEUED),
            )
            self.set_state(message_id, QUEUED)

        return self._operate("bounce", ids, selection, actor, mark)
