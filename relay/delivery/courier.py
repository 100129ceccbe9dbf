"""One outbound SMTP session → a result per recipient; no retry decisions, no store.

The courier speaks RFC 5321 to one next hop and reports what the server said, recipient by
recipient, keeping every reply whole (code, enhanced code, text) so that bounces and `relay queue
show` need no translation. Deciding what a reply means for the queue (deliver, defer, bounce) is
the scheduler's job, not ours.

Failure that is not about one recipient (connection refused, timeout, TLS failure, a greeting or
EHLO rejected, a dropped connection, a garbled reply) raises `SessionError`. Its reply is the
server's own when there was one, otherwise a synthesized 421 with an RFC 3463 enhanced code, so
unknown always means temporary: a backup MX prefers retrying to bouncing.

aiosmtplib carries the connection, greeting, EHLO, STARTTLS and one-line commands. The DATA phase
is written here because aiosmtplib's `data()` rewrites bare CR and LF into CRLF, and a backup MX
must hand over the bytes it stored. aiosmtplib parses one reply per read and cannot take
pipelined replies, so commands go one at a time even when PIPELINING is offered (RFC 2920 leaves
pipelining optional to the client). No aiosmtplib, `ssl` or socket exception leaves this module.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import aiosmtplib

from relay import tls
from relay.adapters import aiosmtplib as smtplib_adapter
from relay.envelope import address_problem, hostport
from relay.tls import TLS_MODES
from relay.words import one_line

if TYPE_CHECKING:  # for annotations only: the courier needs no DNS at run time
    from relay.delivery.mx import Hop

log = logging.getLogger("relay.courier")
T = TypeVar("T")


# A '.' is stuffed wherever any receiver could believe a line starts: after CRLF (RFC 5321 4.5.2),
# but also after a bare LF (Postfix, Exim and sendmail end lines there) and a bare CR (some
# gateways do). Bare CR and LF themselves are sent as stored: a backup MX hands over the bytes it
# accepted and does not repair them. The cost of stuffing after a bare CR/LF is one extra '.' at
# a strict CRLF-only receiver, only in mail that already breaks RFC 5321 2.3.8; the gain is that
# no stored body can ever put an end-of-data lookalike such as "<LF>.<CR><LF>" on the wire
# (SMTP smuggling).
_CHUNK = 64 * 1024
_PARAM_UNSAFE = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True)
class Reply:
    """One SMTP reply; `text` as received, enhanced status code included (RFC 3463)."""

    code: int
    text: str
    # Decided here, not said by the remote server: a DSN must not show it as "host … said".
    local: bool = field(default=False, compare=False)

    @property
    def permanent(self) -> bool:
        """RFC 5321 4.2.1: only 5yz is permanent; everything else may succeed later."""
        return 500 <= self.code <= 599

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.text else str(self.code)


@dataclass(frozen=True)
class OutgoingRecipient:
    address: str
    notify: str | None = None  # RFC 3461 NOTIFY value as received, e.g. "SUCCESS,FAILURE"
    orcpt: str | None = None  # RFC 3461 ORCPT value as received, e.g. "rfc822;alice@example.org"


@dataclass(frozen=True)
class Outgoing:
    """One stored message and the recipients to try in this session."""

    id: str
    sender: str  # "" is the null reverse-path
    recipients: tuple[OutgoingRecipient, ...]
    body: bytes  # exact bytes to send (already contains our Received header)
    smtputf8: bool = False  # MAIL FROM had SMTPUTF8
    eightbit: bool = False  # MAIL FROM had BODY=8BITMIME
    envid: str | None = None  # RFC 3461 ENVID
    ret: str | None = None  # RFC 3461 RET (FULL/HDRS)


class SessionError(Exception):
    """The session as a whole failed; `reply` says why and decides `permanent`.

    Raised for a refused or reset connection, a timeout, a TLS failure under require/verify, a
    greeting or EHLO rejected, a connection lost mid-transaction, a 421 at any point (RFC 5321
    3.8: the server is closing the channel), a garbled reply. When the server said nothing the
    reply is synthesized as 421, so unknown means temporary. A session that raised is closed and
    cannot send again.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply

    @property
    def permanent(self) -> bool:
        return self.reply.permanent


