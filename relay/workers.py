"""Acceptor processes: SMTP sessions on every core, the queue in one process.

One Python process runs its SMTP sessions on one core at a time (the GIL). With `smtp.workers`
above one, the relay process (the owner) still binds the listening sockets, opens the queue and
runs delivery, metrics and the operators' follow-up, but it serves no SMTP itself: `workers`
acceptor processes (`python -m relay.workers`, started and restarted by the owner) inherit the
listening sockets and run the sessions.

An acceptor hands each message it takes to the owner over a socket pair, and the owner commits it
with its one writer thread: one group commit for every acceptor, no two SQLite writers waiting on
each other's locks (several full relays sharing the WAL were measured that way and lost to this,
docs/performance.md). The acceptor says 250 only when the owner answers that the message is
durable; a storage error, or an owner that is gone, is a 451. Recipient checks (lists, callouts
and what they remember, the primary's health) are asked of the owner as well, so the relay keeps
one memory of them and one callout per address, however many processes take mail.

The limits that count clients (connections in all and per client, messages a minute per
client) are counted by the owner for every acceptor (`SharedCounts`, as Postfix's anvil counts
them for every smtpd), so they stay exact; only the DATA buffer, each process's own memory, is
divided between them (relay.smtp.limits.share).

The socket pair carries length-prefixed pickles both ways: requests with an id, and the replies
to them. Both ends are this program, started by its owner, so unpickling is no wider a door than
importing our own code.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import inspect
import itertools
import logging
import operator
import os
import pickle
import signal
import socket
import ssl
import struct
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import uvloop
from prometheus_client.core import Metric

from relay import tls
from relay.config import Config, DomainConfig
from relay.delivery.mx import Router
from relay.ops import logs, metrics
from relay.smtp.arc import Sealer, load_sealer
from relay.smtp.auth import Authenticator
from relay.smtp.dnsbl import DnsLists
from relay.smtp.intake import IntakeHandler, RelaySMTP, smtp_protocol
from relay.smtp.limits import Limits, Refusal, client_key, share
from relay.smtp.policy import InboundSession, takes_every_address
from relay.store import NewMessage, StorageError

log = logging.getLogger("relay.workers")

Handler = Callable[..., Any]  # returns the answer, or an awaitable of it

_LENGTH = struct.Struct("!I")
# An acceptor that dies is started again after this long: soon enough that the others' share of
# the connections is short-lived, not so soon that one that cannot start spins.
RESTART_DELAY = 1.0
READY_TIMEOUT = 30.0
# How long a scrape waits for an acceptor's counters before showing the ones it last gave.
METRICS_TIMEOUT = 2.0
# Gauges whose sum over the acceptors means nothing: any acceptor under stress is the relay.
_HIGHEST = frozenset({"relay_smtp_stress"})


OWNER_GONE = "451 4.3.0 Error: queue unavailable, try again later"
OWNER_GONE_AT_CONNECT = "421 4.3.0 Error: queue unavailable, try again later"


class ChannelClosed(ConnectionError):
    """The process at the other end of the socket pair is gone."""


class Channel(asyncio.Protocol):
    """Requests and replies both ways over one socket pair: `ask` and `tell` here, `handlers`
    for the other side's requests (plain functions, or coroutines for what must wait, such as
    a commit). `closed` is set, and every pending `ask` fails, when the other process goes away.

    A protocol rather than streams: every message of the relay crosses here, and a frame is
    parsed where it arrives, with no task per read; the replies of one pass of the loop leave
    in one write.
    """

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self._handlers = handlers
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._answering: set[asyncio.Task[None]] = set()
        self._buffer = bytearray()
        self._outgoing: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asking --

    async def ask(self, verb: str, *args: Any) -> Any:
        if self.closed:
            raise ChannelClosed(f"{verb}: the other process is gone")
        number = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        self._send(number, verb, args)
        try:
            return await future
        finally:
            self._waiting.pop(number, None)

    def tell(self, verb: str, *args: Any) -> None:
        """A request that needs no answer (number 0: none is sent back)."""
        self._send(0, verb, args)

    def _send(self, number: int, verb: str, payload: Any) -> None:
        if self.closed:
            return
        data = pickle.dumps((number, verb, payload), protocol=pickle.HIGHEST_PROTOCOL)
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing += (_LENGTH.pack(len(data)), data)

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self._transport is not None and not self.closed:
            self._transport.write(b"".join(outgoing))

    # -- the transport's side --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but write the same.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start, length = 0, len(buffer)
        while length - start >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer, start)
            end = start + _LENGTH.size + size
            if end > length:
                break
            self._received(*pickle.loads(buffer[start + _LENGTH.size : end]))
            start = end
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ChannelClosed("the other process is gone"))
        if not self.gone.done():
            self.gone.set_result(None)

    def _received(self, number: int, verb: str, payload: Any) -> None:
        if verb in ("reply", "fail"):
            self._settle(number, verb, payload)
            return
        try:
            result = self._handlers[verb](*payload)
        except Exception as exc:
            self._failed(number, verb, exc)
            return
        if not inspect.isawaitable(result):
            if number:
                self._send(number, "reply", result)
            return
        task = asyncio.ensure_future(self._answer(number, verb, result))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    def _settle(self, number: int, verb: str, payload: Any) -> None:
        future = self._waiting.get(number)
        if future is None or future.done():
            return
        if verb == "reply":
            future.set_result(payload)
        else:
            kind, text = payload
            future.set_exception(StorageError(text) if kind == "storage" else RuntimeError(text))

    async def _answer(self, number: int, verb: str, pending: Awaitable[Any]) -> None:
        try:
            result = await pending
        except Exception as exc:
            self._failed(number, verb, exc)
        else:
            if number:
                self._send(number, "reply", result)

    def _failed(self, number: int, verb: str, exc: Exception) -> None:
        if isinstance(exc, StorageError):
            self._send(number, "fail", ("storage", str(exc)))
        else:
            log.error("%s request failed: %r", verb, exc, exc_info=exc)
            self._send(number, "fail", ("error", repr(exc)))


async def _connect(sock: socket.socket, handlers: Mapping[str, Handler]) -> Channel:
    channel = Channel(handlers)
    await asyncio.get_running_loop().create_connection(lambda: channel, sock=sock)
    return channel


# -- the owner's side ------------------------------------------------------------------------


@dataclass
class _Visitor:
    """A client as the shared count sees it (relay.smtp.limits.Client): its session lives in
    a worker."""

    client_ip: str
    messages: int = 0
    slot: str | None = None


class SharedCounts:
    """The client limits every worker shares, kept here as Postfix's anvil keeps them for every
    smtpd: connections in all and per client, messages a minute per client, with the values
    configured (not divided). Which worker holds each connection is kept too, so that the
    connections of a worker that died are given back."""

    def __init__(self, get_config: Callable[[], Config]) -> None:
        self.limits = Limits(get_config)
        self.held: dict[int, collections.Counter[str]] = {}

    def connect(self, worker: int, client_ip: str) -> Refusal | None:
        refusal = self.limits.connect(_Visitor(client_ip))
        if refusal is None:
            self.held.setdefault(worker, collections.Counter())[client_ip] += 1
        return refusal

    def disconnect(self, worker: int, client_ip: str) -> None:
        held = self.held.get(worker)
        if held is None or held[client_ip] <= 0:
            return
        held[client_ip] -= 1
        if not held[client_ip]:
            del held[client_ip]
        self._release(client_ip)

    def forget(self, worker: int) -> None:
        """The worker is gone, and its sessions with it."""
        for client_ip, count in self.held.pop(worker, collections.Counter()).items():
            for _ in range(count):
                self._release(client_ip)

    def _release(self, client_ip: str) -> None:
        self.limits.disconnect(_Visitor(client_ip, slot=client_key(client_ip)))

    def message(self, client_ip: str) -> Refusal | None:
        return self.limits.rate(client_ip)


@dataclass
class _Slot:
    """One acceptor: the process now filling the slot, and what it last said about itself."""

    number: int
    process: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    families: list[Metric] = field(default_factory=list)


class Acceptors:
    """The owner's side: starts the acceptors on the listening sockets, answers their requests
    (`handlers`, plus "config" and "ready"), and starts a new one when one dies."""

    def __init__(
        self,
        count: int,
        listeners: list[socket.socket],
        handlers: Mapping[str, Handler],
        get_config: Callable[[], Config],
    ) -> None:
        self.listeners = listeners
        self.handlers = handlers
        self.get_config = get_config
        self.slots = [_Slot(number) for number in range(1, count + 1)]
        self.counts = SharedCounts(get_config)
        self._keepers: list[asyncio.Task[None]] = []
        self._stopping = False
        # The counters of acceptors that died: added in, so that the relay's totals never go
        # backwards when one is replaced (Prometheus would read that as a restart).
        self._retired: list[Metric] = []

    async def start(self) -> None:
        """Returns once every acceptor takes connections."""
        self._keepers = [asyncio.create_task(self._keep(slot)) for slot in self.slots]
        waiting = [asyncio.create_task(slot.ready.wait()) for slot in self.slots]
        _, pending = await asyncio.wait(waiting, timeout=READY_TIMEOUT)
        for task in pending:
            task.cancel()
        if pending:
            raise RuntimeError(f"{len(pending)} of {len(self.slots)} SMTP workers did not start")

    def serving(self) -> bool:
        return all(slot.ready.is_set() for slot in self.slots)

    @property
    def pids(self) -> list[int]:
        return [slot.process.pid for slot in self.slots if slot.process is not None]

    async def _keep(self, slot: _Slot) -> None:
        while not self._stopping:
            code = await self._run(slot)
            if self._stopping:
                return
            log.error(
                "SMTP worker %d exited (%s); starting another in %gs",
                slot.number,
                _exit_status(code),
                RESTART_DELAY,
            )
            await asyncio.sleep(RESTART_DELAY)

    async def _run(self, slot: _Slot) -> int:
        """Runs one acceptor process in `slot` until it exits; its exit status."""
        ours, theirs = socket.socketpair()
        fds = [theirs.fileno(), *(sock.fileno() for sock in self.listeners)]
        command = [sys.executable, "-m", "relay.workers", "--number", str(slot.number)]
        command += ["--log-format", logs.current_format(), *(str(fd) for fd in fds)]
        try:
            slot.process = await asyncio.create_subprocess_exec(
                *command, pass_fds=fds, stdin=asyncio.subprocess.DEVNULL
            )
        except OSError:
            ours.close()
            log.exception("SMTP worker %d not started", slot.number)
            return 1
        finally:
            theirs.close()
        process = slot.process

        def ready(pid: int) -> None:
            log.info("SMTP worker %d (pid %d) serving", slot.number, pid)
            slot.ready.set()

        def config() -> Config:
            return self.get_config()

        def connect(client_ip: str) -> Refusal | None:
            return self.counts.connect(slot.number, client_ip)

        def disconnect(client_ip: str) -> None:
            self.counts.disconnect(slot.number, client_ip)

        handlers: dict[str, Handler] = {
            **self.handlers,
            "ready": ready,
            "config": config,
            "connect": connect,
            "disconnect": disconnect,
            "message": self.counts.message,
        }
        slot.channel = await _connect(ours, handlers)
        await slot.channel.gone
        slot.ready.clear()
        slot.channel = None
        self.counts.forget(slot.number)
        self._retire(slot)
        return await process.wait()

    def _retire(self, slot: _Slot) -> None:
        kept = [family for family in slot.families if family.type in ("counter", "histogram")]
        self._retired = merge([self._retired, kept])
        slot.families = []

    async def configure(self, config: Config) -> None:
        """SIGHUP: every acceptor takes the configuration the owner now runs."""
        for slot in self.slots:
            if slot.channel is not None:
                with contextlib.suppress(ChannelClosed):
                    await slot.channel.ask("configure", config)

    async def families(self) -> list[list[Metric]]:
        """Every acceptor's metric families, and those of the ones that died."""
        for slot in self.slots:
            if slot.channel is None or not slot.ready.is_set():
                continue
            with contextlib.suppress(ChannelClosed, TimeoutError):
                slot.families = await asyncio.wait_for(slot.channel.ask("metrics"), METRICS_TIMEOUT)
        return [slot.families for slot in self.slots] + [self._retired]

    async def stop(self, grace: float) -> None:
        """SIGTERM to every acceptor: each stops taking connections and gives its sessions
        `grace` seconds to finish (their messages still reach the queue, which closes only
        after this), then exits."""
        self._stopping = True
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signal.SIGTERM)
        if not self._keepers:
            return
        _, pending = await asyncio.wait(self._keepers, timeout=grace + 5)
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.kill()
        if pending:
            await asyncio.wait(pending, timeout=5)


