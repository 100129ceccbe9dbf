"""The operators' audit trail: who held, released, deleted, flushed, bounced or imported what.

The CLI runs as whoever typed it, often beside a running server, and has no log of its own that
a postmaster reads. So each command writes its action into the queue database in the same
transaction as the action itself (an action is never done without its record, nor recorded
without being done), and the server logs it in its own log stream, with the queue ids and the
uid that ran it, like postsuper's lines in the mail log. A command run while the server is
stopped is logged when it next starts.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from relay.store import AsyncStore, AuditEntry, Store
from relay.words import plural

log = logging.getLogger("relay.audit")

# How long logged entries stay in the database: the log is the record, the table only a mailbox.
KEEP_LOGGED = 30 * 86400.0
# The actions that change the remembered recipients (relay.policy re-reads them after one).
RECIPIENT_ACTIONS = ("import", "forget")
# The actions that steer a domain (relay domain ...): the scheduler re-reads them after one.
DOMAIN_ACTIONS = ("reroute", "unroute", "pause", "resume", "rescue")


def steers_a_domain(entry: AuditEntry) -> bool:
    return entry.action.split(" ", 1)[0] in DOMAIN_ACTIONS


def describe(entry: AuditEntry) -> str:
    """`uid 0 (root) ran hold at 2026-12-05T08:00:01Z on 2 messages: AAA BBB`."""
    at = datetime.fromtimestamp(entry.at, UTC).isoformat(timespec="seconds")
    noun = "address" if entry.action in RECIPIENT_ACTIONS else "message"
    if steers_a_domain(entry):
        noun = "domain"
    what = plural(len(entry.ids), noun)
    return (
        f"uid {entry.uid} ({entry.user}) ran {entry.action} at {at.replace('+00:00', 'Z')}"
        f" on {what}: {' '.join(entry.ids)}"
    )


async def log_new_entries(store: AsyncStore, now: float | None = None) -> list[AuditEntry]:
    """Logs every action not logged yet and returns them. Called when the queue changed."""
    moment = time.time() if now is None else now

    def take(queue: Store) -> list[AuditEntry]:
        entries = queue.unlogged_audit()
        if entries:
            queue.mark_audit_logged(entries[-1].id, forget_before=moment - KEEP_LOGGED)
        return entries

    entries = await store.run(take)
    for entry in entries:
        log.info(
            "operator: %s",
            describe(entry),
            extra={
                "fields": {
                    "event": "operator",
                    "action": entry.action,
                    "uid": entry.uid,
                    "user": entry.user,
                    "queue_ids": entry.ids,
                }
            },
        )
    return entries
