"""Wiring and lifecycle: the only place that builds the relay's objects and runs the loop.

Start order matters for "never lose accepted mail": the queue is opened (and migrated) before any
socket listens, and on shutdown the listeners close first, in-flight sessions get a grace period,
and the queue's writer thread is drained last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvloop
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay import config as config_module
from relay import tls
from relay.config import Config
from relay.delivery.health import DestinationHealth
from relay.delivery.mx import Router
from relay.delivery.scheduler import Scheduler
from relay.envelope import hostport
from relay.ops import audit, metrics
from relay.ops.rescue import Rescuer
from relay.ops.status import render_page, status_report
from relay.smtp.arc import Sealer, load_sealer
from relay.smtp.auth import Authenticator
from relay.smtp.dnsbl import DnsLists
from relay.smtp.intake import IntakeHandler, RelaySMTP, Replies, smtp_protocol
from relay.smtp.limits import Limits, Refusal
from relay.smtp.policy import RecipientPolicy
from relay.store import AsyncStore, DomainControl, NewMessage, StorageError, Store
from relay.workers import Acceptors, Families, StandIn, address_of, bind, merge

log = logging.getLogger("relay")
T = TypeVar("T")


@dataclass
class MetricsServer:
    """`/metrics` and `/healthz` over a minimal HTTP/1.0 responder on the event loop.

    Queue gauges read SQLite; that read runs in a worker thread with its own connection so a
    scrape never stalls SMTP sessions.
    """

    store_path: str
    # Why the relay cannot be trusted with mail right now; /healthz is 200 only when empty.
    problems: Callable[[], list[str]]
    # The /status page (relay.status), built from the queue in a worker thread.
    status_page: Callable[[Store], bytes] | None = None
    # What this listener serves: all of it on metrics.listen, /status alone on status.listen.
    paths: frozenset[str] = frozenset(("/metrics", "/healthz", "/status"))
    # The /metrics body; by default this process's registry (with smtp.workers, every process's).
    exposition: Callable[[], Awaitable[bytes]] | None = None
    _reader: Store | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> metrics.QueueSnapshot:
        return self._read(Store.snapshot)

    def _read(self, work: Callable[[Store], T]) -> T:
        with self._lock:
            if self._reader is None:
                self._reader = Store(self.store_path)
            return work(self._reader)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)).strip():
                pass
            parts = request.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) > 1 else "/"
            if path not in self.paths:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            elif path == "/status" and self.status_page is not None:
                page = self.status_page
                body = await asyncio.to_thread(self._read, page)
                status, ctype = "200 OK", "text/html; charset=utf-8"
            elif path == "/metrics":
                if self.exposition is not None:
                    body = await self.exposition()
                else:
                    body = await asyncio.to_thread(generate_latest, metrics.REGISTRY)
                status, ctype = "200 OK", CONTENT_TYPE_LATEST
            elif path == "/healthz":
                problems = self.problems()
                status = "503 Service Unavailable" if problems else "200 OK"
                text = "".join(f"{problem}\n" for problem in problems) or "ok\n"
                body, ctype = text.encode(), "text/plain; charset=utf-8"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        except Exception:
            # A damaged queue must not turn a scrape into a dropped connection: say 500.
            log.exception("metrics request failed")
            with contextlib.suppress(ConnectionError):
                writer.write(b"HTTP/1.0 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        finally:
            writer.close()

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None


class Relay:
    """The running server: listeners, queue, metrics endpoint, and (later) delivery."""

    def __init__(self, cfg: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = cfg
        self.clock = clock
        self.store = AsyncStore(
            cfg.queue.path, clock, on_write_error=metrics.queue_write_errors.inc
        )
        self.limits = Limits(lambda: self.config)
        self.store.on_commit = self.limits.forget_free_space
        self.health = DestinationHealth(lambda: self.config, self.store, clock=clock)
        self.policy = RecipientPolicy(
            lambda: self.config, store=self.store, health=self.health, clock=clock
        )
        self.rescuer = Rescuer(
            lambda: self.config, self.store, self.health, self.policy, clock=clock
        )
        self._sealer: Sealer | None = load_sealer(cfg, None)
        self.handler = IntakeHandler(
            get_config=lambda: self.config,
            store=self.store,
            clock=clock,
            on_accepted=self._accepted,
            limits=self.limits,
            policy=self.policy,
            dns_lists=DnsLists(lambda: self.health.router or self._router()),
            authenticator=Authenticator(lambda: self.health.router or self._router()),
            sealer=lambda: self._sealer,
        )
        self.metrics_server = MetricsServer(
            cfg.queue.path,
            problems=self._problems,
            status_page=self._status_page,
            exposition=self._exposition if cfg.smtp.workers > 1 else None,
        )
        # status.listen: the page alone, for anyone (status.public), on a connection of its own.
        self.status_server = MetricsServer(
            cfg.queue.path,
            problems=list,
            status_page=self._status_page,
            paths=frozenset(("/status",)),
        )
        self._collector = metrics.QueueCollector(
            self.metrics_server.snapshot, self.health.down_names
        )
        self.smtp_servers: list[asyncio.Server] = []
        # With smtp.workers > 1: the listening sockets, served by the acceptor processes.
        self.listeners: list[socket.socket] = []
        self.acceptors: Acceptors | None = None
        self.http_server: asyncio.Server | None = None
        self.status_http_server: asyncio.Server | None = None
        self.stopped = asyncio.Event()
        self._tls = tls.server_context(cfg)
        self.scheduler: Scheduler | None = None
        self._delivery_task: asyncio.Task[None] | None = None
        self._reloading: asyncio.Future[None] | None = None
        self._operators_task: asyncio.Task[None] | None = None

    def _problems(self) -> list[str]:
        if self.acceptors is not None:
            serving = self.acceptors.serving()
        else:
            serving = bool(self.smtp_servers) and all(s.is_serving() for s in self.smtp_servers)
        found = [] if serving else ["not serving SMTP"]
        found += self.store.problems()
        blocked = self.scheduler.blocked if self.scheduler is not None else None
        return found + ([blocked] if blocked else [])

    def _export_settings(self) -> None:
        """The settings alert rules need: how old mail gets, and whether expiry bounces it."""
        metrics.queue_lifetime.set(self.config.queue.lifetime)
        metrics.queue_bounces_on_expiry.set(int(self.config.queue.on_expiry == "bounce"))

    def _accepted(self, message: NewMessage) -> None:
        if self.scheduler is not None:
            self.scheduler.accepted({r.domain for r in message.recipients})

    def _protocol(self) -> RelaySMTP:
        return smtp_protocol(self.handler, self.config, self._tls)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        metrics.REGISTRY.register(self._collector)
        self._export_settings()
        await self.health.restore()
        await self.policy.start()
        # Read before delivery starts: after a restart, a paused domain must not get one attempt.
        controls = await self.store.run(Store.domain_controls)
        workers = self.config.smtp.workers
        for host, port in self.config.smtp.listen:
            if workers > 1:
                self.listeners.append(bind(host, port))
                log.info("listening for SMTP on %s", _name(self.listeners[-1]))
                continue
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            server = await loop.create_server(
                self._protocol, host=host, port=port, family=family, reuse_address=True
            )
            self.smtp_servers.append(server)
            log.info("listening for SMTP on %s", _sockname(server))
        self._start_delivery()
        self._apply_controls(controls)
        if workers > 1:
            self.acceptors = Acceptors(
                workers, self.listeners, self._acceptor_requests(), lambda: self.config
            )
            await self.acceptors.start()
        self.rescuer.start()
        self._operators_task = asyncio.create_task(self._follow_operators())
        if self.config.metrics.listen is not None:
            host, port = self.config.metrics.listen
            self.http_server = await asyncio.start_server(
                self.metrics_server.handle, host=host, port=port
            )
            log.info("metrics on http://%s/metrics", _sockname(self.http_server))
        if self.config.status.listen is not None:
            host, port = self.config.status.listen
            self.status_http_server = await asyncio.start_server(
                self.status_server.handle, host=host, port=port
            )
            log.info("status page on http://%s/status", _sockname(self.status_http_server))
        log.info(
            "relay started: hostname=%s domains=%s queue=%s",
            self.config.hostname,
            ",".join(d.name for d in self.config.domains),
            self.config.queue.path,
        )

    def _acceptor_requests(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        """What the SMTP worker processes ask of this one (relay.workers)."""

        async def put(message: NewMessage) -> None:
            await self.store.put(message)
            self._accepted(message)

        async def rcpt(domain: str, address: str, unknown: int) -> tuple[Refusal | None, int]:
            settings = self.config.domain(domain)
            if settings is None:  # a reload took the domain away while the worker asked
                return Refusal(Replies.RELAY_DENIED.format(address=address), "relay_denied"), 0
            session = StandIn(unknown)
            refusal = await self.policy.rcpt(session, settings, address)
            return refusal, session.unknown_recipients

        async def flush(domain: str) -> int:
            return 0 if self.scheduler is None else await self.scheduler.flush_domain(domain)

        return {"put": put, "rcpt": rcpt, "flush": flush}

    async def _exposition(self) -> bytes:
        """/metrics with SMTP workers: this process's series and theirs, summed."""
        assert self.acceptors is not None
        theirs = await self.acceptors.families()

        def render() -> bytes:
            ours = list(metrics.REGISTRY.collect())
            return generate_latest(Families(merge([ours, *theirs])))

        return await asyncio.to_thread(render)

    def _start_delivery(self) -> None:
        """Starts after the listeners, so the router knows every (address, port) that is us."""
        router = self._router()
        self.scheduler = Scheduler(
            store=self.store,
            get_config=lambda: self.config,
            router=router,
            clock=self.clock,
            learn=self.policy.learn,
            health=self.health,
        )
        self.handler.flush_domain = self.scheduler.flush_domain
        self.health.start(router)
        self._delivery_task = asyncio.create_task(self.scheduler.run())

    async def _follow_operators(self, interval: float = 1.0) -> None:
        """Notices what the CLI changed in the queue database: logs its audit trail and takes up
        imported or forgotten recipients.

        PRAGMA data_version changes only when another connection commits: one cheap read a
        second, and the audit table is read only after an operator did something.
        """
        seen: int | None = None
        ticks = 0
        while True:
            try:
                version = await self.store.run(Store.data_version)
                changed = version != seen
                if changed:
                    seen = version
                    done = await audit.log_new_entries(self.store)
                    # Only `relay recipients import`/`forget` change the remembered answers:
                    # a hold or a flush must not cost a reload of every one of them.
                    if any(entry.action in audit.RECIPIENT_ACTIONS for entry in done):
                        await self.policy.reread()
                    if any(audit.steers_a_domain(entry) for entry in done):
                        await self._read_controls()
                # Deliveries free pages too: the file is looked at once a minute as well.
                shrunk = await self.store.maintain() if changed or ticks % 60 == 0 else None
                if shrunk is not None:
                    log.info("space returned: %s", shrunk)
            except StorageError as exc:
                log.warning("operator changes not read: %s", exc)
            ticks += 1
            await asyncio.sleep(interval)

    async def _read_controls(self) -> None:
        self._apply_controls(await self.store.run(Store.domain_controls))

    def _apply_controls(self, controls: dict[str, DomainControl]) -> None:
        """Hands the scheduler and the rescuer what operators decided per domain (relay domain,
        relay rescue on/off)."""
        if self.scheduler is not None:
            self.scheduler.set_controls(controls)
        self.rescuer.controls = controls
        metrics.set_domain_states({n: c.state for n, c in controls.items() if c.state != "normal"})

    def _status_page(self, store: Store) -> bytes:
        """The /status page, from the queue database as the running server keeps it."""
        now = self.clock()
        return render_page(status_report(self.config, store, now), self.config.hostname, now)

    def _router(self) -> Router:
        cfg = self.config
        return Router(
            hostname=cfg.hostname,
            listen=self.smtp_addresses,
            nameservers=cfg.dns.nameservers,
            mx_port=cfg.delivery.mx_port,
        )

    @property
    def smtp_addresses(self) -> list[tuple[str, int]]:
        sockets = [sock for server in self.smtp_servers for sock in server.sockets]
        return [address_of(sock) for sock in [*sockets, *self.listeners]]

    def reload(self, path: str) -> None:
        """SIGHUP: re-read the config; keep the old one (and say why) if the new one is bad."""
        try:
            new = config_module.load(path)
        except config_module.ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: %s", problem)
            return
        changed = config_module.changed_keys(self.config, new)
        pending = [key for key in changed if key in config_module.NEEDS_RESTART]
        if pending:
            log.warning("reload: %s changed: restart relay to apply", ", ".join(pending))
            new = config_module.keep_running(self.config, new, pending)
        self.config = new
        self._export_settings()
        self.policy.reload()
        if self.scheduler is not None:
            # Our host name, name servers and MX port shape routing: the router follows.
            router = self._router()
            self.scheduler.router = router
            self.scheduler.forget_routes()
            self.health.router = router
        self._sealer = load_sealer(new, self._sealer)
        if self.acceptors is not None:
            self._reloading = asyncio.ensure_future(self.acceptors.configure(new))
        try:
            self._tls = tls.server_context(new)
        except (OSError, ssl.SSLError) as exc:
            log.error("reload: TLS certificate not loaded, keeping the old one: %s", exc)
        log.info("configuration reloaded from %s", path)

    async def stop(self, grace: float = 10.0) -> None:
        for server in self.smtp_servers:
            server.close()
        if self.acceptors is not None:
            # Before the queue closes: the workers' last sessions still commit through us.
            await self.acceptors.stop(grace)
        for sock in self.listeners:
            sock.close()
        for http in (self.http_server, self.status_http_server):
            if http is not None:
                http.close()
        # Sessions in DATA finish their commit; what is still open after the grace period is
        # cut, and its unacknowledged message is the client's to retry.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.handler.idle.wait(), grace)
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self._delivery_task is not None:
            await asyncio.gather(self._delivery_task, return_exceptions=True)
        if self._operators_task is not None:
            self._operators_task.cancel()
            await asyncio.gather(self._operators_task, return_exceptions=True)
        await self.rescuer.stop()
        await self.policy.stop()
        await self.health.stop()
        with contextlib.suppress(KeyError):
            metrics.REGISTRY.unregister(self._collector)
        await asyncio.to_thread(self.store.close)
        self.metrics_server.close()
        self.status_server.close()
        self.stopped.set()
        log.info("relay stopped")


def _name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return hostport(host, port)


def _sockname(server: asyncio.Server) -> str:
    return ", ".join(_name(sock) for sock in server.sockets)


def run(main: Coroutine[Any, Any, None]) -> None:
    """Runs the server on uvloop, libuv's event loop for asyncio.

    Every SMTP session is a dozen socket reads and writes on one core; uvloop does that part
    of the work in C, which is about an eighth of the CPU an accepted message costs. The test
    suite runs on the same loop (tests/conftest.py).
    """
    uvloop.run(main)


async def serve(cfg: Config, config_path: str) -> None:
    """Runs until SIGTERM/SIGINT; SIGHUP reloads the configuration."""
    relay = Relay(cfg)
    try:
        await relay.start()
    except BaseException:
        # E.g. the port is taken: close what did start (the queue above all) before leaving.
        await relay.stop(grace=0)
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, relay.reload, config_path)
    await stop.wait()
    log.info("shutting down")
    await relay.stop()
