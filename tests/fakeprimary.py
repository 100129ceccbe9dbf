"""A programmable fake primary MTA: aiosmtpd on 127.0.0.x, replies set by the test, all recorded.

Behaviour is read from the `FakePrimary` fields at every command, so a test may change replies
between two messages of one session. What it received is kept in `transactions` (envelope with
parameters in their original case, and the body exactly as received after dot-unstuffing),
`commands` (every command line) and `connections` (TCP connections accepted).

aiosmtpd rejects MAIL/RCPT parameters it does not know (RFC 3461's NOTIFY, ORCPT, RET, ENVID) and
upper-cases the rest, so `_FakeSMTP` parses MAIL and RCPT itself; DATA, EHLO, RSET, QUIT and
STARTTLS stay aiosmtpd's, so the DATA parsing tested against is a real server's.

Use the `fake_primary` fixture (a factory) or start/stop a `FakePrimary` yourself:

    fake = await fake_primary(replies={"bob@example.org": "550 5.1.1 no such user"})
    session = await OutboundSession.open(fake.hop(), helo="relay.test")
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest_asyncio
import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.delivery.mx import Hop

STALL_POINTS = ("greeting", "EHLO", "STARTTLS", "MAIL", "RCPT", "DATA", "dot", "RSET")
DISCONNECT_POINTS = ("data", "dot")
_MAIL_PARAMS = {"SIZE", "BODY", "SMTPUTF8"}
_DSN_MAIL_PARAMS = {"RET", "ENVID"}
_DSN_RCPT_PARAMS = {"NOTIFY", "ORCPT"}


@dataclass
class Transaction:
    """One MAIL FROM the fake accepted, the RCPTs it received after it, and the body if any."""

    mail_from: str
    mail_options: list[str]
    rcpts: list[tuple[str, list[str]]] = field(default_factory=list)
    data: bytes | None = None


@dataclass
class FakePrimary:
    address: str = "127.0.0.2"
    hostname: str = "primary.test"
    # -- behaviour; None means "the normal thing" -------------------------------------------
    greeting: str | None = None  # sent instead of the 220 banner, then hang up ("421 4.3.2 ...")
    ehlo_reply: str | None = None  # the whole EHLO reply ("502 5.5.1 ..."); HELO still works
    mail_reply: str | None = None  # reply to every MAIL FROM
    replies: dict[str, str] = field(default_factory=dict)  # RCPT address → reply
    data_reply: str | None = None  # reply to the final dot
    smtputf8: bool = True
    eightbitmime: bool = True
    size_limit: int | None = None  # advertised as SIZE and enforced at MAIL
    dsn: bool = True
    pipelining: bool = True
    starttls: bool = False  # offer STARTTLS with a certificate for `hostname` from `ca`
    starttls_broken: bool = False  # offer STARTTLS, say 220, then speak garbage instead of TLS
    disconnect: str | None = None  # "data": hang up mid-body; "dot": after the dot, no reply
    stall: str | None = None  # one of STALL_POINTS: never answer there
    ca: trustme.CA | None = None
    # -- records -----------------------------------------------------------------------------
    transactions: list[Transaction] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    # For each command: whether the client had already sent more when it was read (pipelining).
    sent_ahead: list[bool] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)  # exceptions in the server's handling
    connections: int = 0
    port: int = 0

    def __post_init__(self) -> None:
        if self.stall is not None and self.stall not in STALL_POINTS:
            raise ValueError(f"stall must be one of {STALL_POINTS}")
        if self.disconnect is not None and self.disconnect not in DISCONNECT_POINTS:
            raise ValueError(f"disconnect must be one of {DISCONNECT_POINTS}")
        self._server: asyncio.Server | None = None
        self._protocols: list[_FakeSMTP] = []
        self.tls_context: ssl.SSLContext | None = None

    async def start(self) -> FakePrimary:
        if self.starttls or self.starttls_broken:
            if self.ca is None:
                self.ca = trustme.CA()
            self.tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ca.issue_cert(self.hostname).configure_cert(self.tls_context)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, self.address, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = []
        for protocol in self._protocols:
            if protocol.transport is not None:
                protocol.transport.close()
            if protocol._handler_coroutine is not None:
                tasks.append(protocol._handler_coroutine)
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    def hop(self, host: str | None = None) -> Hop:
        """This server as a next hop, named `host` (default: the certificate's `hostname`)."""
        return Hop(host or self.hostname, self.address, self.port, preference=0)

    def write_ca(self, path: Path) -> str:
        """The CA that signed the STARTTLS certificate, as a PEM file for `cafile`."""
        assert self.ca is not None, "start with starttls=True first"
        self.ca.cert_pem.write_to_path(str(path))
        return str(path)

    @property
    def delivered(self) -> list[Transaction]:
        """Transactions that got as far as a complete body."""
        return [t for t in self.transactions if t.data is not None]

    def _accept(self) -> _FakeSMTP:
        self.connections += 1
        protocol = _FakeSMTP(self)
        self._protocols.append(protocol)
        return protocol


async def _forever() -> None:
    """Never answer; ends when the connection is lost (aiosmtpd cancels the handler)."""
    await asyncio.get_running_loop().create_future()


class _Handler:
    def __init__(self, fake: FakePrimary) -> None:
        self.fake = fake

    async def handle_EHLO(
        self,
        server: _FakeSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        fake = self.fake
        if fake.ehlo_reply is not None:
            return [fake.ehlo_reply]
        session.host_name = hostname  # aiosmtpd leaves this to a 5-argument EHLO hook
        keywords = [line[4:] for line in responses[1:]]
        keywords = [k for k in keywords if k != "HELP" and not k.startswith("AUTH")]
        if not fake.eightbitmime:
            keywords.remove("8BITMIME")
        if fake.pipelining:
            keywords.append("PIPELINING")
        if fake.dsn:
            keywords.append("DSN")
        keywords.append("ENHANCEDSTATUSCODES")
        lines = [responses[0]] + [f"250-{k}" for k in keywords]
        lines[-1] = "250 " + lines[-1][4:]
        return lines

    async def handle_exception(self, error: Exception) -> str:
        # Expected when a client gives up mid-handshake (TLS verification failed): keep it
        # for the test to look at instead of aiosmtpd's logged traceback.
        self.fake.errors.append(error)
        return "421 4.3.0 fake primary: internal error"

    async def handle_DATA(self, server: _FakeSMTP, session: Session, envelope: Envelope) -> str:
        fake = self.fake
        if fake.stall == "dot":
            await _forever()
        if fake.disconnect == "dot":
            assert server.transport is not None
            server.transport.close()
            await _forever()
        if server.current is not None:
            server.current.data = envelope.original_content
        return fake.data_reply or "250 2.0.0 Ok: queued"


class _FakeSMTP(SMTP):
    def __init__(self, fake: FakePrimary) -> None:
        self.fake = fake
        self.current: Transaction | None = None
        super().__init__(
            _Handler(fake),
            hostname=fake.hostname,
            data_size_limit=fake.size_limit,
            enable_SMTPUTF8=fake.smtputf8,
            decode_data=False,
            tls_context=fake.tls_context,
            loop=asyncio.get_running_loop(),
        )
        self._smtp_methods = {
            verb: self._recorded(verb, method) for verb, method in self._smtp_methods.items()
        }

    def _recorded(
        self, verb: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        async def run(arg: str | None) -> None:
            self.fake.commands.append(f"{verb} {arg}" if arg else verb)
            self.fake.sent_ahead.append(bool(self._reader._buffer))  # type: ignore[attr-defined]
            if self.fake.stall == verb:
                await _forever()
            await method(arg)

        return run

    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()  # type: ignore[no-untyped-call]
        self.current = None

    async def _handle_client(self) -> None:
        if self.fake.greeting is not None:
            await self.push(self.fake.greeting)
            assert self.transport is not None
            self.transport.close()
            return
        if self.fake.stall == "greeting":
            await _forever()
        await super()._handle_client()

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if not self.fake.starttls_broken:
            await super().smtp_STARTTLS(arg)
            return
        await self.push("220 2.0.0 Ready to start TLS")
        self._writer.write(b"this is not a TLS server hello\r\n" * 8)
        assert self.transport is not None
        self.transport.close()
        await _forever()

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if self.current is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        parsed = _parse_path(arg, "FROM:")
        if parsed is None:
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        address, options = parsed
        allowed = _MAIL_PARAMS | (_DSN_MAIL_PARAMS if self.fake.dsn else set())
        problem = self._option_problem(options, allowed)
        if problem is not None:
            await self.push(problem)
            return
        reply = self.fake.mail_reply or "250 2.1.0 Ok"
        if reply.startswith("2"):
            assert self.envelope is not None
            self.envelope.mail_from = address
            self.envelope.mail_options.extend(options)
            self.current = Transaction(address, options)
            self.fake.transactions.append(self.current)
        await self.push(reply)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if self.current is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        parsed = _parse_path(arg, "TO:")
        if parsed is None:
            await self.push("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        address, options = parsed
        allowed = _DSN_RCPT_PARAMS if self.fake.dsn else set()
        problem = self._option_problem(options, allowed)
        if problem is not None:
            await self.push(problem)
            return
        self.current.rcpts.append((address, options))
        reply = self.fake.replies.get(address, "250 2.1.5 Ok")
        if reply.startswith("2"):
            assert self.envelope is not None
            self.envelope.rcpt_tos.append(address)
        await self.push(reply)

    async def smtp_DATA(self, arg: str | None) -> None:
        if self.fake.disconnect != "data" or self.current is None:
            await super().smtp_DATA(arg)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._reader.readline()  # some of the body is in: now vanish
        assert self.transport is not None
        self.transport.close()
        await _forever()

    def _option_problem(self, options: list[str], allowed: set[str]) -> str | None:
        for option in options:
            name, _, value = option.partition("=")
            name = name.upper()
            if name not in allowed:
                return f"555 5.5.4 {name} parameter not recognized"
            if name == "SMTPUTF8" and not self.fake.smtputf8:
                return "555 5.5.4 SMTPUTF8 not offered"
            if name == "BODY" and not self.fake.eightbitmime:
                return "555 5.5.4 BODY not offered"
            limit = self.fake.size_limit
            if name == "SIZE" and limit is not None and int(value) > limit:
                return "552 5.3.4 Message size exceeds fixed maximum message size"
        return None


def _parse_path(arg: str | None, keyword: str) -> tuple[str, list[str]] | None:
    """("alice@example.org", ["NOTIFY=SUCCESS"]) from "TO:<alice@example.org> NOTIFY=SUCCESS"."""
    if arg is None or arg[: len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword) :].strip()
    if not rest.startswith("<") or ">" not in rest:
        return None
    end = rest.index(">")
    return rest[1:end], rest[end + 1 :].split()


def unused_port(address: str) -> int:
    """A port on `address` with nothing listening (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
    return port


@pytest_asyncio.fixture
async def fake_primary() -> AsyncIterator[Callable[..., Awaitable[FakePrimary]]]:
    """Factory: `await fake_primary(**FakePrimary fields)` → a started fake, stopped at teardown.

    All fakes of one test share one trustme CA, so one `cafile` trusts them all.
    """
    started: list[FakePrimary] = []
    ca: list[trustme.CA] = []

    async def start(**options: Any) -> FakePrimary:
        if options.get("starttls") or options.get("starttls_broken"):
            if not ca:
                ca.append(trustme.CA())
            options.setdefault("ca", ca[0])
        fake = FakePrimary(**options)
        started.append(fake)
        return await fake.start()

    yield start
    for fake in started:
        await fake.stop()
