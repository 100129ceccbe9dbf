"""Recipient policy: refuse at RCPT time what the primary would refuse, and stay out of its way.

A backup MX that accepts mail for a mailbox that does not exist must bounce it later, to a sender
that is usually forged (backscatter). So for each domain the relay knows who exists, from any of:

* `recipients` (local parts, addresses, or "*") and `recipients_file` (one per line, `#`
  comments), the file re-read when it changes and on SIGHUP;
* `verify = "callout"`: while the primary answers, ask it (MAIL FROM:<>, RCPT TO, no DATA) and
  remember the answer, positive for `verify_positive_ttl`, negative for `verify_negative_ttl`.
  Every recipient the primary accepts on delivery is remembered too, so that the relay knows the
  real mailboxes before the next outage starts. While the primary is down, a remembered mailbox
  is accepted and one never seen gets 450 4.1.1 (or is accepted, `verify_unknown_while_down`):
  the sender keeps the message and retries, nothing is lost and nothing bounces.

and `accept = "when_primary_down"` turns mail away (450 4.7.0) while the primary is up, so that
spammers who aim at backup MXes get nothing. Unknown recipients get 550 5.1.1; after
`smtp.max_unknown_recipients` of them in one session, 421 and the session ends (dictionary
attacks). Whether a primary is up comes from the delivery scheduler and, when that is stale, from
probes of our own (`PrimaryWatch`).

The remembered answers live in the queue database (relay.store), so they survive a restart that
happens during an outage, which is exactly when they are needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.config import Config, DomainConfig
from relay.delivery.courier import Reply, SessionError, first_answer, verify_recipient
from relay.delivery.health import DestinationHealth
from relay.delivery.mx import Hop, RouteError
from relay.envelope import domain_of, split
from relay.smtp.limits import Refusal
from relay.store import AsyncStore, StorageError, Store, address_key
from relay.words import plural

log = logging.getLogger("relay.policy")

CALLOUT_TIMEOUT = 30.0  # per reply; a sender waits 5 minutes for our RCPT reply (RFC 5321 4.5.3.2)
LEARN_REFRESH = 86400.0  # a learned mailbox is written again at most once a day
_PRUNE_EVERY = 1024


class Replies:
    """Reply texts of the recipient policy (kept here so that intake.py need not change)."""

    UNKNOWN = "550 5.1.1 <{address}>: Recipient address rejected: User unknown"
    TOO_MANY_UNKNOWN = "421 4.7.0 {host} Error: too many unknown recipients, closing connection"
    UNVERIFIED = (
        "450 4.1.1 <{address}>: Recipient address rejected: cannot verify the address while"
        " the primary mail server is unreachable, try again later"
    )
    PRIMARY_UP = (
        "450 4.7.0 <{address}>: this backup MX takes mail only while the primary is down;"
        " deliver to the primary MX"
    )


class InboundSession(Protocol):
    """What the policy keeps on an SMTP session (intake's RelaySession)."""

    unknown_recipients: int


class Verifier(Protocol):
    def __call__(
        self, hop: Hop, *, helo: str, address: str, timeout: float
    ) -> Awaitable[Reply]: ...


cache_key = address_key  # the remembered answers' key, shared with `relay recipients`


def takes_every_address(settings: DomainConfig) -> bool:
    """The domain accepts every address without asking anyone or remembering anything: no
    recipient list, no callout, not only while its primary is down. An SMTP worker decides
    these by itself (relay.workers), without asking the relay process."""
    return (
        not settings.recipients
        and not settings.recipients_file
        and settings.verify != "callout"
        and settings.accept != "when_primary_down"
    )


# -- static lists ------------------------------------------------------------------------------


@dataclass
class _FileState:
    signature: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) last read
    entries: frozenset[str] = frozenset()
    failing: bool = False  # said so in the log already


