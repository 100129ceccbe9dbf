"""Recording delivery outcomes: one transaction per batch, and nothing lost when it fails.

The scheduler decides; this writes. Each batch of outcomes goes to the queue together with the
DSNs it owes (relay.outcomes decides which), so a crash leaves either both or neither. When the
queue refuses the write (disk full, I/O error), the outcomes are kept in memory, their messages
pinned in flight, and written again before any new attempt: until then nothing is delivered, so
a storage fault costs at most one extra copy, never a loop of them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from relay.config import Config
from relay.delivery.outcomes import (
    OPERATOR_BOUNCE,
    expiry_reply,
    log_outcomes,
    notices,
    plan,
    screen_bounces,
)
from relay.ops import metrics
from relay.ops.logs import fields
from relay.store import (
    FAILED,
    HELD,
    QUEUED,
    AsyncStore,
    MessageRow,
    NewMessage,
    Outcome,
    RecipientRow,
    StorageError,
    Store,
)
from relay.words import plural

log = logging.getLogger("relay.delivery")


class InFlight(defaultdict[str, int]):
    """How many deliveries of each message are under way; the queue skips these when due."""

    def __init__(self) -> None:
        super().__init__(int)

    def take(self, message_id: str) -> None:
        self[message_id] += 1

    def release(self, message_id: str) -> None:
        self[message_id] -= 1
        if self[message_id] <= 0:
            del self[message_id]


@dataclass
class Recorder:
    """Writes outcomes and the DSNs they owe; keeps what the queue refused until it takes it."""

    store: AsyncStore
    get_config: Callable[[], Config]
    inflight: InFlight
    wake: Callable[[], None]  # the scheduler: DSNs were queued, or delivery may resume
    retry_at: Callable[[RecipientRow, float], float]
    _unrecorded: list[_Unrecorded] = field(default_factory=list)

    @property
    def config(self) -> Config:
        return self.get_config()

    @property
    def stopped(self) -> bool:
        """Outcomes wait in memory: no delivery may start until they are written."""
        return bool(self._unrecorded)

    @property
    def blocked(self) -> str | None:
        """Why delivery is stopped, for /healthz; None if it runs."""
        if not self._unrecorded:
            return None
        count = sum(len(u.message_ids) for u in self._unrecorded)
        return f"delivery stopped: outcomes of {plural(count, 'message')} not yet recorded"

    async def settle_without_delivery(self, message: MessageRow, now: float) -> bool:
        """Operator bounces and lifetime expiry: decided here, without a connection."""
        bounced = [r for r in message.pending if r.bounce_requested]
        if bounced:
            outcomes = [Outcome(r.address, FAILED, OPERATOR_BOUNCE) for r in bounced]
            await self.finish(message, outcomes, now, from_primary=False)
            return len(bounced) == len(message.pending)
        if now - message.received_at < self.config.queue.lifetime:
            return False
        if self.config.queue.on_expiry == "hold":
            log.warning(
                "%s: lifetime exceeded, held for the operator",
                message.id,
                extra=fields(queue_id=message.id, event="held", reason="lifetime exceeded"),
            )
            await self.store.run(lambda s: s.set_state(message.id, HELD))
            return True
        outcomes = [Outcome(r.address, FAILED, expiry_reply(r.last_reply)) for r in message.pending]
        log.info("%s: lifetime exceeded, bouncing", message.id)
        await self.finish(message, outcomes, now, from_primary=False)
        return True

    async def defer(
        self,
        message: MessageRow,
        recipients: Sequence[RecipientRow],
        reply: str,
        now: float,
        host: str,
    ) -> None:
        await self.defer_many([(message, tuple(recipients))], reply, now, host)

    async def defer_many(
        self,
        items: Sequence[tuple[MessageRow, tuple[RecipientRow, ...]]],
        reply: str,
        now: float,
        host: str,
    ) -> None:
        """Defers many messages in one transaction (a destination just went down).

        One write for the lot also keeps the order of events in the store: a recovery that
        reschedules the destination afterwards cannot be overtaken by a late deferral.
        """
        await self.finish_many(
            [
                (
                    message,
                    [
                        Outcome(r.address, QUEUED, reply, host, self.retry_at(r, now))
                        for r in recipients
                    ],
                    None,
                )
                for message, recipients in items
            ],
            now,
        )

    async def finish(
        self,
        message: MessageRow,
        outcomes: Sequence[Outcome],
        now: float,
        body: bytes | None = None,
        *,
        from_primary: bool = True,
    ) -> None:
        await self.finish_many([(message, outcomes, body)], now, from_primary=from_primary)

    async def finish_many(
        self,
        batch: Sequence[tuple[MessageRow, Sequence[Outcome], bytes | None]],
        now: float,
        *,
        from_primary: bool = True,
    ) -> None:
        """Records outcomes and any DSN they call for, in one transaction. The primary's
        refusals of mail from unauthenticated senders are screened first (no backscatter);
        an operator's bounce and expiry (`from_primary` False) are not."""
        if not batch:
            return
        plans = []
        for message, outcomes, body in batch:
            silent: frozenset[str] = frozenset()
            if from_primary:
                outcomes, silent = screen_bounces(self.config, message, outcomes)
            plans.append(plan(self.config, message, outcomes, body, now, silent))
        missing = [p.message.id for p in plans if p.needs_body]
        bodies: dict[str, bytes | None] = {}
        if missing:
            bodies = await self.store.run(lambda s: {i: s.body(i) for i in missing})
        owed: list[NewMessage] = []
        for p in plans:
            data = p.body if p.body is not None else bodies.get(p.message.id)
            delayed = p.deferred if p.warn else []
            owed += notices(self.config, p.message, p.failed, delayed, data or b"", now)
        warned = [p.message.id for p in plans if p.warn]

        def write(store: Store) -> list[bool]:
            for notice in owed:
                store.insert(notice)
            for message_id in warned:
                store.mark_warned(message_id)
            return [store.record(p.message.id, p.outcomes) for p in plans]

        def after(done: list[bool]) -> None:
            for p, removed in zip(plans, done, strict=True):
                log_outcomes(p.message, p.outcomes, removed, now, p.silent)
            if owed:
                metrics.bounces.inc(len(owed))
                self.wake()

        pending = _Unrecorded(write, after, tuple(p.message.id for p in plans))
        try:
            done = await self.store.run(write)
        except StorageError as exc:
            if owed or not all(p.sends_nothing for p in plans):
                self._keep_unrecorded(pending, exc)
            else:
                # Only deferrals: nothing was sent and no DSN made, so losing the write costs
                # no copy; the mail is simply due again at its old time.
                log.warning("deferral not recorded: %s", exc)
            return
        after(done)

    def _keep_unrecorded(self, pending: _Unrecorded, exc: StorageError) -> None:
        if not self._unrecorded:
            log.error(
                "queue write failed, delivery stopped until it can be written: %s"
                " (outcomes kept in memory, written before any new attempt)",
                exc,
            )
        for message_id in pending.message_ids:
            self.inflight.take(message_id)  # never due again until its outcome is written
        self._unrecorded.append(pending)

    async def record_unrecorded(self) -> bool:
        """Writes the outcomes a storage fault left in memory; True once none is left."""
        while self._unrecorded:
            pending = self._unrecorded[0]
            try:
                done = await self.store.run(pending.write)
            except StorageError:
                return False
            self._unrecorded.pop(0)
            for message_id in pending.message_ids:
                self.inflight.release(message_id)
            pending.after(done)
            if not self._unrecorded:
                log.info("queue writable again: pending outcomes recorded, delivery resumes")
        return True


@dataclass(frozen=True)
class _Unrecorded:
    """One outcome write the queue refused, with what to do once it succeeds."""

    write: Callable[[Store], list[bool]]
    after: Callable[[list[bool]], None]
    message_ids: tuple[str, ...]