def _exit_status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket for `smtp.listen`, made by the owner so that every acceptor inherits
    the same one: an acceptor that dies takes no queued connection with it, and port 0 means
    one port for all of them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    sock.setblocking(False)
    return sock


BACKLOG = 100  # as asyncio's own listeners


def merge(sources: Iterable[Iterable[Metric]]) -> list[Metric]:
    """Metric families of several processes as one: each sample summed over them, keyed by
    family (name and type: relay_smtp_connections is a gauge and a counter) and labels."""
    merged: dict[tuple[str, str], Metric] = {}
    values: dict[tuple[str, str], dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for families in sources:
        for family in families:
            key = (family.name, family.type)
            if key not in merged:
                merged[key] = Metric(family.name, family.documentation, family.type, family.unit)
                values[key] = {}
            combine = max if family.name in _HIGHEST else operator.add
            held = values[key]
            for sample in family.samples:
                series = (sample.name, tuple(sorted(sample.labels.items())))
                before = held.get(series)
                held[series] = sample.value if before is None else combine(before, sample.value)
    for key, metric in merged.items():
        for (name, labels), value in values[key].items():
            metric.add_sample(name, dict(labels), value)
    return list(merged.values())


@dataclass
class Families:
    """A fixed set of families in the shape prometheus_client's exposition reads."""

    families: list[Metric]

    def collect(self) -> list[Metric]:
        return self.families


# -- the acceptor's side ---------------------------------------------------------------------


@dataclass
class OwnerStore:
    """The queue, as an acceptor reaches it: the owner commits, and answers once durable."""

    channel: Channel
    limits: Limits

    async def put(self, message: NewMessage) -> None:
        try:
            await self.channel.ask("put", message)
        except ChannelClosed as exc:
            raise StorageError("the process that owns the queue is gone") from exc
        finally:
            self.limits.forget_free_space()  # the disk changed: look again at the next MAIL


@dataclass
class OwnerPolicy:
    """Recipient checks, answered by the owner's RecipientPolicy with what it knows."""

    channel: Channel

    async def rcpt(
        self, session: InboundSession, settings: DomainConfig, address: str
    ) -> Refusal | None:
        if takes_every_address(settings):
            return None
        ask = ("rcpt", settings.name, address, session.unknown_recipients)
        try:
            refusal, session.unknown_recipients = await self.channel.ask(*ask)
        except ChannelClosed:
            # The owner is gone (restarting, or killed): nothing could be stored anyway.
            return Refusal(OWNER_GONE, "storage_error")
        assert refusal is None or isinstance(refusal, Refusal)
        return refusal


@dataclass
class OwnerCounts:
    """The shared client limits, as a worker asks them of the relay process."""

    channel: Channel

    async def connect(self, client_ip: str) -> Refusal | None:
        try:
            return await self._ask("connect", client_ip)
        except ChannelClosed:
            return Refusal(OWNER_GONE_AT_CONNECT, "storage_error")

    def disconnect(self, client_ip: str) -> None:
        self.channel.tell("disconnect", client_ip)

    async def message(self, client_ip: str) -> Refusal | None:
        try:
            return await self._ask("message", client_ip)
        except ChannelClosed:
            return Refusal(OWNER_GONE, "storage_error")

    async def _ask(self, verb: str, client_ip: str) -> Refusal | None:
        refusal = await self.channel.ask(verb, client_ip)
        assert refusal is None or isinstance(refusal, Refusal)
        return refusal


@dataclass
class StandIn:
    """What the owner's RecipientPolicy keeps on a session that lives in an acceptor."""

    unknown_recipients: int


class Acceptor:
    """One acceptor process: SMTP sessions on the inherited listeners, messages to the owner."""

    def __init__(self, channel_sock: socket.socket, listeners: list[socket.socket]) -> None:
        self.channel_sock = channel_sock
        self.listeners = listeners
        self.config: Config | None = None
        self._router: Router | None = None
        self._sealer: Sealer | None = None
        self._tls: ssl.SSLContext | None = None
        self.limits = Limits(self.current)

    def current(self) -> Config:
        assert self.config is not None
        return self.config

    def _configure(self, config: Config) -> None:
        self.config = replace(config, smtp=share(config.smtp))
        self._router = Router(
            hostname=config.hostname,
            listen=[address_of(sock) for sock in self.listeners],
            nameservers=config.dns.nameservers,
            mx_port=config.delivery.mx_port,
        )
        self._sealer = load_sealer(config, self._sealer)
        try:
            self._tls = tls.server_context(config)
        except (OSError, ssl.SSLError) as exc:
            if self._tls is None and config.tls.enabled:
                raise
            log.error("TLS certificate not loaded, keeping the old one: %s", exc)

    def router(self) -> Router:
        assert self._router is not None
        return self._router

    def _metrics(self) -> list[Metric]:
        return list(metrics.REGISTRY.collect())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        channel = await _connect(
            self.channel_sock, {"metrics": self._metrics, "configure": self._configure}
        )
        self._configure(await channel.ask("config"))
        handler = IntakeHandler(
            get_config=self.current,
            store=OwnerStore(channel, self.limits),
            limits=self.limits,
            shared=OwnerCounts(channel),
            policy=OwnerPolicy(channel),
            dns_lists=DnsLists(self.router),
            authenticator=Authenticator(self.router),
            sealer=lambda: self._sealer,
        )

        async def flush(name: str) -> int:
            count = await channel.ask("flush", name)
            assert isinstance(count, int)
            return count

        handler.flush_domain = flush

        def protocol() -> RelaySMTP:
            return smtp_protocol(handler, self.current(), self._tls)

        servers = [await loop.create_server(protocol, sock=sock) for sock in self.listeners]
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        # The owner sends the configuration on its own SIGHUP; a hangup of the terminal's
        # process group must not end an acceptor.
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        channel.gone.add_done_callback(lambda _: stop.set())
        await channel.ask("ready", os.getpid())
        await stop.wait()
        for server in servers:
            server.close()
        # Sessions in DATA may still commit through a live owner; with the owner gone, nothing
        # can be stored, and the clients' retries go to the owner's next acceptors.
        grace = 0.0 if channel.closed else 10.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(handler.idle.wait(), grace)


def address_of(sock: socket.socket) -> tuple[str, int]:
    """(address, port) a listening socket is bound to: what the router must know is us."""
    name = sock.getsockname()
    return str(name[0]), int(name[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m relay.workers",
        description="One SMTP acceptor of a relay with smtp.workers > 1; its owner starts it.",
    )
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("channel", type=int, help="the socket pair's end, a descriptor")
    parser.add_argument("listeners", type=int, nargs="+", help="listening sockets, descriptors")
    args = parser.parse_args(argv)
    logs.setup_logging(args.log_format)
    listeners = [socket.socket(fileno=fd) for fd in args.listeners]
    acceptor = Acceptor(socket.socket(fileno=args.channel), listeners)
    try:
        uvloop.run(acceptor.run())
    finally:
        logging.shutdown()


if __name__ == "__main__":
    main()