class RecipientLists:
    """`recipients` and `recipients_file` of every domain, files re-read when they change.

    A file is checked (one stat) at each lookup and read again when its inode, size or mtime
    differ, which catches both an edit in place and the usual write-then-rename. A file that
    cannot be read keeps its last good contents: a botched export must not turn the relay into
    one that refuses everybody, or one that accepts everybody.
    """

    def __init__(self) -> None:
        self._files: dict[str, _FileState] = {}
        self._static: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {}

    def reload(self) -> None:
        """SIGHUP: read every file again at its next use, changed or not."""
        for state in self._files.values():
            state.signature = None

    def lookup(self, settings: DomainConfig, address: str, wildcard: bool = True) -> bool | None:
        """True when listed, False when lists exist but do not name it, None when no list.

        With `wildcard` False a `*` entry names nobody: it says the domain takes any address,
        not that this one is a person.
        """
        if not settings.recipients and not settings.recipients_file:
            return None
        entries = self._static_entries(settings)
        if settings.recipients_file:
            entries = entries | self._file_entries(settings.recipients_file)
        lowered = address.lower()
        local = split(lowered)[0]
        return (wildcard and "*" in entries) or lowered in entries or local in entries

    def _static_entries(self, settings: DomainConfig) -> frozenset[str]:
        cached = self._static.get(settings.name)
        if cached is None or cached[0] is not settings.recipients:
            cached = (settings.recipients, _entries(settings.recipients))
            self._static[settings.name] = cached
        return cached[1]

    def _file_entries(self, path: str) -> frozenset[str]:
        state = self._files.setdefault(path, _FileState())
        try:
            info = os.stat(path)
            signature = (info.st_ino, info.st_size, info.st_mtime_ns)
            if signature != state.signature:
                with open(path, encoding="utf-8", errors="replace") as handle:
                    state.entries = _entries(handle.read().splitlines())
                state.signature = signature
                state.failing = False
                log.info("recipients_file %s: %s", path, plural(len(state.entries), "entry"))
        except OSError as exc:
            if not state.failing:
                log.error("recipients_file %s: %s (keeping the last list)", path, exc)
            state.failing = True
            state.signature = None
        return state.entries


def _entries(lines: Sequence[str]) -> frozenset[str]:
    found = set()
    for line in lines:
        entry = line.split("#", 1)[0].strip().lower()
        if entry:
            found.add(entry)
    return frozenset(found)


# -- remembered answers ------------------------------------------------------------------------


@dataclass
class Verdict:
    accepted: bool
    at: float  # when the primary said so (clock time)
    written: float  # when it was last handed to the store
    seq: int = 0  # order of `put` calls, so that a reload keeps what it could not have read


def verdict_age(checked_at: float, now: float, down_since: float | None) -> float:
    """How long the primary could have been asked about an address since it last answered.

    A time-to-live counts only time the primary was reachable: a mailbox verified 7 days ago is
    still known on day 7 of an outage, since nobody could have told us otherwise. Time from the
    start of the current outage on does not count (an answer given, or an address imported,
    during the outage is as fresh as it gets until the primary returns).
    """
    end = now if down_since is None else min(now, max(down_since, checked_at))
    return end - checked_at


