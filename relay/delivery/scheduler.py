"""The delivery scheduler: due mail → routes → outbound sessions → outcomes in the store.

It owns the decisions the courier must not make: which recipients are due, backoff after a
deferral, when a recipient has failed for good (5xx, lifetime, operator), who gets a DSN, and
whether a destination is up. Two rules shape it:

* A backup MX prefers retrying to bouncing: anything not clearly permanent is deferred.
* Recovery is detected by probing, not by backoff timers. While a destination is down, due mail
  is deferred without connecting; a probe every `delivery.probe_interval` notices the primary's
  return and makes *all* its mail due at once, then sessions ramp up gradually so the recovering
  primary is not knocked over again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay.config import Config
from relay.delivery.courier import (
    OutboundSession,
    Outgoing,
    OutgoingRecipient,
    Reply,
    SessionError,
    first_answer,
)
from relay.delivery.health import DestinationHealth
from relay.delivery.mx import Hop, RouteError, Router
from relay.delivery.outcomes import (
    backoff,
    outcome_for,
    suspended_reply,
)
from relay.delivery.recording import InFlight, Recorder
from relay.ops import metrics
from relay.store import (
    DELIVERED,
    FAILED,
    AsyncStore,
    DomainControl,
    MessageRow,
    Outcome,
    RecipientRow,
    StorageError,
    Store,
)
from relay.words import plural

log = logging.getLogger("relay.delivery")

ROUTE_CACHE_SECONDS = 30.0
REFILL_AT = 200  # messages still waiting for a destination's sessions when the next are fetched
RAMP_START = 2  # sessions to a destination that just came back
RAMP_STEP = 10  # 2xx replies in a row that earn one more session
DOWN_AFTER_4XX = 5


class Connector(Protocol):
    def __call__(
        self, hop: Hop, *, helo: str, tls: str, cafile: str | None, timeout: float
    ) -> Awaitable[OutboundSession]: ...


@dataclass
class Destination:
    """The scheduler's sessions to one destination domain (whether it is up: relay.health)."""

    name: str
    flushed_at: float = float("-inf")  # last recovery or ETRN: mail deferred before it is due
    limit: int = 1
    sessions: int = 0
    streak_2xx: int = 0
    streak_4xx: int = 0
    queue: asyncio.Queue[tuple[MessageRow, tuple[RecipientRow, ...]]] = field(
        default_factory=asyncio.Queue
    )

    def take_all(self) -> list[tuple[MessageRow, tuple[RecipientRow, ...]]]:
        """Empties the queue of mail waiting for a session, for deferring or dropping it."""
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items

    def count(self, reply: Reply, ceiling: int) -> bool:
        """Counts one reply: RAMP_STEP 2xx in a row earn one more session (up to `ceiling`).
        True when it says the destination is down: a 421, or DOWN_AFTER_4XX 4xx in a row."""
        if 200 <= reply.code < 300:
            self.streak_4xx = 0
            self.streak_2xx += 1
            if self.streak_2xx >= RAMP_STEP:
                self.streak_2xx = 0
                self.limit = min(self.limit + 1, ceiling)
            return False
        if reply.permanent:
            return False
        self.streak_2xx = 0
        self.streak_4xx += 1
        return reply.code == 421 or self.streak_4xx >= DOWN_AFTER_4XX