class OutboundSession:
    """One SMTP connection to one hop, carrying any number of messages one after the other."""

    def __init__(
        self,
        smtp: aiosmtplib.SMTP,
        hop: Hop,
        *,
        greeting: Reply,
        tls_active: bool,
        timeout: float,
    ) -> None:
        """Use `OutboundSession.open`; this only records an established, greeted connection."""
        self._smtp = smtp
        self._hop = hop
        self._where = _where(hop)
        self._timeout = timeout
        self._extensions = dict(smtp.esmtp_extensions)
        self._tls_active = tls_active
        self.greeting = greeting
        self._reset_pending = False  # a transaction began since the last RSET
        self._failure: Reply | None = None
        self._closed = False

    @classmethod
    async def open(
        cls,
        hop: Hop,
        *,
        helo: str,
        tls: str = "opportunistic",
        cafile: str | None = None,
        timeout: float = 60.0,  # noqa: ASYNC109 — per reply (RFC 5321 4.5.3.2), not a deadline
    ) -> OutboundSession:
        """Connects, reads the greeting, says EHLO as `helo` and applies the TLS policy.

        `tls`: "none" never sends STARTTLS; "opportunistic" uses it when offered, without
        checking the certificate, and if it fails reconnects once in plain text (RFC 7435:
        plain text beats not delivering); "require" insists on STARTTLS being offered and
        succeeding, unverified; "verify" also checks the chain (`cafile` or the system store) and
        that the certificate names `hop.host`. Every TLS failure is a temporary SessionError.
        `timeout` bounds the connect and every single reply.
        """
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {tls!r}")
        smtp, greeting = await _connect(hop, helo, timeout)
        tls_active = False
        if tls != "none":
            smtp, greeting, tls_active = await _secure(
                smtp, greeting, hop, helo=helo, mode=tls, cafile=cafile, per_reply=timeout
            )
        return cls(smtp, hop, greeting=greeting, tls_active=tls_active, timeout=timeout)

    async def __aenter__(self) -> OutboundSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def host(self) -> str:
        return self._hop.host

    @property
    def max_size(self) -> int | None:
        """The SIZE the server advertised (RFC 1870 4); None when it set no fixed limit."""
        value = self._extensions.get("size", "").strip()
        return int(value) if value.isdigit() and int(value) > 0 else None

    @property
    def supports_smtputf8(self) -> bool:
        return "smtputf8" in self._extensions

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    async def send(self, message: Outgoing) -> dict[str, Reply]:
        """One transaction: a reply for every recipient address of `message`.

        A recipient refused at RCPT keeps its RCPT reply; the accepted ones share the reply to
        the final dot, so none is ever reported 2xx unless the server said 2xx to the dot. A
        4xx/5xx to MAIL FROM is every recipient's reply. Limits the server announced are applied
        here without sending: a body over its SIZE (552 5.3.4) and an SMTPUTF8 message to a server
        without SMTPUTF8 (553 5.6.7, RFC 6531 3.5). A message marked 8BITMIME goes to a server
        that does not offer 8BITMIME as it is, by choice: RFC 6152 3 would have a relay convert
        it to 7 bit or bounce it, but converting breaks DKIM signatures and the byte-for-byte
        promise, and bouncing mail that the primary would in practice take helps nobody; a relay
        passes content on without inspecting it (RFC 5321 2.4). DSN parameters (RFC 3461) are
        passed exactly as stored when the server offers DSN, and dropped otherwise.

        Raises SessionError when the session breaks: every recipient of `message` is then
        undecided and should be deferred.
        """
        if self._failure is not None or self._closed:
            closed = Reply(421, f"4.4.2 session to {self._where} already closed")
            raise SessionError(self._failure or closed)
        if not message.recipients:
            return {}
        utf8 = _needs_smtputf8(message)
        refusal = _envelope_problem(message, utf8) or self._limits_problem(message, utf8)
        if refusal is not None:
            return {rcpt.address: refusal for rcpt in message.recipients}
        try:
            return await self._transaction(message, utf8)
        except SessionError as exc:
            self._break(exc.reply)
            raise

    async def close(self) -> None:
        """QUIT politely and drop the connection; never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._failure is None and self._smtp.is_connected:
                await self._smtp.quit(timeout=self._timeout)
        except Exception as exc:  # close runs in cleanup paths and must not mask their error
            # RFC 5321 4.1.1.10: QUIT is a courtesy; every transaction is already settled.
            log.debug("QUIT to %s failed: %s", self._where, exc)
        finally:
            self._smtp.close()

    # -- transaction -------------------------------------------------------------------------

    async def _transaction(self, message: Outgoing, utf8: bool) -> dict[str, Reply]:
        if self._reset_pending:
            await self._rset()
        self._reset_pending = True
        if "pipelining" in self._extensions:
            return await self._pipelined(message, utf8)
        encoding = "utf-8" if utf8 else "ascii"
        mail = await self._command("after MAIL FROM", *self._mail_command(message, encoding))
        if not _positive(mail):
            await self._abort()
            return {rcpt.address: mail for rcpt in message.recipients}

        replies: dict[str, Reply] = {}
        accepted: list[str] = []
        for rcpt in message.recipients:
            reply = _recipient_problem(rcpt, utf8) or await self._command(
                "after RCPT TO", *self._rcpt_command(rcpt, encoding)
            )
            replies[rcpt.address] = reply
            if _positive(reply):
                accepted.append(rcpt.address)
        if not accepted:
            await self._abort()  # no DATA without a recipient (RFC 5321 3.3)
            return replies

        final = await self._data(message.body)
        for address in accepted:
            replies[address] = final
        return replies

    async def _pipelined(self, message: Outgoing, utf8: bool) -> dict[str, Reply]:
        """MAIL, every RCPT and DATA in one flight (RFC 2920), then the replies in order: two
        round trips a message (this flight and the body) instead of one per command.

        Each RCPT reply is its recipient's, as without pipelining. A refused MAIL is every
        recipient's reply (the server then refuses the RCPTs and DATA too: 503). DATA's reply
        counts only when a recipient was accepted; with none, DATA is refused (RFC 2920 3.1)
        and is nobody's reply. A lost connection before the final dot leaves every recipient
        undecided (SessionError): nothing was delivered, so trying all again repeats nothing.
        """
        encoding = "utf-8" if utf8 else "ascii"
        local = {rcpt.address: _recipient_problem(rcpt, utf8) for rcpt in message.recipients}
        sent = [rcpt for rcpt in message.recipients if local[rcpt.address] is None]
        commands = [b" ".join(self._mail_command(message, encoding))]
        commands += [b" ".join(self._rcpt_command(rcpt, encoding)) for rcpt in sent]
        commands.append(b"DATA")
        protocol = self._smtp.protocol
        if protocol is None:
            raise SessionError(Reply(421, f"4.4.2 connection to {self._where} lost"))
        with _translated("after MAIL FROM", self._where):
            answers = await smtplib_adapter.pipeline(protocol, commands, self._timeout)
        stages = ["after MAIL FROM"] + ["after RCPT TO"] * len(sent)
        mail, *rcpt_replies = (
            self._checked(Reply(code, text), stage, 2)
            for (code, text), stage in zip(answers, stages, strict=False)
        )
        go_ahead = Reply(*answers[-1])
        if not _positive(mail):
            await self._end_refused_flight(go_ahead)
            return {rcpt.address: mail for rcpt in message.recipients}
        replies: dict[str, Reply] = {}
        accepted: list[str] = []
        by_address = {rcpt.address: reply for rcpt, reply in zip(sent, rcpt_replies, strict=True)}
        for rcpt in message.recipients:
            reply = local[rcpt.address] or by_address[rcpt.address]
            replies[rcpt.address] = reply
            if _positive(reply):
                accepted.append(rcpt.address)
        if not accepted:
            await self._end_refused_flight(go_ahead)
            return replies
        final = await self._body(message.body, self._checked(go_ahead, "after DATA", 3))
        for address in accepted:
            replies[address] = final
        return replies

    async def _end_refused_flight(self, go_ahead: Reply) -> None:
        """A flight whose DATA reached a server with no recipient accepted: RFC 2920 3.1 has it
        refuse DATA; one that said 354 anyway gets an empty message, never ours."""
        if go_ahead.code == 354:
            protocol = self._smtp.protocol
            if protocol is None:
                raise SessionError(Reply(421, f"4.4.2 connection to {self._where} lost"))
            with _translated("after an empty DATA", self._where):
                smtplib_adapter.expect_reply(protocol)
                protocol.write(b".\r\n")
                await protocol.read_response(timeout=self._timeout)
        await self._abort()

    def _limits_problem(self, message: Outgoing, utf8: bool) -> Reply | None:
        limit = self.max_size
        if limit is not None and len(message.body) > limit:
            return Reply(
                552,
                f"5.3.4 message size exceeds fixed limit of remote server {self._where} "
                f"({len(message.body)} > {limit} bytes)",
                local=True,
            )
        if utf8 and not self.supports_smtputf8:
            return Reply(
                553,
                f"5.6.7 remote server {self._where} does not support SMTPUTF8, "
                "required by this message (RFC 6531 3.5)",
                local=True,
            )
        return None

    def _mail_command(self, message: Outgoing, encoding: str) -> list[bytes]:
        """MAIL FROM and its parameters, word by word: sent alone or in a pipelined flight."""
        sender = b"FROM:<" + message.sender.encode(encoding) + b">"
        return [b"MAIL", sender, *self._mail_params(message)]

    def _rcpt_command(self, rcpt: OutgoingRecipient, encoding: str) -> list[bytes]:
        to = b"TO:<" + rcpt.address.encode(encoding) + b">"
        return [b"RCPT", to, *self._rcpt_params(rcpt, encoding)]

    def _mail_params(self, message: Outgoing) -> list[bytes]:
        params: list[str] = []
        if "size" in self._extensions:
            params.append(f"SIZE={_declared_size(message.body)}")
        if message.eightbit and "8bitmime" in self._extensions:
            params.append("BODY=8BITMIME")
        if _needs_smtputf8(message):
            params.append("SMTPUTF8")
        if "dsn" in self._extensions:
            if message.ret:
                params.append(f"RET={message.ret}")
            if message.envid:
                params.append(f"ENVID={message.envid}")
        return [param.encode("utf-8") for param in params]

    def _rcpt_params(self, rcpt: OutgoingRecipient, encoding: str) -> list[bytes]:
        if "dsn" not in self._extensions:
            return []
        params: list[str] = []
        if rcpt.notify:
            params.append(f"NOTIFY={rcpt.notify}")
        if rcpt.orcpt:
            params.append(f"ORCPT={rcpt.orcpt}")
        return [param.encode(encoding) for param in params]

    async def _data(self, body: bytes) -> Reply:
        return await self._body(body, await self._command("after DATA", b"DATA", expect=3))

    async def _body(self, body: bytes, go_ahead: Reply) -> Reply:
        """The message after DATA's reply: sent on 354; any other reply is the message's."""
        if go_ahead.code != 354:
            return go_ahead
        protocol = self._smtp.protocol
        if protocol is None:
            raise SessionError(Reply(421, f"4.4.2 connection to {self._where} lost after DATA"))
        # Written here, not with aiosmtplib's data(), which would turn bare CR/LF into CRLF.
        payload = _data_payload(body)
        smtplib_adapter.expect_reply(protocol)
        with _translated("sending the message body", self._where):
            for offset in range(0, len(payload), _CHUNK):
                protocol.write(payload[offset : offset + _CHUNK])
                # Flow control, so that `timeout` bounds each stall of the transfer rather than
                # the whole body (RFC 5321 4.5.3.2.5 times each data block, not the message).
                await smtplib_adapter.drain(protocol, self._timeout)
        with _translated("after end of data", self._where):
            response = await protocol.read_response(timeout=self._timeout)
        # The reply to the final dot ends the transaction, whatever its code (RFC 5321 4.1.1.4,
        # 3.3): the next MAIL may follow at once, without a round trip for RSET.
        self._reset_pending = False
        return self._checked(Reply(response.code, response.message), "after end of data", 2)

    async def _rset(self) -> None:
        reply = await self._command("after RSET", b"RSET")
        if not _positive(reply):
            # A server that cannot reset cannot be trusted with the next envelope. Temporary
            # whatever its code: it says nothing about the message.
            raise SessionError(
                Reply(421, f"4.5.0 RSET refused by {self._where}: {one_line(str(reply))}")
            )
        self._reset_pending = False

    async def _abort(self) -> None:
        """Ends a transaction that will not reach DATA; the replies we hold stay valid.

        If the RSET fails the session is marked broken (the next send() raises) rather than
        throwing away the per-recipient replies already received.
        """
        try:
            await self._rset()
        except SessionError as exc:
            self._break(exc.reply)

    async def _command(self, stage: str, *args: bytes, expect: int = 2) -> Reply:
        with _translated(stage, self._where):
            response = await self._smtp.execute_command(*args)
        return self._checked(Reply(response.code, response.message), stage, expect)

    def _checked(self, reply: Reply, stage: str, expect: int) -> Reply:
        """The reply if it is the expected kind or a 4xx/5xx; SessionError otherwise."""
        if reply.code == 421:
            raise SessionError(reply)  # RFC 5321 3.8: the server is closing the channel
        if reply.code // 100 in (expect, 4, 5):
            return reply
        text = f"4.5.0 unexpected reply {stage} from {self._where}: {one_line(str(reply))}"
        raise SessionError(Reply(421, text))

    def _break(self, reply: Reply) -> None:
        self._failure = reply
        self._smtp.close()

    # -- callout -----------------------------------------------------------------------------

    async def _callout(self, address: str) -> Reply:
        utf8 = not address.isascii()
        if (problem := address_problem(address)) is not None:
            return Reply(501, f"5.1.3 address cannot be sent: {problem}")
        if utf8 and not self.supports_smtputf8:
            return Reply(553, f"5.6.7 remote server {self._where} does not support SMTPUTF8")
        try:
            mail = await self._command(
                "after MAIL FROM", b"MAIL", b"FROM:<>", *([b"SMTPUTF8"] if utf8 else [])
            )
            if not _positive(mail):
                # The null sender refused says nothing about the address: no verdict, and no
                # verdict must never read as a permanent "no such user".
                text = f"4.3.0 {self._where} refused MAIL FROM:<>: {one_line(str(mail))}"
                raise SessionError(Reply(421, text))
            self._reset_pending = True
            rcpt = await self._command(
                "after RCPT TO", b"RCPT", b"TO:<" + address.encode("utf-8") + b">"
            )
            await self._rset()
        except SessionError as exc:
            self._break(exc.reply)
            raise
        return rcpt


async def probe(hop: Hop, *, helo: str, timeout: float = 10.0) -> Reply:  # noqa: ASYNC109
    """Is the hop answering? Connect, greeting, EHLO, QUIT; returns the greeting (220) reply.

    Raises SessionError when the hop does not take a session (refused, timeout, 4xx/5xx
    greeting or EHLO). No TLS: a probe carries no mail.
    """
    session = await OutboundSession.open(hop, helo=helo, tls="none", timeout=timeout)
    await session.close()
    return session.greeting


async def verify_recipient(
    hop: Hop,
    *,
    helo: str,
    address: str,
    timeout: float = 30.0,  # noqa: ASYNC109 — per reply, like OutboundSession.open's
) -> Reply:
    """Callout: would the hop take mail for `address`? Returns its RCPT reply (2xx/4xx/5xx).

    MAIL FROM:<> then RCPT TO, then RSET and QUIT; no DATA, so nothing is delivered. STARTTLS is
    used opportunistically because the address is worth not leaking. Raises SessionError when
    there is no verdict: the session failed, or the hop refused the null sender (which says
    nothing about the address, so that error is a temporary 421 quoting the refusal).
    """
    session = await OutboundSession.open(hop, helo=helo, tls="opportunistic", timeout=timeout)
    try:
        return await session._callout(address)
    finally:
        await session.close()


# -- connection and TLS ------------------------------------------------------------------------


async def _connect(hop: Hop, helo: str, per_reply: float) -> tuple[aiosmtplib.SMTP, Reply]:
    """A greeted connection: TCP connect, 220 greeting, EHLO (HELO for a pre-ESMTP server)."""
    where = _where(hop)
    smtp = aiosmtplib.SMTP(
        hostname=hop.address, port=hop.port, local_hostname=helo, timeout=per_reply, start_tls=False
    )
    with _translated("at connect", where):
        response = await smtp.connect()
    try:
        await _hello(smtp, helo, where)
    except SessionError:
        smtp.close()
        raise
    return smtp, Reply(response.code, response.message)


async def _hello(smtp: aiosmtplib.SMTP, helo: str, where: str) -> None:
    with _translated("after EHLO", where):
        try:
            await smtp.ehlo(hostname=helo)
        except aiosmtplib.SMTPHeloError as exc:
            # RFC 5321 3.2: a server that does not know EHLO (500/502) still speaks HELO.
            if exc.code not in (500, 502):
                raise
            await smtp.helo(hostname=helo)


async def _secure(
    smtp: aiosmtplib.SMTP,
    greeting: Reply,
    hop: Hop,
    *,
    helo: str,
    mode: str,
    cafile: str | None,
    per_reply: float,
) -> tuple[aiosmtplib.SMTP, Reply, bool]:
    """Applies the TLS policy to a greeted connection: (connection, greeting, TLS active)."""
    where = _where(hop)
    if not smtp.supports_extension("starttls"):
        if mode == "opportunistic":
            return smtp, greeting, False
        smtp.close()
        raise SessionError(Reply(421, f"4.7.0 TLS required but {where} does not offer STARTTLS"))
    try:
        await _starttls(smtp, hop, helo=helo, verify=mode == "verify", cafile=cafile)
        return smtp, greeting, True
    except SessionError as exc:
        smtp.close()
        if mode != "opportunistic":
            raise
        log.info("STARTTLS with %s failed, retrying in plain text: %s", where, exc.reply)
    # RFC 3207 4.1 and RFC 7435: opportunistic TLS falls back to plain text, once.
    smtp, greeting = await _connect(hop, helo, per_reply)
    return smtp, greeting, False


async def _starttls(
    smtp: aiosmtplib.SMTP, hop: Hop, *, helo: str, verify: bool, cafile: str | None
) -> None:
    """STARTTLS, handshake, EHLO again; any failure is a temporary 421 4.7.5 SessionError."""
    try:
        context = await asyncio.to_thread(tls.client_context, verify, cafile)
        await smtp.starttls(server_hostname=hop.host, tls_context=context)
        # RFC 3207 4.2: forget what the server said before TLS; ask again.
        await smtp.ehlo(hostname=helo)
    except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
        raise SessionError(
            Reply(421, f"4.7.5 STARTTLS with {_where(hop)} failed: {_describe(exc)}")
        ) from exc


async def first_answer(
    hops: Sequence[Hop],
    attempt: Callable[[Hop], Awaitable[T]],
    on_failure: Callable[[Hop, SessionError], None] | None = None,
) -> T:
    """Tries each hop in order (RFC 5321 5.1: MX preference, then addresses); the first that
    answers, or the last SessionError. Every "try the next host" in the relay goes through here."""
    error: SessionError | None = None
    for hop in hops:
        try:
            return await attempt(hop)
        except SessionError as exc:
            if on_failure is not None:
                on_failure(hop, exc)
            else:
                log.debug("probe of %s failed: %s", hop.host, exc.reply)
            error = exc
    if error is None:
        raise SessionError(Reply(421, "4.4.4 no host to try"))
    raise error


# -- helpers -----------------------------------------------------------------------------------


@contextmanager
def _translated(stage: str, where: str) -> Iterator[None]:
    """Turns library exceptions into SessionError (STYLE: translate at the module boundary)."""
    try:
        yield
    except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
        raise SessionError(_failure_reply(exc, stage, where)) from exc


def _failure_reply(exc: BaseException, stage: str, where: str) -> Reply:
    """The server's reply when it gave one, else a synthesized 421 (unknown means temporary)."""
    if isinstance(exc, aiosmtplib.SMTPResponseException) and 200 <= exc.code <= 599:
        return Reply(exc.code, exc.message)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return Reply(421, f"4.5.0 unintelligible reply {stage} from {where}: {_describe(exc)}")
    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError):
        return Reply(421, f"4.4.1 no answer from {where} {stage}")
    if isinstance(exc, TimeoutError):
        return Reply(421, f"4.4.2 timed out {stage} waiting for {where}")
    if isinstance(exc, aiosmtplib.SMTPConnectError):
        if isinstance(exc.__cause__, ConnectionRefusedError):
            return Reply(421, f"4.4.1 connection refused by {where}")
        return Reply(421, f"4.4.1 cannot connect to {where}: {_describe(exc)}")
    if isinstance(exc, ssl.SSLError):
        return Reply(421, f"4.7.5 TLS failure {stage} with {where}: {_describe(exc)}")
    if isinstance(exc, ConnectionError):
        return Reply(421, f"4.4.2 connection to {where} lost {stage}")
    return Reply(421, f"4.4.2 {stage} with {where}: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code > 0:
        return one_line(f"{exc.code} {exc.message}")
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return one_line(f"certificate verify failed: {exc.verify_message}")
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({_describe(cause)})"
    return one_line(text)


def _where(hop: Hop) -> str:
    """`mx1.example.org[192.0.2.1]:25` as Postfix writes it, or `[2001:db8::1]:25`."""
    if hop.host and hop.host != hop.address:
        return f"{hop.host}[{hop.address}]:{hop.port}"
    return hostport(hop.address, hop.port)


def _positive(reply: Reply) -> bool:
    return 200 <= reply.code <= 299


def _needs_smtputf8(message: Outgoing) -> bool:
    """RFC 6531 3.4: the client said SMTPUTF8, or an envelope address is not ASCII."""
    return (
        message.smtputf8
        or not message.sender.isascii()
        or not all(rcpt.address.isascii() for rcpt in message.recipients)
    )


def _envelope_problem(message: Outgoing, utf8: bool) -> Reply | None:
    """A permanent local reply when MAIL FROM cannot be written without injecting syntax."""
    if message.sender and (problem := address_problem(message.sender)) is not None:
        return Reply(553, f"5.1.7 sender address cannot be sent: {problem}", local=True)
    for name, value in (("RET", message.ret), ("ENVID", message.envid)):
        if value is not None and not _param_sendable(value, utf8):
            return Reply(
                501, f"5.5.4 {name} value contains characters SMTP cannot carry", local=True
            )
    return None


def _recipient_problem(rcpt: OutgoingRecipient, utf8: bool) -> Reply | None:
    """Like `_envelope_problem`, for one RCPT TO: only that recipient fails."""
    if (problem := address_problem(rcpt.address)) is not None:
        return Reply(553, f"5.1.3 recipient address cannot be sent: {problem}", local=True)
    for name, value in (("NOTIFY", rcpt.notify), ("ORCPT", rcpt.orcpt)):
        if value is not None and not _param_sendable(value, utf8):
            return Reply(
                501, f"5.5.4 {name} value contains characters SMTP cannot carry", local=True
            )
    return None


def _param_sendable(value: str, utf8: bool) -> bool:
    return not _PARAM_UNSAFE.search(value) and (utf8 or value.isascii())


def _declared_size(body: bytes) -> int:
    """RFC 1870 3: octets sent, CRLFs included, without dot-stuffing or the final dot."""
    return len(body) + (2 if body and not body.endswith(b"\r\n") else 0)


def _data_payload(body: bytes) -> bytes:
    """The DATA phase on the wire: the stored bytes dot-stuffed, CRLF-terminated, then '.'."""
    # A dot starts a line at the very start and after any CR or LF (a bare one too: some servers
    # end lines there). Two replaces do what one look-behind regex did, several times faster;
    # tests/test_courier.py checks them against that regex on generated bodies.
    payload = body.replace(b"\n.", b"\n..").replace(b"\r.", b"\r..")
    if payload.startswith(b"."):
        payload = b"." + payload
    if payload and not payload.endswith(b"\r\n"):
        payload += b"\r\n"  # RFC 5321 4.1.1.4: the terminating dot must start a line
    return payload + b".\r\n"
