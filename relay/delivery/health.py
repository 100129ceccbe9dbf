"""Whether each destination's primary answers: one owner for that fact.

Deliveries, callouts and probes all learn something about a primary; before this module the
scheduler and the recipient policy each kept their own idea of it, with a probe loop each. Here
one `Health` per destination holds the state (up, down, or unknown since start), when it last
changed, the last error and the last success, and every change goes through `_become`: logged,
counted (`relay_primary_up`), persisted (so `relay status` and a restart on day 3 of an outage
see "down since day 0"), and announced to whoever waits for a recovery (the scheduler).

One probe loop per destination: while it is down, a probe (connect, EHLO, QUIT) every
`delivery.probe_interval` until it answers; for the domains whose RCPT replies depend on the
primary (`accept = "when_primary_down"`, `verify = "callout"`), also a probe whenever what we
know is older than `UP_REFRESH` intervals, since with no mail flowing nothing else would tell.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay.config import Config, DomainConfig
from relay.delivery.courier import Reply, SessionError, first_answer, probe
from relay.delivery.mx import Hop, RouteError, Router
from relay.ops import metrics
from relay.store import AsyncStore, DestinationState, StorageError, Store

log = logging.getLogger("relay.health")

PROBE_TIMEOUT = 10.0
UP_REFRESH = 12  # an "up" is re-checked every 12 probe intervals (1 minute by default)


class Prober(Protocol):
    def __call__(self, hop: Hop, *, helo: str, timeout: float) -> Awaitable[Reply]: ...


class State(enum.Enum):
    UNKNOWN = "unknown"  # not tried since start (and nothing restored)
    UP = "up"
    DOWN = "down"


@dataclass
class Health:
    """What is known of one destination's primary."""

    name: str
    state: State = State.UNKNOWN
    since: float | None = None  # when `state` last changed
    last_error: str | None = None
    last_success: float | None = None
    last_checked: float | None = None  # the newest observation, either way
    recovered: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def up(self) -> bool | None:
        """True up, False down, None unknown (the shape `relay status` and the store use)."""
        return None if self.state is State.UNKNOWN else self.state is State.UP

    @property
    def down(self) -> bool:
        return self.state is State.DOWN


def watched(settings: DomainConfig) -> bool:
    """Whether RCPT replies for the domain depend on its primary being up right now."""
    return settings.accept == "when_primary_down" or settings.verify == "callout"


# Seconds between probes of a down destination that has mail waiting (issue 17: the primary
# back, the first delivery within about a second, never more than one probe a second).
WAITING_PROBE_INTERVAL = 1.0