class VerdictCache:
    """What the primary said about each address, in memory and written through to the queue db.

    Writes are batched and never block an SMTP reply: a failed write is logged and the answer is
    still used from memory. Whether an answer is still valid is decided by `expired`, with the
    domain's current settings and outage state, so a changed TTL applies to what is already
    remembered and an outage stops the clock.
    """

    def __init__(
        self,
        store: AsyncStore | None,
        clock: Callable[[], float],
        expired: Callable[[str, Verdict, float], bool],
    ) -> None:
        self.store = store
        self.clock = clock
        self.expired = expired
        self.entries: dict[str, Verdict] = {}
        self._dirty: dict[str, Verdict] = {}
        self._flush: asyncio.Task[None] | None = None
        self._puts = 0

    async def load(self) -> None:
        """Reads what earlier runs (and `relay recipients import`) remembered; drops the expired.

        Called at start-up and whenever another process (the CLI) changed the queue database:
        imported and forgotten addresses then take effect without a restart.
        """
        if self.store is None:
            return
        # The read is queued behind every write already handed to the writer thread, so it sees
        # those; answers still waiting to be handed over, or given while it runs, are kept.
        started, unsubmitted = self._puts, dict(self._dirty)
        try:
            rows = await self.store.run(Store.verdicts)
        except StorageError as exc:
            log.error("cannot read remembered recipients: %s", exc)
            return
        now = self.clock()
        loaded: dict[str, Verdict] = {}
        stale: list[str] = []
        for address, accepted, at in rows:
            verdict = Verdict(accepted, at, written=at)
            if self.expired(address, verdict, now):
                stale.append(address)
            else:
                loaded[address] = verdict
        if stale:
            with contextlib.suppress(StorageError):  # tried again at the next load
                await self.store.run(functools.partial(Store.forget_addresses, addresses=stale))
        loaded.update(unsubmitted)
        loaded.update((k, v) for k, v in self.entries.items() if v.seq > started)
        first = not self.entries
        self.entries = loaded
        if first:
            log.info("%s loaded", plural(len(loaded), "remembered recipient answer"))

    def get(self, address: str) -> bool | None:
        key = cache_key(address)
        verdict = self.entries.get(key)
        if verdict is None or self.expired(key, verdict, self.clock()):
            return None
        return verdict.accepted

    def put(self, address: str, accepted: bool) -> None:
        key = cache_key(address)
        now = self.clock()
        old = self.entries.get(key)
        self._puts += 1
        verdict = Verdict(accepted, now, written=now, seq=self._puts)
        if old is not None and old.accepted == accepted and now - old.written < LEARN_REFRESH:
            # The same answer, written recently: every delivery to a mailbox need not cost a
            # write. Memory has the new time; the database is at most LEARN_REFRESH behind.
            verdict.written = old.written
            self.entries[key] = verdict
            return
        self.entries[key] = verdict
        self._dirty[key] = verdict
        if self._puts % _PRUNE_EVERY == 0:
            self._prune(now)
        if self.store is not None and (self._flush is None or self._flush.done()):
            self._flush = asyncio.create_task(self._write())

    def _prune(self, now: float) -> None:
        for key in [k for k, v in self.entries.items() if self.expired(k, v, now)]:
            del self.entries[key]

    async def _write(self) -> None:
        while self._dirty and self.store is not None:
            batch = [(k, v.accepted, v.at) for k, v in self._dirty.items()]
            self._dirty.clear()
            try:
                await self.store.run(functools.partial(Store.save_verdicts, verdicts=batch))
            except StorageError as exc:
                log.error("cannot remember %s: %s", plural(len(batch), "recipient answer"), exc)

    async def close(self) -> None:
        """Waits for pending writes (before the store closes)."""
        if self._flush is not None:
            await asyncio.gather(self._flush, return_exceptions=True)
        if self._dirty and self.store is not None:
            await self._write()


# -- the policy --------------------------------------------------------------------------------


