"""Intake limits: how much of the relay one client, or all clients together, may take at once.

A backup MX is where abusive clients go first, so no single client may take every connection
slot, every message of the minute, or the memory that DATA is buffered in, and no client may
make the relay fill its disk. Every limit answers with a clear SMTP reply and a metric reason
(`relay_messages_rejected_total{reason}`), and every refusal is temporary (4xx): a legitimate
sender that trips one retries later and loses nothing.

Clients are counted by address; IPv6 clients by their /64, because one host routinely holds a
whole /64 and could otherwise take a fresh address per connection. IPv4-mapped IPv6 addresses
(a dual-stack `[::]` listener) count as the IPv4 client they are.

The reply texts live here rather than in intake.py with the others, so that this module can
change without touching the protocol code; intake.py only relays a `Refusal`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import ipaddress
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from relay.config import Config, SmtpConfig

log = logging.getLogger("relay.limits")

RATE_WINDOW = 60.0  # smtp.rate_per_ip counts messages in this many seconds
_PRUNE_EVERY = 1024  # rate checks between two sweeps of idle clients


@dataclass(frozen=True)
class Refusal:
    """An SMTP reply that refuses something, and the metric reason it is counted under."""

    reply: str
    reason: str

    @property
    def closes(self) -> bool:
        """A 421 ends the session (RFC 5321 3.8): the server closes the channel after it."""
        return self.reply.startswith("421")


class Replies:
    """Reply texts of the limits. 4.7.0 is "security or policy", 4.3.1 "system full"."""

    TOO_MANY_CONNECTIONS = "421 4.7.0 {host} Error: too many connections, try again later"
    TOO_MANY_FROM_CLIENT = "421 4.7.0 {host} Error: too many connections from [{client}]"
    TOO_MANY_MESSAGES = "421 4.7.0 {host} Error: too many messages in one session"
    RATE = "421 4.7.0 {host} Error: too many messages from [{client}], slow down"
    LOW_DISK = "452 4.3.1 Insufficient system storage, try again later"
    INFLIGHT = "451 4.3.1 Insufficient system resources, try again later"


class Client(Protocol):
    """What the limits read and keep on an SMTP session (intake's RelaySession)."""

    @property
    def client_ip(self) -> str: ...

    messages: int  # messages accepted in this session
    slot: str | None  # the client key whose connection slot this session holds


@functools.lru_cache(maxsize=4096)
def client_key(address: str) -> str:
    """The unit the per-client limits count: the IPv4 address, or the IPv6 /64.

    Kept for the clients seen last: parsing an address is asked at every connection, twice
    with SMTP workers, and a flood comes from few addresses."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an IP (a Unix socket, a test): count it as given
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@functools.lru_cache(maxsize=4)
def _queue_directory(path: str) -> Path:
    """Resolved once: it runs per MAIL command, and queue.path changes only with a restart."""
    return Path(path).expanduser().resolve().parent


def disk_free(path: str) -> int | None:
    """Bytes free to unprivileged writers where the queue lives; None when it cannot be told."""
    directory = _queue_directory(path)
    try:
        stats = os.statvfs(directory)
    except OSError as exc:
        log.warning("cannot tell the free space of %s: %s", directory, exc.strerror or exc)
        return None
    return stats.f_bavail * stats.f_frsize


# Seconds a comfortable free-space answer is trusted at most, commits or not: another program
# filling the disk is seen within this.
FREE_SPACE_TTL = 1.0
# The share of smtp.max_connections above which the relay is under stress (relay.intake then
# shortens timeouts to smtp.stress_timeout), like Postfix's stress threshold of its process limit.
STRESS_AT = 0.8


def share(smtp: SmtpConfig) -> SmtpConfig:
    """One SMTP worker's own limits when `smtp.workers` processes run sessions (relay.workers).

    The counts that are about clients (connections in all, connections and messages a minute
    per client) are kept by the relay process for every worker, as Postfix's anvil keeps them
    for every smtpd: exact, whichever worker the kernel hands a connection to. A worker's own
    count of them, with the same values, can never refuse first (its clients are a part of all
    of them), so they stay as they are. The DATA buffer is memory of the worker's own process:
    each gets its part of the budget, never less than one message of the largest size.
    """
    workers = smtp.workers
    if workers == 1:
        return smtp
    budget = max(smtp.max_message_size, smtp.max_inflight_bytes // workers)
    return dataclasses.replace(smtp, max_inflight_bytes=budget)


class Limits:
    """Connection slots, per-client message rate, the in-flight DATA budget and free disk space.

    One instance serves every listener; the event loop is single-threaded, so plain counters are
    exact. The config comes through a callable so that a SIGHUP reload applies to new decisions.
    """

    def __init__(
        self,
        get_config: Callable[[], Config],
        *,
        clock: Callable[[], float] = time.monotonic,
        free_space: Callable[[], int | None] | None = None,
    ) -> None:
        self.get_config = get_config
        self.clock = clock
        self.free_space = free_space or (lambda: disk_free(self.get_config().queue.path))
        self.connections = 0
        self.per_client: collections.Counter[str] = collections.Counter()
        self.inflight_bytes = 0
        self._recent: dict[str, collections.deque[float]] = {}
        self._checks = 0
        # A recent free-space answer well above queue.min_free_space, shared by every MAIL FROM
        # until the next commit (forget_free_space): one statvfs per commit batch, not per MAIL.
        self._free: int | None = None
        self._free_at = 0.0

    # -- connections --------------------------------------------------------------------------

    def connect(self, session: Client) -> Refusal | None:
        """Takes a connection slot for a new session, or says why there is none (421 4.7.0).

        The total is checked first: when the relay is full, every client hears the same thing.
        """
        config = self.get_config()
        smtp, host = config.smtp, config.hostname
        key = client_key(session.client_ip)
        if self.connections >= smtp.max_connections:
            return Refusal(Replies.TOO_MANY_CONNECTIONS.format(host=host), "max_connections")
        if self.per_client[key] >= smtp.max_connections_per_ip:
            reply = Replies.TOO_MANY_FROM_CLIENT.format(host=host, client=session.client_ip)
            return Refusal(reply, "max_connections_per_ip")
        self.connections += 1
        self.per_client[key] += 1
        session.slot = key
        return None

    @property
    def stressed(self) -> bool:
        """More than STRESS_AT of smtp.max_connections in use: time to shed slow clients.

        With SMTP workers, each judges by its own sessions against its part of the slots.
        """
        smtp = self.get_config().smtp
        return self.connections > STRESS_AT * smtp.max_connections / smtp.workers

    def disconnect(self, session: Client) -> None:
        """Gives the session's slot back; safe to call for a session that never had one."""
        key, session.slot = session.slot, None
        if key is None:
            return
        self.connections -= 1
        self.per_client[key] -= 1
        if self.per_client[key] <= 0:
            del self.per_client[key]

    # -- transactions ---------------------------------------------------------------------------

    def mail(self, session: Client) -> Refusal | None:
        """MAIL FROM: messages per session, messages per minute per client, free disk space.

        Checked before any data is taken, so a refusal costs the sender nothing: 452 is RFC 5321
        4.2.3's "insufficient system storage", 4.3.1 RFC 3463's "mail system full".
        """
        config = self.get_config()
        smtp = config.smtp
        if session.messages >= smtp.max_messages_per_session:
            return Refusal(Replies.TOO_MANY_MESSAGES.format(host=config.hostname), "max_messages")
        free = self._free if self.clock() - self._free_at < FREE_SPACE_TTL else None
        if free is None:
            free = self.free_space()
            # Only a comfortable answer is kept: near the limit every MAIL looks again, so the
            # space freed or filled by others is seen at once (tests/test_faults.py).
            if free is not None and free >= 2 * config.queue.min_free_space:
                self._free, self._free_at = free, self.clock()
        if free is not None and free < config.queue.min_free_space:
            log.warning(
                "refusing mail: %d bytes free, queue.min_free_space is %d",
                free,
                config.queue.min_free_space,
            )
            return Refusal(Replies.LOW_DISK, "low_disk_space")
        return self.rate(session.client_ip)

    def rate(self, client_ip: str) -> Refusal | None:
        """Counts one message for the client; a refusal when over smtp.rate_per_ip a minute."""
        config = self.get_config()
        if config.smtp.rate_per_ip and not self._count_message(client_key(client_ip)):
            reply = Replies.RATE.format(host=config.hostname, client=client_ip)
            return Refusal(reply, "rate_per_ip")
        return None

    def forget_free_space(self) -> None:
        """The queue committed (relay.store's writer thread): the disk changed, look again."""
        self._free = None

    def _count_message(self, key: str) -> bool:
        """Counts one message for `key` in the sliding window; False when over the rate."""
        now = self.clock()
        self._checks += 1
        if self._checks % _PRUNE_EVERY == 0:
            self._prune(now)
        recent = self._recent.setdefault(key, collections.deque())
        while recent and recent[0] <= now - RATE_WINDOW:
            recent.popleft()
        if len(recent) >= self.get_config().smtp.rate_per_ip:
            return False
        recent.append(now)
        return True

    def _prune(self, now: float) -> None:
        """Forgets clients with nothing in the window, so the table does not grow forever."""
        for key in [k for k, q in self._recent.items() if not q or q[-1] <= now - RATE_WINDOW]:
            del self._recent[key]

    # -- the DATA buffer ------------------------------------------------------------------------

    def take(self, size: int) -> bool:
        """Reserves `size` more bytes of DATA buffer; False when that would go over budget.

        aiosmtpd's design holds a message in memory until it is stored, so many large messages
        at once could exhaust memory: over `smtp.max_inflight_bytes` the message is refused
        (451 4.3.1, the sender retries) rather than the process growing without bound.
        """
        if self.inflight_bytes + size > self.get_config().smtp.max_inflight_bytes:
            return False
        self.inflight_bytes += size
        return True

    def release(self, size: int) -> None:
        """Returns what one message reserved, once it was stored or refused."""
        self.inflight_bytes -= size

    def inflight_refusal(self) -> Refusal:
        return Refusal(Replies.INFLIGHT, "inflight_bytes")