@dataclass
class Scheduler:
    store: AsyncStore
    get_config: Callable[[], Config]
    router: Router
    clock: Callable[[], float] = time.time
    rng: random.Random = field(default_factory=random.Random)
    connect: Connector = OutboundSession.open
    # Whether each destination is up: shared with the recipient policy (relay.service), or
    # the scheduler's own when it runs alone (tests, benchmarks).
    health: DestinationHealth | None = None
    batch: int = 1000
    poll_interval: float = 1.0
    # Told every recipient the primary accepted, so that recipient validation (relay.policy)
    # knows the real mailboxes before the next outage starts.
    learn: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        self.destinations: dict[str, Destination] = {}
        self.inflight = InFlight()
        self.wake = asyncio.Event()
        # Through a lambda, so that replacing `connect` later (tests) reaches the opener.
        self.steering = Steering()
        self.ticks = 0
        self.opener = SessionOpener(
            self.router,
            self.get_config,
            lambda hop, **options: self.connect(hop, **options),
            self.clock,
            self.steering.controls.get,
        )
        self._sessions = asyncio.Semaphore(self.config.delivery.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._own_health = self.health is None
        self.up = self.health or DestinationHealth(self.get_config, self.store, clock=self.clock)
        if self.up.router is None:
            self.up.router = self.router
        self.up.on_recovery.append(self._recovered)
        self._stopping = False
        self._writes: set[asyncio.Task[Any]] = set()  # waited for by stop() and settle()
        self.recorder = Recorder(
            self.store, self.get_config, self.inflight, self.wake.set, self._retry_at
        )
        self.results = SessionResults(
            self.get_config,
            self.clock,
            self.up,
            self.steering,
            self.recorder,
            self._retry_at,
            self.learn,
        )

    @property
    def blocked(self) -> str | None:
        """Why delivery is stopped (outcomes not yet recorded), for /healthz; None if it runs."""
        return self.recorder.blocked

    @property
    def config(self) -> Config:
        return self.get_config()

    # -- the main loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Polls the queue (CLI changes show within a second) and whenever woken."""
        if self._own_health:
            await self.up.restore()
        while not self._stopping:
            try:
                await self.tick()
                self.ticks += 1  # passes made: tests wait on it instead of on the clock
            except StorageError as exc:
                log.warning("delivery: queue not readable: %s", exc)
            except Exception:
                log.exception("delivery loop error; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.poll_interval)
            self.wake.clear()

    def accepted(self, domains: Iterable[str]) -> None:
        """New mail for `domains`: try it at once, unless every one of them is known down.

        Mail for a destination that is down is deferred by the next poll (within a second),
        together with whatever else arrived meanwhile, rather than one scheduler pass per
        message; its probe owns the recovery, which makes all of it due at once.
        """
        for domain in domains:
            if not self._suspended(domain) and not self.steering.paused(domain):
                self.wake.set()
                return

    async def stop(self) -> None:
        self._stopping = True
        self.wake.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._writes, return_exceptions=True)
        if self._own_health:
            await self.up.stop()

    async def settle(self) -> None:
        """Waits until no session is running and nothing is in flight (tests, benchmarks)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await asyncio.gather(*list(self._writes), return_exceptions=True)

    def destination(self, name: str) -> Destination:
        if name not in self.destinations:
            self.destinations[name] = Destination(
                name, limit=self.config.delivery.per_host_concurrency
            )
        return self.destinations[name]

    async def tick(self) -> None:
        if not await self.recorder.record_unrecorded():
            return  # the queue still refuses the kept outcomes: deliver nothing new
        now = self.clock()
        paused = self.steering.paused_domains()
        due = await self.store.run(
            lambda s: s.due(now, self.batch, exclude=self.inflight, skip_domains=paused)
        )
        work: dict[str, list[tuple[MessageRow, tuple[RecipientRow, ...]]]] = defaultdict(list)
        for message in due:
            if await self.recorder.settle_without_delivery(message, now):
                continue
            by_domain: dict[str, list[RecipientRow]] = defaultdict(list)
            for recipient in message.pending:
                if recipient.next_attempt_at <= now and recipient.domain not in paused:
                    by_domain[recipient.domain].append(recipient)
            for domain, recipients in by_domain.items():
                work[domain].append((message, tuple(recipients)))
        for domain, items in work.items():
            await self._dispatch(domain, items, now)

    async def _dispatch(
        self, domain: str, items: list[tuple[MessageRow, tuple[RecipientRow, ...]]], now: float
    ) -> None:
        dest = self.destination(domain)
        if self._suspended(domain):
            # Suspended: the probe owns recovery. Push the due mail on by its backoff.
            reply = suspended_reply(self.up.get(domain).last_error)
            await self.recorder.defer_many(items, reply, now, host="")
            return
        for message, recipients in items:
            self.inflight.take(message.id)
            dest.queue.put_nowait((message, recipients))
        self._start_sessions(dest)

    def _start_sessions(self, dest: Destination) -> None:
        while dest.sessions < min(dest.limit, dest.queue.qsize()):
            dest.sessions += 1
            task = asyncio.create_task(self._session_worker(dest))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- sessions -------------------------------------------------------------------------

    async def _session_worker(self, dest: Destination) -> None:
        try:
            async with self._sessions:
                await self._drain(dest)
        finally:
            dest.sessions -= 1
            # Mail dispatched while this worker was closing its session found it still counted
            # and started no other. Left in the queue it would never be sent: it is in flight,
            # so never due again, until a restart.
            if not self._stopping:
                self._start_sessions(dest)

    async def _drain(self, dest: Destination) -> None:
        session: OutboundSession | None = None
        hop: Hop | None = None
        try:
            while (
                not dest.queue.empty()
                and not self._suspended(dest.name)
                and not self.steering.paused(dest.name)
                and not self.recorder.stopped
            ):
                message, recipients = dest.queue.get_nowait()
                if dest.queue.qsize() == REFILL_AT:
                    # Running low while the destination takes mail: fetch the next batch now
                    # rather than at the next poll, so that a drain never waits on the clock.
                    self.wake.set()
                try:
                    if session is None:
                        session, hop = await self.opener.open(dest.name)
                    await self._deliver(dest, session, hop, message, recipients)
                except _RouteFailed as failed:
                    await self.results.route_failed(dest, message, recipients, failed)
                    session = None
                except StorageError as exc:
                    # Reading the body failed: nothing was sent; the message is due again.
                    log.warning("%s: queue not readable: %s", message.id, exc)
                except SessionError as exc:
                    await self.results.session_broke(dest, message, recipients, exc, hop)
                    with contextlib.suppress(Exception):
                        if session is not None:
                            await session.close()
                    session = None
                finally:
                    self.inflight.release(message.id)
        finally:
            if session is not None:
                await session.close()
            if self._suspended(dest.name):
                await self._defer_queued(dest)
            elif self.recorder.stopped or self.steering.paused(dest.name):
                # Recording is failing, or an operator paused the domain: what waits for a
                # session goes back to the queue untried, due again once it may go.
                for message, _ in dest.take_all():
                    self.inflight.release(message.id)

    async def _deliver(
        self,
        dest: Destination,
        session: OutboundSession,
        hop: Hop | None,
        message: MessageRow,
        recipients: tuple[RecipientRow, ...],
    ) -> None:
        body = await self.store.run(lambda s: s.body(message.id, unless_held=True))
        if body is None:  # deleted or held by the operator since it was found due
            return
        outgoing = _outgoing(message, recipients, body)
        started = time.monotonic()
        replies = await session.send(outgoing)
        metrics.delivery_duration.observe(time.monotonic() - started)
        await self.results.sent(dest, message, recipients, replies, hop, body)

    async def _defer_queued(self, dest: Destination) -> None:
        """The destination went down: everything still waiting for it is deferred now."""
        reply = suspended_reply(self.up.get(dest.name).last_error)
        items = dest.take_all()
        try:
            await self.recorder.defer_many(items, reply, self.clock(), host="")
        finally:
            for message, _ in items:
                self.inflight.release(message.id)

    async def _recovered(self, domain: str) -> None:
        """The destination answers again (relay.health): all of its mail is due at once."""
        now = self.clock()
        self.destination(domain).flushed_at = now
        try:
            count = await self.store.run(
                functools.partial(Store.reschedule, domain=domain, when=now)
            )
        except StorageError as exc:
            # The flush stays in memory (flushed_at): deferrals decided before it come due
            # at once when they are written, and the next poll finds what is due.
            log.warning("%s: primary answers again; queue not writable: %s", domain, exc)
        else:
            due = plural(count, "recipient")
            log.info("%s: primary answers again; %s due now", domain, due)
        self.wake.set()

    def _retry_at(self, recipient: RecipientRow, decided_at: float) -> float:
        """When a deferred recipient is due again: after its backoff, or at once when its
        destination was flushed (recovery, ETRN) after the deferral was decided, so that a
        late write cannot undo the flush."""
        dest = self.destinations.get(recipient.domain)
        if dest is not None and dest.flushed_at > decided_at:
            return dest.flushed_at
        retry = self.config.retry
        return decided_at + backoff(recipient.attempts + 1, retry.min, retry.max, self.rng)

    def forget_routes(self) -> None:
        """The router changed (SIGHUP): routes looked up with the old one are not reused."""
        self.opener.forget_routes()

    # -- operator steering (relay domain pause / reroute) ---------------------------------------

    def set_controls(self, controls: dict[str, DomainControl]) -> None:
        """What operators decided per domain, as the queue database now says."""
        changed = self.steering.replace(controls)
        if changed:
            self.opener.forget_routes()
            # Mail deferred on the old route goes at once on the new one (queued and new mail).
            for domain in changed:
                self._start_write(self.flush_domain(domain))
        self.wake.set()

    def _start_write(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def _suspended(self, domain: str) -> bool:
        """The primary is down and the mail has nowhere else to go."""
        return self.up.is_down(domain) and not self.steering.rerouted(domain)

    async def flush_domain(self, domain: str) -> int:
        """ETRN and operator flushes: everything for `domain` due now, probing first if down."""
        now = self.clock()
        self.destination(domain).flushed_at = now
        count = await self.store.run(lambda s: s.reschedule(domain, now))
        self.up.probe_soon(domain)  # down: ask now; its answer releases the mail
        self.wake.set()
        return int(count)


@dataclass
class SessionResults:
    """What a session's replies and failures mean: the outcomes to record, what the primary
    learned about its recipients, and the destination's ramp and health."""

    get_config: Callable[[], Config]
    clock: Callable[[], float]
    up: DestinationHealth
    steering: Steering
    recorder: Recorder
    retry_at: Callable[[RecipientRow, float], float]
    learn: Callable[[str], None] | None

    @property
    def config(self) -> Config:
        return self.get_config()

    async def sent(
        self,
        dest: Destination,
        message: MessageRow,
        recipients: tuple[RecipientRow, ...],
        replies: Mapping[str, Reply],
        hop: Hop | None,
        body: bytes,
    ) -> None:
        """The primary's reply to each recipient of one transaction, recorded."""
        now = self.clock()
        host = hop.host if hop else ""
        outcomes = [self._outcome(r, replies[r.address], now, host) for r in recipients]
        self._observe(dest, [replies[r.address] for r in recipients], now)
        if self.learn is not None:
            for outcome in outcomes:
                if outcome.state == DELIVERED:
                    self.learn(outcome.address)
        await self.recorder.finish(message, outcomes, now, body=body)

    def _outcome(self, recipient: RecipientRow, reply: Reply, now: float, host: str) -> Outcome:
        retry_at = self.retry_at(recipient, now)
        # A refusal the courier made itself names no remote host (it would read "host … said").
        where = "" if reply.local else host
        return outcome_for(
            recipient.address, reply.code, reply.permanent, str(reply), where, retry_at
        )

    def _observe(self, dest: Destination, replies: Sequence[Reply], now: float) -> None:
        """Ramp sessions up on 2xx; treat 421 or a burst of 4xx as the destination down again."""
        ceiling = self.config.delivery.per_host_concurrency
        for reply in replies:
            if 200 <= reply.code < 300 and not self.steering.rerouted(dest.name):
                self.up.succeeded(dest.name, now)
            if dest.count(reply, ceiling):
                self.mark_down(dest, str(reply), now)

    async def session_broke(
        self,
        dest: Destination,
        message: MessageRow,
        recipients: tuple[RecipientRow, ...],
        exc: SessionError,
        hop: Hop | None,
    ) -> None:
        log.info("%s: session to %s broke: %s", message.id, hop.host if hop else "?", exc.reply)
        now = self.clock()
        await self.recorder.defer(
            message, recipients, str(exc.reply), now, host=hop.host if hop else ""
        )
        dest.streak_4xx += 1
        if exc.reply.code == 421 or dest.streak_4xx >= DOWN_AFTER_4XX:
            self.mark_down(dest, str(exc.reply), now)

    async def route_failed(
        self,
        dest: Destination,
        message: MessageRow,
        recipients: tuple[RecipientRow, ...],
        failed: _RouteFailed,
    ) -> None:
        now = self.clock()
        reason = failed.reason
        if isinstance(reason, RouteError):
            metrics.routing_failures.labels(dest.name, reason.kind).inc()
            text = f"{'550 5.1.2' if reason.permanent else '451 4.4.3'} {reason}"
            if reason.permanent:
                outcomes = [Outcome(r.address, FAILED, text) for r in recipients]
                await self.recorder.finish(message, outcomes, now)
                return
        else:
            text = str(reason.reply)
        self.mark_down(dest, text, now)
        await self.recorder.defer(message, recipients, text, now, host="")

    def mark_down(self, dest: Destination, error: str, now: float) -> None:
        if self.steering.rerouted(dest.name):
            return  # the reroute target is not the primary: its failures say nothing of it
        if not self.up.is_down(dest.name):
            dest.limit = min(RAMP_START, self.config.delivery.per_host_concurrency)
        self.up.failed(dest.name, error, now)


@dataclass
class Steering:
    """What operators decided per domain (relay domain pause / reroute), for the scheduler."""

    controls: dict[str, DomainControl] = field(default_factory=dict)

    def replace(self, controls: dict[str, DomainControl]) -> set[str]:
        """Takes the new decisions; the domains whose reroute target changed."""
        before = {n: c.reroute for n, c in self.controls.items() if c.reroute}
        after = {n: c.reroute for n, c in controls.items() if c.reroute}
        self.controls.clear()
        self.controls.update(controls)  # the same dict: the session opener holds its .get
        return {d for d in {*before, *after} if before.get(d) != after.get(d)}

    def paused(self, domain: str) -> bool:
        control = self.controls.get(domain)
        return control is not None and control.paused

    def rerouted(self, domain: str) -> bool:
        control = self.controls.get(domain)
        return control is not None and control.reroute is not None

    def paused_domains(self) -> list[str]:
        return [name for name, control in self.controls.items() if control.paused]


@dataclass
class SessionOpener:
    """A session to a destination: its hops (cached for ROUTE_CACHE_SECONDS), tried in order."""

    router: Router
    get_config: Callable[[], Config]
    connect: Connector
    clock: Callable[[], float]
    control_of: Callable[[str], DomainControl | None] = lambda _domain: None
    _routes: dict[str, tuple[float, list[Hop]]] = field(default_factory=dict)

    @property
    def config(self) -> Config:
        return self.get_config()

    def forget_routes(self) -> None:
        self._routes.clear()

    async def open(self, domain: str) -> tuple[OutboundSession, Hop]:
        """The first hop that takes a session; _RouteFailed when routing or every hop fails."""
        try:
            hops = await self._route(domain)
        except RouteError as exc:
            raise _RouteFailed(exc) from exc
        try:
            return await self._open(domain, hops)
        except SessionError as exc:
            raise _RouteFailed(exc) from exc

    async def _route(self, domain: str) -> list[Hop]:
        cached = self._routes.get(domain)
        now = self.clock()
        if cached and now - cached[0] < ROUTE_CACHE_SECONDS:
            return cached[1]
        settings = self.config.domain(domain)
        control = self.control_of(domain)
        if control is not None and control.reroute:
            # An operator's target, checked like a configured primary: never our own socket.
            hops = await self.router.hops(domain, (control.reroute,))
        else:
            hops = await self.router.hops(domain, settings.primary if settings else ())
        self._routes[domain] = (now, hops)
        return hops

    def _tls_mode(self, domain: str) -> str:
        control = self.control_of(domain)
        if control is not None and control.reroute and control.reroute_tls:
            return control.reroute_tls
        settings = self.config.domain(domain)
        return settings.tls if settings else "opportunistic"

    async def _open(self, domain: str, hops: Sequence[Hop]) -> tuple[OutboundSession, Hop]:
        """The first hop that takes a session; raises the last SessionError when none does."""
        cfg = self.config

        async def connect(hop: Hop) -> tuple[OutboundSession, Hop]:
            session = await self.connect(
                hop,
                helo=cfg.hostname,
                tls=self._tls_mode(domain),
                cafile=cfg.delivery.cafile or None,
                timeout=cfg.delivery.timeout,
            )
            return session, hop

        def failed(hop: Hop, exc: SessionError) -> None:
            log.info("%s: %s [%s]:%d: %s", domain, hop.host, hop.address, hop.port, exc.reply)

        return await first_answer(hops, connect, on_failure=failed)


def _outgoing(message: MessageRow, recipients: Sequence[RecipientRow], body: bytes) -> Outgoing:
    """What the courier needs of a queued message, for the recipients of this attempt."""
    return Outgoing(
        id=message.id,
        sender=message.sender,
        recipients=tuple(OutgoingRecipient(r.address, r.notify, r.orcpt) for r in recipients),
        body=body,
        smtputf8=message.smtputf8,
        eightbit=message.eightbit,
        envid=message.envid,
        ret=message.ret,
    )


class _RouteFailed(Exception):
    """No session could be opened: routing failed or every hop refused us."""

    def __init__(self, reason: RouteError | SessionError) -> None:
        super().__init__(str(reason))
        self.reason = reason