class RecipientPolicy:
    """The RCPT-time decisions of recipient validation and `accept`, for intake's handler."""

    def __init__(
        self,
        get_config: Callable[[], Config],
        *,
        store: AsyncStore | None,
        health: DestinationHealth,
        clock: Callable[[], float] = time.time,
        verifier: Verifier = verify_recipient,
        callout_timeout: float = CALLOUT_TIMEOUT,
    ) -> None:
        self.get_config = get_config
        self.clock = clock
        self.verifier = verifier
        self.callout_timeout = callout_timeout
        self.lists = RecipientLists()
        self.store = store
        self.cache = VerdictCache(store, clock, self._expired)
        self.health = health
        self._callouts: dict[str, asyncio.Task[bool | None]] = {}

    async def start(self) -> None:
        """Loads the remembered answers (after the health restore, before listeners open)."""
        await self.cache.load()

    def _expired(self, key: str, verdict: Verdict, now: float) -> bool:
        domain = domain_of(key)
        settings = self.get_config().domain(domain)
        if settings is None:
            return True
        ttl = settings.verify_positive_ttl if verdict.accepted else settings.verify_negative_ttl
        return verdict_age(verdict.at, now, self.health.down_since(domain)) >= ttl

    async def reread(self) -> None:
        """The CLI changed the database (`relay recipients import` or `forget`): take it up."""
        await self.cache.load()

    async def stop(self) -> None:
        tasks = [t for t in self._callouts.values() if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.cache.close()

    def reload(self) -> None:
        """SIGHUP: recipients files are read again (the config itself comes from get_config)."""
        self.lists.reload()

    def learn(self, address: str) -> None:
        """The primary accepted `address` on delivery: remember it as a real mailbox."""
        settings = self.get_config().domain(domain_of(address))
        if settings is not None and settings.verify == "callout":
            self.cache.put(address, True)

    async def rcpt(
        self, session: InboundSession, settings: DomainConfig, address: str
    ) -> Refusal | None:
        """None to accept `address` (of the configured domain `settings`), else the refusal."""
        if takes_every_address(settings):
            return None
        if settings.accept == "when_primary_down" and await self.health.current(settings.name):
            return Refusal(Replies.PRIMARY_UP.format(address=address), "primary_up")
        known = await self._known(settings, address)
        if known:
            return None
        if known is None:
            if settings.verify_unknown_while_down == "accept":
                return None
            return Refusal(Replies.UNVERIFIED.format(address=address), "unverified")
        session.unknown_recipients += 1
        config = self.get_config()
        if session.unknown_recipients > config.smtp.max_unknown_recipients:
            reply = Replies.TOO_MANY_UNKNOWN.format(host=config.hostname)
            return Refusal(reply, "too_many_unknown_recipients")
        return Refusal(Replies.UNKNOWN.format(address=address), "unknown_recipient")

    def exists(self, address: str) -> bool:
        """The relay knows this mailbox exists: listed by name, imported, or accepted by the
        primary (a callout or a delivery). Never a guess: no catch-all, no address that got
        450 while the primary could not be asked (relay.rescue gives copies only to these)."""
        settings = self.get_config().domain(domain_of(address))
        if settings is None:
            return False
        if self.lists.lookup(settings, address, wildcard=False):
            return True
        verdict = self.cache.entries.get(cache_key(address))
        return verdict is not None and verdict.accepted

    async def _known(self, settings: DomainConfig, address: str) -> bool | None:
        """True exists, False does not, None no verdict (primary unreachable, never seen)."""
        listed = self.lists.lookup(settings, address)
        if listed:
            return True
        if settings.verify != "callout":
            return listed is None  # no list and no callout: every address of the domain
        cached = self.cache.get(address)
        if cached is not None:
            return cached
        if self.health.is_down(settings.name):
            return None
        key = cache_key(address)
        task = self._callouts.get(key)
        if task is None or task.done():
            task = asyncio.create_task(self._callout(settings, address))
            self._callouts[key] = task
            task.add_done_callback(functools.partial(self._callout_done, key))
        # Shielded: a client that hangs up must not cancel the answer others wait for.
        return await asyncio.shield(task)

    def _callout_done(self, key: str, task: asyncio.Task[bool | None]) -> None:
        if self._callouts.get(key) is task:
            del self._callouts[key]

    async def _callout(self, settings: DomainConfig, address: str) -> bool | None:
        reply = await self._ask_primary(settings, address)
        if reply is None or not (200 <= reply.code < 300 or reply.permanent):
            return None  # 4xx (greylisting, a busy primary): no verdict either way
        accepted = 200 <= reply.code < 300
        self.cache.put(address, accepted)
        log.info("callout <%s>: %s", address, reply)
        return accepted

    async def _ask_primary(self, settings: DomainConfig, address: str) -> Reply | None:
        router = self.health.router
        if router is None:
            return None
        config = self.get_config()
        try:
            hops = await router.hops(settings.name, settings.primary)
        except RouteError as exc:
            log.info("callout <%s>: no route: %s", address, exc)
            self.health.failed(settings.name, str(exc))
            return None
        timeout = min(self.callout_timeout, config.delivery.timeout)
        try:
            reply = await first_answer(
                hops,
                lambda hop: self.verifier(
                    hop, helo=config.hostname, address=address, timeout=timeout
                ),
            )
        except SessionError as exc:
            log.info("callout <%s>: no primary answered: %s", address, exc.reply)
            self.health.failed(settings.name, str(exc.reply))
            return None
        self.health.succeeded(settings.name)
        return reply