class DestinationHealth:
    """Every destination's `Health`, its transitions and its probe loop."""

    def __init__(
        self,
        get_config: Callable[[], Config],
        store: AsyncStore | None,
        *,
        clock: Callable[[], float] = time.time,
        prober: Prober = probe,
    ) -> None:
        self.get_config = get_config
        self.store = store
        self.clock = clock
        self.prober = prober
        self.router: Router | None = None
        self.destinations: dict[str, Health] = {}
        # Called with the destination's name when it comes back up (the scheduler's flush).
        self.on_recovery: list[Callable[[str], Coroutine[Any, Any, None]]] = []
        # One probe loop per down destination, and one-off probes (shared by who asks).
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    # -- reading --------------------------------------------------------------------------

    def get(self, name: str) -> Health:
        health = self.destinations.get(name)
        if health is None:
            health = self.destinations[name] = Health(name)
        return health

    def is_down(self, name: str) -> bool:
        health = self.destinations.get(name)
        return health is not None and health.down

    def state(self, name: str) -> bool | None:
        health = self.destinations.get(name)
        return None if health is None else health.up

    def down_since(self, name: str) -> float | None:
        """When the current outage began; None while the destination is not down."""
        health = self.destinations.get(name)
        return health.since if health is not None and health.down else None

    def down_names(self) -> list[str]:
        return [name for name, health in self.destinations.items() if health.down]

    def fresh(self, name: str) -> bool:
        """Whether what we know is recent enough to answer a RCPT on (down: the loop runs)."""
        health = self.destinations.get(name)
        if health is None or health.last_checked is None:
            return False
        if health.down:
            return True
        interval = self.get_config().delivery.probe_interval
        return self.clock() - health.last_checked < interval * UP_REFRESH

    async def current(self, name: str) -> bool | None:
        """The state, probing first when nothing is known yet."""
        if self.state(name) is None:
            await self._probe_once(name)
        return self.state(name)

    # -- what deliveries, callouts and probes report -----------------------------------------

    def succeeded(self, name: str, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        health = self.get(name)
        health.last_success = health.last_checked = now
        if self.get_config().domain(name) is not None:
            metrics.primary_last_success.labels(name).set(now)
        if health.state is not State.UP:
            self._become(health, State.UP, now)

    def failed(self, name: str, error: str, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        health = self.get(name)
        health.last_error, health.last_checked = error, now
        if health.state is not State.DOWN:
            self._become(health, State.DOWN, now)
        self._ensure_loop(name)

    def _become(self, health: Health, state: State, now: float) -> None:
        """The one place a destination changes state: log, metric, store, recovery."""
        before = health.state
        health.state, health.since = state, now
        if state is State.DOWN:
            health.recovered.clear()
            log.warning("%s: destination down: %s", health.name, health.last_error)
        else:
            health.recovered.set()
            if before is State.DOWN:
                log.info("%s: destination is up again", health.name)
        if self.get_config().domain(health.name) is not None:
            metrics.primary_up.labels(health.name).set(int(state is State.UP))
            metrics.destination_transitions.labels(health.name, state.value).inc()
        self._persist(health)
        if before is State.DOWN and state is State.UP:
            for callback in self.on_recovery:
                self._spawn(callback(health.name))

    # -- persistence ------------------------------------------------------------------------

    async def restore(self) -> None:
        """Takes up what an earlier run knew: "down since day 0" survives a restart on day 3.

        A destination that was down is probed at once (it may have come back meanwhile).
        """
        if self.store is None:
            return
        try:
            states = await self.store.run(Store.destinations)
        except StorageError as exc:
            log.warning("destination states not restored: %s", exc)
            return
        for name, saved in states.items():
            health = self.get(name)
            health.state = _state_of(saved.up)
            health.since, health.last_error = saved.since, saved.last_error
            health.last_success = saved.last_success
            if self.get_config().domain(name) is not None:
                if saved.up is not None:
                    metrics.primary_up.labels(name).set(int(saved.up))
                if saved.last_success is not None:
                    metrics.primary_last_success.labels(name).set(saved.last_success)
            if health.down:
                health.last_checked = saved.since
                log.info(
                    "%s: destination down since %s (restored): probing", name, _when(saved.since)
                )
                self._ensure_loop(name, first_delay=0.0)
            else:
                health.recovered.set()

    def _persist(self, health: Health) -> None:
        """Saves the change for `relay status` and restarts; never blocks anyone on it."""
        if self.store is None:
            return
        state = DestinationState(
            health.name, health.up, health.since, health.last_error, health.last_success
        )
        self._spawn(self._save(state), self._writes)

    async def _save(self, state: DestinationState) -> None:
        assert self.store is not None
        try:
            await self.store.run(lambda s: s.save_destination(state))
        except StorageError as exc:
            log.warning("%s: could not save the destination's state: %s", state.domain, exc)

    # -- probing ----------------------------------------------------------------------------

    def start(self, router: Router) -> None:
        """Routes are known (the listeners are open): probing can begin."""
        self.router = router
        if self._watch is None:
            self._watch = asyncio.create_task(self._watch_loop())

    def probe_soon(self, name: str) -> None:
        """ETRN or an operator's flush: ask a down primary now rather than at the next interval."""
        if self.is_down(name):
            self._ensure_loop(name, first_delay=0.0, restart=True)

    def _ensure_loop(
        self, name: str, first_delay: float | None = None, restart: bool = False
    ) -> None:
        task = self._loops.get(name)
        if task is not None and not task.done():
            if not restart:
                return
            task.cancel()
        self._loops[name] = asyncio.create_task(self._down_loop(name, first_delay))

    async def _down_loop(self, name: str, first_delay: float | None) -> None:
        """While down: a probe every so often; the first answer is the recovery.

        A destination with mail waiting is probed every WAITING_PROBE_INTERVAL (or
        probe_interval, if shorter), so that mail leaves within about a second of the primary's
        return, one connection a second at most; one with nothing waiting every probe_interval.
        """
        delay = await self._probe_delay(name) if first_delay is None else first_delay
        while self.is_down(name) and not self._stopping:
            await asyncio.sleep(delay)
            await self._probe(name)
            delay = await self._probe_delay(name)

    async def _probe_delay(self, name: str) -> float:
        interval = self.get_config().delivery.probe_interval
        if self.store is None:
            return interval
        try:
            waiting = await self.store.run(lambda s: s.has_waiting(name))
        except StorageError:
            waiting = True  # cannot tell: the shorter wait costs one probe a second at most
        return min(WAITING_PROBE_INTERVAL, interval) if waiting else interval

    async def _probe_once(self, name: str) -> None:
        """One probe, shared by everyone who asks meanwhile."""
        await asyncio.shield(self._probe_task(name))

    def _probe_task(self, name: str) -> asyncio.Task[None]:
        task = self._probes.get(name)
        if task is None or task.done():
            task = self._probes[name] = asyncio.create_task(self._probe(name))
        return task

    async def _probe(self, name: str) -> None:
        if self.router is None:
            return
        config = self.get_config()
        settings = config.domain(name)
        try:
            hops = await self.router.hops(name, settings.primary if settings else ())
            await first_answer(
                hops, lambda hop: self.prober(hop, helo=config.hostname, timeout=PROBE_TIMEOUT)
            )
        except RouteError as exc:
            self.failed(name, str(exc))
        except SessionError as exc:
            self.failed(name, str(exc.reply))
        else:
            self.succeeded(name)

    async def _watch_loop(self) -> None:
        """Keeps the watched domains' state fresh until stopped."""
        while not self._stopping:
            config = self.get_config()
            for settings in config.domains:
                if watched(settings) and not self.fresh(settings.name):
                    self._probe_task(settings.name)
            await asyncio.sleep(config.delivery.probe_interval)

    def _spawn(
        self, work: Coroutine[Any, Any, None], into: set[asyncio.Task[None]] | None = None
    ) -> None:
        tasks = self._writes if into is None else into
        task = asyncio.create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (*self._loops.values(), *self._probes.values()) if not t.done()]
        if self._watch is not None:
            tasks.append(self._watch)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._writes, return_exceptions=True)


def _state_of(up: bool | None) -> State:
    return State.UNKNOWN if up is None else (State.UP if up else State.DOWN)


def _when(moment: float | None) -> str:
    if moment is None:
        return "an unknown time"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
