"""SMTP intake: every inbound policy decision and every reply text lives here.

`RelaySMTP` is aiosmtpd's protocol with the parts a backup MX needs done differently: ESMTP
parameters of RFC 3461 (DSN) kept with their original case, RFC 3463 enhanced codes, and a DATA
phase that reads in large chunks and keeps the bytes exactly as sent (aiosmtpd reads DATA line by
line, which bounds throughput on large messages to one slow core). `IntakeHandler` holds the
policy: which recipients we accept (our domains only: never an open relay), loop detection, the
Received trace header, and the rule that 250 follows only the durable commit of the message.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Protocol

from aiosmtpd.smtp import Envelope, Session, syntax

from relay.adapters.aiosmtpd import SMTPProtocol, parse_address, prefixed
from relay.authresults import AuthResults
from relay.config import Config, DomainConfig
from relay.envelope import address_problem, domain_of, split
from relay.ops import metrics
from relay.ops.logs import fields
from relay.smtp import auth, rspamd
from relay.smtp.arc import Sealer
from relay.smtp.auth import Authenticator, SpfResult
from relay.smtp.dnsbl import DnsLists, Site, Verdict, parse_site
from relay.smtp.limits import Limits, Refusal
from relay.smtp.policy import InboundSession
from relay.store import (
    NewMessage,
    NewRecipient,
    StorageError,
    address_key,
    new_queue_id,
)
from relay.words import plural

log = logging.getLogger("relay.intake")

_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
_NOTIFY_VALUES = {"SUCCESS", "FAILURE", "DELAY"}
_XTEXT = re.compile(r"^[\x21-\x7e]{1,100}$")
# Sender-specified routing (RFC 5321 3.6.1, Postfix's allow_untrusted_routing=no): a relay must
# not pass on addresses that would make the primary forward elsewhere.
_ROUTING_CHARS = set("%!@")
_DATA_CHUNK = 64 * 1024
# Commands that move no mail (Postfix's smtpd_junk_command_limit counts the same, less ETRN).
_JUNK_VERBS = frozenset(("NOOP", "RSET", "VRFY", "EXPN", "HELP"))
_TERMINATOR = b"\r\n.\r\n"


class Replies:
    """The reply texts, in one place, so docs/operations.md can list what we send and why."""

    MAIL_OK = "250 2.1.0 Ok"
    RCPT_OK = "250 2.1.5 Ok"
    RSET_OK = "250 2.0.0 Ok"
    DATA_GO = "354 End data with <CR><LF>.<CR><LF>"
    QUEUED = "250 2.0.0 Ok: queued as {id}"
    RELAY_DENIED = "550 5.7.1 <{address}>: Relay access denied"
    BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"
    ROUTED_RECIPIENT = "550 5.7.1 <{address}>: sender-specified routing is not accepted"
    TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"
    TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"
    TOO_MANY_HOPS = "554 5.4.6 Too many hops: mail forwarding loop"
    STORAGE_ERROR = "451 4.3.0 Error: queue file write error"
    INTERNAL_ERROR = "451 4.3.0 Error: internal error, try again later"
    NEED_HELO = "503 5.5.1 Error: send HELO/EHLO first"
    NEED_MAIL = "503 5.5.1 Error: need MAIL command"
    NEED_RCPT = "503 5.5.1 Error: need RCPT command"
    NESTED_MAIL = "503 5.5.1 Error: nested MAIL command"
    MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"
    RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO:<address> [parameters]"
    DATA_SYNTAX = "501 5.5.4 Syntax: DATA"
    BAD_ADDRESS = "553 5.1.3 Error: malformed address"
    BAD_SENDER = "501 5.1.7 Bad sender address syntax: {reason}"
    UNSENDABLE_RECIPIENT = "501 5.1.3 Bad recipient address syntax: {reason}"
    BAD_PARAMETER = "555 5.5.4 Unsupported parameter {name}"
    BAD_PARAMETER_VALUE = "501 5.5.4 Bad value for parameter {name}"
    SMTPUTF8_NEEDED = "553 5.6.7 Non-ASCII address requires SMTPUTF8"
    NO_AUTH = "502 5.5.1 AUTH not supported: this is a mail exchanger"
    ETRN_SYNTAX = "501 5.5.4 Syntax: ETRN domain"
    ETRN_STARTED = "250 2.0.0 Queuing for node {domain} started"
    ETRN_DENIED = "459 4.7.1 <{domain}>: ETRN not allowed from [{client}]"
    ETRN_UNKNOWN = "459 4.7.1 <{domain}>: not a domain we relay for"
    # RFC 1985 section 5: 458 "unable to queue messages for node"; we keep one queue, not named
    # ones, so "#queue" is a request we cannot do, not a node we refuse (459).
    ETRN_NO_NAMED_QUEUES = "458 4.5.1 <{domain}>: named queues are not supported; use ETRN domain"
    LINE_TOO_LONG = "500 5.5.2 Error: command line too long"
    TLS_ALREADY_ACTIVE = "503 5.5.1 Error: TLS already active"
    DNSBL = "550 5.7.1 Service unavailable; client [{client}] blocked using {lists}"
    DNSBL_BANNER = "554 5.7.1 Service unavailable; client [{client}] blocked using {lists}"
    PREGREET = "550 5.5.1 Protocol error: talking before the greeting"
    SPF_FAIL = "550 5.7.1 <{address}>: SPF: {domain} does not allow [{client}] to send its mail"
    DMARC_REJECT = "550 5.7.1 DMARC: {domain} asks receivers to reject mail that fails its checks"
    TOO_MANY_JUNK = "421 4.7.0 {host} Error: too many NOOP, RSET, VRFY, EXPN or HELP commands"
    TIMEOUT = "421 4.4.2 {host} Error: timeout exceeded"


class RelaySession(Session):
    """aiosmtpd's session plus the counters our policy keeps per connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.messages = 0
        self.unknown_recipients = 0
        self.closed = False
        self.slot: str | None = None  # relay.limits: the client whose connection slot we hold
        self.counted = False  # relay.workers: the relay process counts this connection
        # Set by the protocol: bring this session's deadline to at most N seconds from now.
        self.tighten: Callable[[float], None] | None = None
        self.dnsbl: asyncio.Future[Verdict] | None = None  # started at connect (relay.dnsbl)

    def carry_over(self, previous: RelaySession) -> None:
        """After STARTTLS aiosmtpd starts a new session (RFC 3207 4.2 forgets what the client
        said), but it is the same connection: its counters and its slot stay."""
        self.messages = previous.messages
        self.unknown_recipients = previous.unknown_recipients
        self.slot, previous.slot = previous.slot, None
        self.counted, previous.counted = previous.counted, False
        previous.closed = True

    @property
    def client_ip(self) -> str:
        peer = self.peer
        return str(peer[0]) if isinstance(peer, tuple) else str(peer or "")


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope plus the RFC 3461 parameters and the BODY type."""

    def __init__(self) -> None:
        super().__init__()
        self.recipients: list[NewRecipient] = []
        self.envid: str | None = None
        self.ret: str | None = None
        self.eightbit = False
        self.spf: SpfResult | None = None  # asked at the first RCPT that needed it (relay.auth)


def _params(text: str) -> dict[str, str | None] | None:
    """ESMTP parameters as {UPPER-NAME: value-as-sent}, or None when malformed (RFC 5321 4.1.2)."""
    params: dict[str, str | None] = {}
    for item in text.split():
        name, eq, value = item.partition("=")
        if not name or not name.replace("-", "").isalnum() or (eq and not value):
            return None
        params[name.upper()] = value if eq else None
    return params


class RelaySMTP(SMTPProtocol):
    """The SMTP verbs as a backup MX speaks them. Parsing only; decisions go to the handler.

    The plumbing under them (set-up, command loop, timers, the line reader) is
    relay.adapters.aiosmtpd's, the one place that touches aiosmtpd's private names.
    """

    def __init__(
        self,
        handler: IntakeHandler,
        *,
        hostname: str,
        data_size_limit: int | None,
        ident: str = "ESMTP relay",
        tls_context: ssl.SSLContext | None = None,
        timeout: float = 300.0,
    ) -> None:
        self._reading_data = False
        self._buffered = 0  # DATA bytes held against smtp.max_inflight_bytes
        self._junk = 0  # NOOP, RSET, VRFY, EXPN, HELP so far (smtp.max_junk_commands)
        self.relay_handler = handler
        super().__init__(
            handler,
            handler.aiosmtpd_hooks,
            line_limit=handler.config.smtp.max_line_length,
            hostname=hostname,
            data_size_limit=data_size_limit,
            ident=ident,
            tls_context=tls_context,
            timeout=timeout,
            new_session=RelaySession,
            new_envelope=RelayEnvelope,
        )

    # Typed views of aiosmtpd's session and envelope attributes.
    def relay_session(self) -> RelaySession:
        assert isinstance(self.session, RelaySession)
        return self.session

    def relay_envelope(self) -> RelayEnvelope:
        assert isinstance(self.envelope, RelayEnvelope)
        return self.envelope

    def opened(self) -> str | None:
        self.relay_session().tighten = self._tighten
        return self.relay_handler.connection_opened(self.relay_session())

    def secured(self, previous: Session) -> None:
        assert isinstance(previous, RelaySession)
        self.relay_session().tighten = self._tighten
        self.relay_handler.connection_secured(previous, self.relay_session())

    async def before_banner(self) -> str | None:
        return await self.relay_handler.before_banner(self.relay_session(), self.talked_first)

    def _tighten(self, seconds: float) -> None:
        self.set_deadline(min(self._deadline, self.loop.time() + seconds))

    def _timeout(self, configured: float) -> float:
        """A configured timeout, or the stress timeout when that is shorter and the relay is
        near its connection limit (Postfix's ${stress?…}: slow clients make room sooner)."""
        if self.relay_handler.stressed:
            return min(configured, self.relay_handler.config.smtp.stress_timeout)
        return configured

    def command_started(self, command: str) -> str | None:
        """Counts junk commands; under stress they no longer move the idle deadline, so a
        client cannot keep its slot with NOOPs while the relay is full."""
        if command in _JUNK_VERBS:
            self._junk += 1
            if self._junk > self.relay_handler.config.smtp.max_junk_commands:
                metrics.messages_rejected.labels("junk_commands").inc()
                log.info("too many junk commands from [%s]", self.relay_session().client_ip)
                return Replies.TOO_MANY_JUNK.format(host=self.hostname)
            if self.relay_handler.stressed:
                return None
        self.refresh_deadline(self._timeout(self._timeout_duration))
        return None

    def closed(self, session: Session) -> None:
        if isinstance(session, RelaySession) and not session.closed:
            session.closed = True
            self.relay_handler.connection_closed(session)

    async def internal_error(self, error: Exception) -> str:
        return await self.relay_handler.handle_exception(error)

    def line_too_long(self) -> str:
        metrics.messages_rejected.labels("line_too_long").inc()
        return Replies.LINE_TOO_LONG

    def timed_out(self) -> str:
        """RFC 5321 4.5.3.2: say why before closing, and count it."""
        reason = "data_timeout" if self._reading_data else "command_timeout"
        metrics.messages_rejected.labels(reason).inc()
        log.info("%s from [%s]", reason.replace("_", " "), self.relay_session().client_ip)
        return Replies.TIMEOUT.format(host=self.hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self.reset_transaction()
        self.relay_session().extended_smtp = True
        self.relay_session().host_name = hostname
        lines = [
            self.hostname,
            f"SIZE {self.data_size_limit}" if self.data_size_limit else "SIZE",
            "8BITMIME",
            "SMTPUTF8",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
            "DSN",
        ]
        lines += self.relay_handler.extra_extensions(self.relay_session())
        if self.tls_context and not self.tls_active:
            lines.append("STARTTLS")
        lines.append("HELP")
        await self.push_lines(*[f"250-{line}" for line in lines[:-1]], f"250 {lines[-1]}")

    @syntax("ETRN domain")
    async def smtp_ETRN(self, arg: str | None) -> None:
        """RFC 1985: a trusted client asks us to flush a domain's queue now.

        `ETRN example.org` flushes that domain; `ETRN @example.org` it and every configured
        subdomain of it; `ETRN #queue` names a queue, which we do not have (458).
        """
        if not self.relay_session().host_name:
            await self.push(Replies.NEED_HELO)
            return
        node = (arg or "").strip()
        name = node[1:] if node[:1] in ("@", "#") else node
        if not name or " " in node or name[:1] in ("@", "#"):
            await self.push(Replies.ETRN_SYNTAX)
            return
        if node.startswith("#"):
            await self.push(Replies.ETRN_NO_NAMED_QUEUES.format(domain=node))
            return
        await self.push(await self.relay_handler.etrn(self.relay_session(), node))

    async def smtp_AUTH(self, arg: str | None) -> None:
        await self.push(Replies.NO_AUTH)

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        self.reset_transaction()
        await self.push(Replies.RSET_OK)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        await self._answer(await self._mail(arg))

    async def _mail(self, arg: str | None) -> str:
        if not self.relay_session().host_name:
            return Replies.NEED_HELO
        if self.relay_envelope().mail_from is not None:
            return Replies.NESTED_MAIL
        # A fresh envelope: parameters of an earlier MAIL that was refused (SMTPUTF8, RET,
        # ENVID, BODY) must not carry over into this transaction.
        self.reset_transaction()
        envelope = self.relay_envelope()
        rest = self.strip_keyword("FROM:", arg or "")
        if not rest:
            return Replies.MAIL_SYNTAX
        address, param_text = parse_address(rest)
        if address is None or not _valid_utf8(address) or not _as_sent(address, rest):
            metrics.messages_rejected.labels("bad_sender").inc()
            return Replies.BAD_ADDRESS
        params = _params(param_text or "")
        if params is None or (params and not self.relay_session().extended_smtp):
            return Replies.MAIL_SYNTAX
        if (problem := _take_mail_params(params, envelope, self.data_size_limit)) is not None:
            return problem
        sender = "" if address == "<>" else address
        if sender and (problem := address_problem(sender)) is not None:
            metrics.messages_rejected.labels("bad_sender").inc()
            return Replies.BAD_SENDER.format(reason=problem)
        if not envelope.smtp_utf8 and not sender.isascii():
            return Replies.SMTPUTF8_NEEDED
        reply = await self.relay_handler.mail(self.relay_session(), envelope, sender)
        if reply.startswith("2"):
            envelope.mail_from = sender
        return reply

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        await self._answer(await self._rcpt(arg))

    async def _answer(self, reply: str) -> None:
        """Writes a verb's reply; a 421 also ends the session (RFC 5321 3.8)."""
        await self.push(reply)
        if reply.startswith("421"):
            self.close()

    async def _rcpt(self, arg: str | None) -> str:
        """RCPT as a sequence of checks, each a reply or nothing; the handler decides last."""
        envelope = self.relay_envelope()
        if not self.relay_session().host_name:
            return Replies.NEED_HELO
        if envelope.mail_from is None:
            return Replies.NEED_MAIL
        extended = self.relay_session().extended_smtp
        parsed = _parse_rcpt(self.strip_keyword("TO:", arg or ""), extended)
        if isinstance(parsed, str):
            return parsed
        if not envelope.smtp_utf8 and not parsed.address.isascii():
            return Replies.SMTPUTF8_NEEDED
        reply = await self.relay_handler.rcpt(self.relay_session(), envelope, parsed)
        if reply.startswith("2"):
            _add_recipient(envelope, self.relay_handler.delivered_as(parsed))
        return reply

    def _data_deadline(self, deadline: float | None, octets: int, idle: float, rate: int) -> float:
        """The DATA deadline once `octets` more have arrived: they earn octets / rate seconds
        (Postfix 3.7's smtpd_min_data_rate), but it never lies more than the idle timeout ahead.

        Re-arming the whole timeout on every read would let one byte every few seconds hold a
        connection slot for ever (slowloris); this way a trickle runs out of time.
        """
        ceiling = self.loop.time() + self._timeout(idle)
        if deadline is not None and rate:
            ceiling = min(ceiling, deadline + octets / rate)
        self.set_deadline(ceiling)
        return ceiling

    @syntax("STARTTLS")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        """RFC 3207 4.2: STARTTLS on a connection already in TLS is a bad sequence (503)."""
        if self.tls_active:
            await self.push(Replies.TLS_ALREADY_ACTIVE)
            return
        await super().smtp_STARTTLS(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if not self.relay_session().host_name:
            await self.push(Replies.NEED_HELO)
            return
        if self.relay_envelope().mail_from is None:
            await self.push(Replies.NEED_MAIL)
            return
        if not self.relay_envelope().rcpt_tos:
            await self.push(Replies.NEED_RCPT)
            return
        if arg:
            await self.push(Replies.DATA_SYNTAX)
            return
        await self.push(Replies.DATA_GO)
        self._reading_data = True
        try:
            content = await self._read_data()
            self._reading_data = False
            envelope = self.relay_envelope()
            self.end_transaction()
            if isinstance(content, str):
                await self.push(content)
                return
            reply = await self.relay_handler.data(self.relay_session(), envelope, content)
        finally:
            self._reading_data = False
            self.relay_handler.data_done(self._buffered)
            self._buffered = 0
        await self.push(reply)

    async def _read_data(self) -> bytes | str:
        """Reads up to the lone dot; the refusal reply when the message cannot be taken.

        Too big (552), or over the relay's in-flight budget (451): either way the rest is read
        and thrown away, so that the reply comes after the final dot (RFC 5321 4.2.5).

        The bytes are kept exactly as sent, apart from undoing dot-stuffing (RFC 5321 4.5.2).
        A line ends only at CRLF: a bare LF or CR is content, as in aiosmtpd's own reader.
        """
        with self.wide_reads(_DATA_CHUNK):
            return await self._read_body()

    async def _read_body(self) -> bytes | str:
        smtp = self.relay_handler.config.smtp
        stream = DataStream(self.data_size_limit or 0)
        deadline: float | None = None  # the start of DATA: the whole timeout
        last = 0  # octets of the last chunk, earning time against smtp.min_data_rate
        over_budget = False
        while True:
            deadline = self._data_deadline(deadline, last, smtp.data_timeout, smtp.min_data_rate)
            chunk = await self.read_chunk(_DATA_CHUNK)
            last = len(chunk)
            if not chunk:
                raise ConnectionResetError("connection closed during DATA")
            if not over_budget and not stream.discarding:
                over_budget = not self.relay_handler.take_data(len(chunk))
                self._buffered += 0 if over_budget else len(chunk)
            if over_budget:
                stream.discard()
            after = stream.feed(chunk)
            if after is not None:
                self.unread(after)
                break
        self.refresh_deadline(self._timeout(self._timeout_duration))
        if over_budget:
            return self.relay_handler.over_budget(self.relay_session())
        if stream.too_big:
            metrics.messages_rejected.labels("too_big").inc()
            return Replies.TOO_BIG
        return stream.content()


def smtp_protocol(
    handler: IntakeHandler, cfg: Config, tls_context: ssl.SSLContext | None
) -> RelaySMTP:
    """One connection's protocol object, as every process that runs SMTP sessions builds it."""
    return RelaySMTP(
        handler,
        hostname=cfg.hostname,
        ident="ESMTP relay",
        data_size_limit=cfg.smtp.max_message_size,
        tls_context=tls_context,
        timeout=cfg.smtp.command_timeout,
    )


class DataStream:
    """The DATA phase's bytes up to the lone dot, kept exactly as sent (no I/O here).

    A line ends only at CRLF: a bare LF or CR is content, as in aiosmtpd's own reader. Past the
    size limit (or once told to discard) only a tail long enough to spot the terminator is
    kept, so the reply can still come after the final dot (RFC 5321 4.2.5).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # A virtual CRLF in front lets an empty message (".\r\n" at once) match the terminator.
        self._buffer = bytearray(b"\r\n")
        self._received = 0
        self._discarded = 0
        self._searched_to = 0
        self._discarding = False
        self._end = -1

    @property
    def discarding(self) -> bool:
        return self._discarding or self._discarded > 0

    def discard(self) -> None:
        """Keep nothing more: the message will be refused (over the in-flight budget)."""
        self._discarding = True

    def feed(self, chunk: bytes) -> bytes | None:
        """Takes one chunk; once the terminator is in, the bytes after it (else None)."""
        self._received += len(chunk)
        buffer = self._buffer
        buffer += chunk
        end = buffer.find(_TERMINATOR, self._searched_to)
        if end >= 0:
            after = bytes(buffer[end + len(_TERMINATOR) :])
            del buffer[end + 2 :]
            self._end = end
            return after
        self._searched_to = max(0, len(buffer) - len(_TERMINATOR) + 1)
        # Up to two octets of the final ".\r\n" may already be here, so the message is over
        # the limit for sure only past limit + 3; trimming any earlier would throw away a
        # message that fits and store its tail.
        if self._discarding or (self.limit and self._received > self.limit + 3):
            cut = max(0, len(buffer) - len(_TERMINATOR))
            del buffer[:cut]
            self._discarded += cut
            self._searched_to = 0
        return None

    @property
    def too_big(self) -> bool:
        return bool(self.limit) and (self._discarded > 0 or self._end > self.limit)

    def content(self) -> bytes:
        """The message, dot-stuffing undone (RFC 5321 4.5.2)."""
        return bytes(self._buffer).replace(b"\r\n.", b"\r\n")[2:]


def _parse_rcpt(rest: str | None, extended: bool) -> NewRecipient | str:
    """The recipient of `RCPT TO:` + `rest` and its DSN parameters (RFC 3461 4), or the reply
    refusing it; parameters only after EHLO (`extended`)."""
    if not rest:
        return Replies.RCPT_SYNTAX
    address, param_text = parse_address(rest)
    if not address or address == "<>" or not _valid_utf8(address) or not _as_sent(address, rest):
        metrics.messages_rejected.labels("bad_recipient").inc()
        return Replies.BAD_ADDRESS
    if (problem := address_problem(address)) is not None:
        metrics.messages_rejected.labels("bad_recipient").inc()
        return Replies.UNSENDABLE_RECIPIENT.format(reason=problem)
    params = _params(param_text or "")
    if params is None or (params and not extended):
        return Replies.RCPT_SYNTAX
    notify, orcpt = params.pop("NOTIFY", None), params.pop("ORCPT", None)
    if params:
        return Replies.BAD_PARAMETER.format(name=next(iter(params)))
    if notify is not None:
        notify = _notify_value(notify)
        if notify is None:
            return Replies.BAD_PARAMETER_VALUE.format(name="NOTIFY")
    if orcpt is not None and (";" not in orcpt or not _XTEXT.match(orcpt)):
        return Replies.BAD_PARAMETER_VALUE.format(name="ORCPT")
    return NewRecipient(address, notify=notify, orcpt=orcpt)


@functools.lru_cache(maxsize=8)
def _sites(entries: tuple[str, ...]) -> tuple[Site, ...]:
    """The configured lists, parsed once per configuration (config.py validated them)."""
    return tuple(parse_site(entry) for entry in entries)


def _take_mail_params(
    params: dict[str, str | None], envelope: RelayEnvelope, size_limit: int | None
) -> str | None:
    """MAIL's ESMTP parameters onto the envelope; the reply refusing the first bad one."""
    for name, value in params.items():
        if name == "SIZE":
            if value is None or not value.isdigit():
                return Replies.BAD_PARAMETER_VALUE.format(name=name)
            if size_limit and int(value) > size_limit:
                metrics.messages_rejected.labels("too_big").inc()
                return Replies.TOO_BIG
        elif name == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return Replies.BAD_PARAMETER_VALUE.format(name=name)
            envelope.eightbit = value.upper() == "8BITMIME"
        elif name == "SMTPUTF8":
            if value is not None:
                return Replies.BAD_PARAMETER_VALUE.format(name=name)
            envelope.smtp_utf8 = True
        elif name == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                return Replies.BAD_PARAMETER_VALUE.format(name=name)
            envelope.ret = value.upper()
        elif name == "ENVID":
            if value is None or not _XTEXT.match(value):
                return Replies.BAD_PARAMETER_VALUE.format(name=name)
            envelope.envid = value
        else:
            return Replies.BAD_PARAMETER.format(name=name)
    return None


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    when: float,
    tls: str | None,
) -> bytes:
    """The RFC 5321 4.4 trace header, folded, as bytes to prepend to the message."""
    date = _rfc5322_date(int(when))
    lines = [f"Received: from {_clean(helo)} ([{client_ip}])"]
    lines.append(f"\tby {hostname} (relay) with {protocol} id {queue_id}")
    if tls:
        lines.append(f"\t({tls})")
    if recipient:
        lines.append(f"\tfor <{recipient}>; {date}")
    else:
        lines[-1] += f"; {date}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=4)
def _rfc5322_date(second: int) -> str:
    """The trace header's date, formatted once a second rather than once a message."""
    return format_datetime(datetime.fromtimestamp(second, UTC))


def _valid_utf8(text: str) -> bool:
    """aiosmtpd decodes arguments with surrogateescape: invalid UTF-8 survives as surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_sent(address: str, argument: str) -> bool:
    """The parsed address is the one the client wrote, closed by ">" when it opened with "<".

    The RFC 5322 parser under aiosmtpd repairs what it reads: it closes a missing ">" and turns
    a TAB in a quoted local part into a space. Passing on a repaired address would deliver to
    someone the sender did not name, so such forms are refused (a source route before the
    address, `<@a.test:bob@example.test>`, is still accepted and dropped, RFC 5321 4.1.2).
    """
    if address == "<>":
        return True
    if argument.lstrip().startswith("<"):
        return f"{address}>" in argument
    return address in argument


def _storable(text: str) -> str:
    """Client text kept for the operator: invalid UTF-8 as backslash escapes, never an error."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _clean(text: str) -> str:
    """A HELO argument is client-controlled: keep it printable and bounded in our header."""
    cleaned = "".join(c if c.isascii() and c.isprintable() and c not in "()" else "?" for c in text)
    return cleaned[:255] or "unknown"


def count_received(content: bytes) -> int:
    end = content.find(b"\r\n\r\n")
    header = content if end < 0 else content[: end + 2]
    return len(_RECEIVED.findall(header))


def _notify_value(text: str) -> str | None:
    """NOTIFY=NEVER, or a set of SUCCESS, FAILURE, DELAY (RFC 3461 4.1); None when invalid."""
    values = {v.upper() for v in text.split(",")}
    if values == {"NEVER"} or (values and values <= _NOTIFY_VALUES):
        return ",".join(sorted(values))
    return None


def _add_recipient(envelope: RelayEnvelope, recipient: NewRecipient) -> None:
    """A repeated RCPT is delivered once; "same" is the domain in any case and the local part
    exactly as sent (RFC 5321 2.4: `Bob@` and `bob@` may be two mailboxes, both are kept)."""
    key = address_key(recipient.address)
    if not any(address_key(r.address) == key for r in envelope.recipients):
        envelope.recipients.append(recipient)
        envelope.rcpt_tos.append(recipient.address)


def etrn_domains(config: Config, node: str) -> list[str]:
    """The configured domains an ETRN node names: one, or with `@`, a domain and its subdomains."""
    if not node.startswith("@"):
        settings = config.domain(node)
        return [settings.name] if settings is not None else []
    parent = node[1:].lower().rstrip(".")
    return [d.name for d in config.domains if d.name == parent or d.name.endswith("." + parent)]


def recipient_problem(address: str) -> str | None:
    """Syntax a backup MX refuses before looking at domains (RFC 5321 4.1.2, 3.6.1)."""
    local, domain = split(address)
    if not local or not domain:
        return Replies.BAD_RECIPIENT
    if _ROUTING_CHARS & set(local):
        return Replies.ROUTED_RECIPIENT.format(address=address)
    return None


class MessageStore(Protocol):
    """Where an accepted message goes: the queue (relay.store), or, in an acceptor process, the
    process that owns it (relay.workers). Returns once the message is durable."""

    async def put(self, message: NewMessage) -> None: ...


class ClientCounts(Protocol):
    """Connections and messages a minute per client, counted for several processes at once
    (relay.workers: the relay process keeps them for its SMTP workers)."""

    async def connect(self, client_ip: str) -> Refusal | None: ...

    def disconnect(self, client_ip: str) -> None: ...

    async def message(self, client_ip: str) -> Refusal | None: ...


class RecipientCheck(Protocol):
    """Recipient validation (relay.policy's RecipientPolicy, or relay.workers' stand-in that asks
    the process owning it)."""

    async def rcpt(
        self, session: InboundSession, settings: DomainConfig, address: str
    ) -> Refusal | None: ...


@dataclass
class IntakeHandler:
    """Every inbound decision. Gets the config through a callable so SIGHUP reloads apply."""

    get_config: Callable[[], Config]
    store: MessageStore
    clock: Callable[[], float] = time.time
    on_accepted: Callable[[NewMessage], None] | None = None
    flush_domain: Callable[[str], Awaitable[int]] | None = None
    limits: Limits | None = None  # connection, rate, memory and disk limits (relay.limits)
    shared: ClientCounts | None = None  # the client limits, kept by the relay process (workers)
    policy: RecipientCheck | None = None  # recipient validation and `accept` (relay.policy)
    dns_lists: DnsLists | None = None  # DNS list lookups with their cache (relay.dnsbl)
    authenticator: Authenticator | None = None  # SPF, DKIM and DMARC (relay.smtp.auth)
    sealer: Callable[[], Sealer | None] = lambda: None  # our ARC seal (relay.smtp.arc), if any
    sessions: set[RelaySession] = field(default_factory=set)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    stressed: bool = False  # relay.limits says the connection slots are nearly all taken

    def __post_init__(self) -> None:
        # No session yet is idle: shutdown waits on this, and must not sit out its whole grace
        # period on a relay that never had a client.
        if not self.sessions:
            self.idle.set()

    @property
    def config(self) -> Config:
        return self.get_config()

    @functools.cached_property
    def aiosmtpd_hooks(self) -> dict[str, Callable[..., Any]]:
        """aiosmtpd's `handle_*` hook table, built once rather than once per connection."""
        return {name: getattr(self, "handle_" + name) for name in prefixed(type(self), "handle_")}

    def connection_opened(self, session: RelaySession) -> str | None:
        """Counts the connection; a reply to send instead of the banner when it is refused."""
        self.sessions.add(session)
        self.idle.clear()
        metrics.smtp_connections.inc()
        metrics.smtp_connections_total.inc()
        log.info("connect from [%s]", session.client_ip)
        if self.limits is not None and (refusal := self.limits.connect(session)) is not None:
            return self._refused(session, "connection", refusal)
        self._follow_stress()
        spam = self.config.spam
        if spam.dnsbl and self.dns_lists is not None:
            # Asked now, answered while the client says EHLO and MAIL: RCPT rarely waits.
            sites = _sites(spam.dnsbl)
            session.dnsbl = asyncio.ensure_future(
                self.dns_lists.check(session.client_ip, sites, spam.dnsbl_timeout)
            )
        return None

    async def before_banner(
        self, session: RelaySession, talked_first: Callable[[], bool]
    ) -> str | None:
        """The pregreet test and, with dnsbl_action = "banner", the DNS lists: a reply to send
        instead of the banner, or None."""
        if self.shared is not None and (refusal := await self._count(session)) is not None:
            return self._refused(session, "connection", refusal)
        spam = self.config.spam
        if spam.greet_delay > 0:
            await asyncio.sleep(spam.greet_delay)
            if talked_first():
                return self._refused(session, "connection", Refusal(Replies.PREGREET, "pregreet"))
        if spam.dnsbl_action == "banner":
            return await self._dnsbl_refusal(session, "connection", Replies.DNSBL_BANNER)
        return None

    async def _count(self, session: RelaySession) -> Refusal | None:
        """The shared count of clients takes the connection, or refuses it. Whatever happens
        to the session meanwhile, a connection counted there is given back exactly once."""
        assert self.shared is not None
        shared, client_ip = self.shared, session.client_ip
        asking = asyncio.ensure_future(shared.connect(client_ip))
        try:
            refusal = await asyncio.shield(asking)
        except asyncio.CancelledError:
            asking.add_done_callback(lambda done: _give_back(shared, client_ip, done))
            raise
        if refusal is None and session.closed:
            shared.disconnect(client_ip)
        elif refusal is None:
            session.counted = True
        return refusal

    async def _dnsbl_refusal(self, session: RelaySession, what: str, reply: str) -> str | None:
        if session.dnsbl is None:
            return None
        verdict = await session.dnsbl
        if verdict.score < self.config.spam.dnsbl_threshold:
            return None
        lists = ", ".join(verdict.listed_by) or "DNS lists"
        refusal = Refusal(reply.format(client=session.client_ip, lists=lists), "dnsbl")
        return self._refused(session, f"{what} ({lists})", refusal)

    def connection_secured(self, previous: RelaySession, session: RelaySession) -> None:
        """STARTTLS replaced the session object of a connection that is still the same."""
        session.carry_over(previous)
        self.sessions.discard(previous)
        self.sessions.add(session)

    def connection_closed(self, session: RelaySession) -> None:
        if self.limits is not None:
            self.limits.disconnect(session)
        if session.counted and self.shared is not None:
            session.counted = False
            self.shared.disconnect(session.client_ip)
        self.sessions.discard(session)
        if not self.sessions:
            self.idle.set()
        metrics.smtp_connections.dec()
        log.info("disconnect from [%s]", session.client_ip)
        self._follow_stress()

    def _follow_stress(self) -> None:
        """Enters or leaves stress mode as connection slots fill or free up.

        On entry every open session's deadline is brought within smtp.stress_timeout, so the
        slow clients already holding slots make room, not only the ones that come next.
        """
        stressed = self.limits is not None and self.limits.stressed
        if stressed == self.stressed:
            return
        self.stressed = stressed
        metrics.smtp_stress.set(int(stressed))
        timeout = self.config.smtp.stress_timeout
        if not stressed:
            log.info("stress over: %s open", plural(len(self.sessions), "connection"))
            return
        log.warning(
            "stress: %s open, over 80%% of smtp.max_connections; timeouts now %gs",
            plural(len(self.sessions), "connection"),
            timeout,
        )
        for session in list(self.sessions):
            if session.tighten is not None:
                session.tighten(timeout)

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's hook for an error of ours: a 4xx so the client retries (a 500 bounces)."""
        log.error("internal error in an SMTP session: %r", error, exc_info=error)
        return Replies.INTERNAL_ERROR

    def extra_extensions(self, session: RelaySession) -> list[str]:
        """ETRN, to the clients allowed to use it (RFC 1985 3): others would only get 459."""
        return ["ETRN"] if client_allowed(session.client_ip, self.config.smtp.etrn_clients) else []

    async def etrn(self, session: RelaySession, node: str) -> str:
        """`node` is a domain, or `@domain` for it and its configured subdomains."""
        config = self.config
        if not client_allowed(session.client_ip, config.smtp.etrn_clients):
            log.info("reject ETRN %s from [%s]: client not allowed", node, session.client_ip)
            return Replies.ETRN_DENIED.format(domain=node, client=session.client_ip)
        names = etrn_domains(config, node)
        if not names or self.flush_domain is None:
            return Replies.ETRN_UNKNOWN.format(domain=node)
        count = sum([await self.flush_domain(name) for name in names])
        due = plural(count, "recipient")
        log.info("ETRN %s from [%s]: %s due now", node, session.client_ip, due)
        return Replies.ETRN_STARTED.format(domain=node)

    def _refused(self, session: RelaySession, what: str, refusal: Refusal) -> str:
        metrics.messages_rejected.labels(refusal.reason).inc()
        log.info(
            "reject %s from [%s]: %s",
            what,
            session.client_ip,
            refusal.reason,
            extra=fields(event="rejected", client=session.client_ip, reason=refusal.reason),
        )
        return refusal.reply

    async def mail(self, session: RelaySession, envelope: RelayEnvelope, sender: str) -> str:
        if self.limits is not None and (refusal := self.limits.mail(session)) is not None:
            return self._refused(session, "MAIL", refusal)
        if (
            self.shared is not None
            and self.config.smtp.rate_per_ip
            and (refusal := await self.shared.message(session.client_ip))
        ):
            return self._refused(session, "MAIL", refusal)
        return Replies.MAIL_OK

    def take_data(self, size: int) -> bool:
        """Whether `size` more bytes of DATA may be held in memory (smtp.max_inflight_bytes)."""
        return self.limits is None or self.limits.take(size)

    def over_budget(self, session: RelaySession) -> str:
        assert self.limits is not None
        return self._refused(session, "DATA", self.limits.inflight_refusal())

    def data_done(self, size: int) -> None:
        """A message was stored or refused: its `size` bytes no longer count in the budget."""
        if self.limits is not None:
            self.limits.release(size)

    def postmaster_alias(self, address: str) -> bool:
        """`postmaster` alone, and postmaster@ or abuse@ our own host name (RFC 5321 4.5.1):
        accepted from anyone and delivered to the configured `postmaster` address."""
        config = self.config
        if config.postmaster is None:
            return False
        local, domain = split(address)
        if not domain:
            return address.lower() == "postmaster"
        mine = domain_of(address) == config.hostname.lower()
        return mine and local.lower() in ("postmaster", "abuse")

    def delivered_as(self, recipient: NewRecipient) -> NewRecipient:
        """The recipient as queued: a postmaster alias becomes the configured address, the
        original kept as ORCPT so that a DSN names what the sender wrote."""
        if not self.postmaster_alias(recipient.address) or self.config.postmaster is None:
            return recipient
        orcpt = recipient.orcpt or f"rfc822;{recipient.address}"
        return NewRecipient(self.config.postmaster, notify=recipient.notify, orcpt=orcpt)

    async def rcpt(
        self, session: RelaySession, envelope: RelayEnvelope, recipient: NewRecipient
    ) -> str:
        config = self.config
        if self.postmaster_alias(recipient.address):
            if len(envelope.recipients) >= config.smtp.max_recipients:
                metrics.messages_rejected.labels("too_many_recipients").inc()
                return Replies.TOO_MANY_RECIPIENTS
            return Replies.RCPT_OK
        if config.spam.dnsbl_action == "rcpt" and (
            listed := await self._dnsbl_refusal(
                session, f"RCPT to=<{recipient.address}>", Replies.DNSBL
            )
        ):
            return listed
        if (problem := recipient_problem(recipient.address)) is not None:
            metrics.messages_rejected.labels("bad_recipient").inc()
            return problem
        settings = config.domain(recipient.domain)
        if settings is None:
            metrics.messages_rejected.labels("relay_denied").inc()
            log.info(
                "reject RCPT from [%s]: relay denied to=<%s>",
                session.client_ip,
                recipient.address,
                extra=fields(
                    event="rejected",
                    client=session.client_ip,
                    to=recipient.address,
                    reason="relay_denied",
                ),
            )
            return Replies.RELAY_DENIED.format(address=recipient.address)
        if len(envelope.recipients) >= config.smtp.max_recipients:
            metrics.messages_rejected.labels("too_many_recipients").inc()
            return Replies.TOO_MANY_RECIPIENTS
        if settings.spf_fail == "reject" and (
            spf_refusal := await self._spf_refusal(session, envelope, recipient.address)
        ):
            return spf_refusal
        if self.policy is not None:
            refusal = await self.policy.rcpt(session, settings, recipient.address)
            if refusal is not None:
                return self._refused(session, f"RCPT to=<{recipient.address}>", refusal)
        return Replies.RCPT_OK

    async def _spf_refusal(
        self, session: RelaySession, envelope: RelayEnvelope, address: str
    ) -> str | None:
        """550 when SPF fails for the sender, for a recipient whose domain says spf_fail =
        "reject": at RCPT, so a message to several domains is refused only where asked."""
        spam = self.config.spam
        if not spam.auth or self.authenticator is None:
            return None
        if envelope.spf is None:
            sender, helo = envelope.mail_from or "", session.host_name or ""
            envelope.spf = await self.authenticator.spf(
                session.client_ip, sender, helo, spam.auth_timeout
            )
        result, domain, _scope = envelope.spf
        if result != "fail":
            return None
        reply = Replies.SPF_FAIL.format(address=address, domain=domain, client=session.client_ip)
        return self._refused(session, f"RCPT to=<{address}>", Refusal(reply, "spf"))

    async def _authenticated(
        self, session: RelaySession, envelope: RelayEnvelope, content: bytes
    ) -> tuple[AuthResults | None, str | None]:
        """(the results, or None when the checks are off; a refusal, or None)."""
        spam = self.config.spam
        if not spam.auth or self.authenticator is None:
            return None, None
        sender, helo = envelope.mail_from or "", session.host_name or ""
        results = await self.authenticator.check(
            session.client_ip, sender, helo, content, spam.auth_timeout, envelope.spf
        )
        if results.dmarc != "fail" or results.dmarc_policy != "reject":
            return results, None
        domains = {r.domain for r in envelope.recipients}
        settings = [self.config.domain(domain) for domain in domains]
        # One reply covers every recipient: the sender's domain asked all receivers to refuse
        # such mail, so a single domain that honours it is enough.
        if not any(s is not None and s.dmarc_reject == "honour" for s in settings):
            return results, None
        reply = Replies.DMARC_REJECT.format(domain=results.from_domain)
        what = f"DATA from=<{sender}> ({results.from_domain} p=reject)"
        return results, self._refused(session, what, Refusal(reply, "dmarc"))

    async def data(self, session: RelaySession, envelope: RelayEnvelope, content: bytes) -> str:
        config = self.config
        hops = count_received(content)
        if hops > config.smtp.max_hops:
            metrics.messages_rejected.labels("too_many_hops").inc()
            log.info(
                "reject DATA from [%s]: %s",
                session.client_ip,
                plural(hops, "hop"),
                extra=fields(event="rejected", client=session.client_ip, reason="too_many_hops"),
            )
            return Replies.TOO_MANY_HOPS
        now = self.clock()
        queue_id = new_queue_id(now)
        recipients = tuple(envelope.recipients)
        results, refusal = await self._authenticated(session, envelope, content)
        if refusal is not None:
            return refusal
        if config.spam.rspamd:  # content filtering, before anything is stored (relay.rspamd)
            sent = (envelope.mail_from or "", tuple(r.address for r in recipients), queue_id)
            transaction = rspamd.Transaction(session.client_ip, session.host_name or "", *sent)
            checked = await rspamd.scan(config.spam, transaction, content)
            if checked.reply is not None:
                return checked.reply
            content = checked.content
        if results is not None:
            content = auth.with_header(content, results, config.hostname)
            if (sealer := self.sealer()) is not None:
                content = await sealer.seal(content, queue_id)
        header = received_header(
            helo=session.host_name or "",
            client_ip=session.client_ip,
            hostname=config.hostname,
            protocol=_protocol(session, envelope),
            queue_id=queue_id,
            recipient=recipients[0].address if len(recipients) == 1 else None,
            when=now,
            tls=_tls_description(session),
        )
        message = NewMessage(
            id=queue_id,
            sender=envelope.mail_from or "",
            recipients=recipients,
            body=header + content,
            received_at=now,
            client_ip=session.client_ip,
            helo=_storable(session.host_name or ""),
            smtputf8=bool(envelope.smtp_utf8),
            eightbit=envelope.eightbit,
            envid=envelope.envid,
            ret=envelope.ret,
            auth=results.to_json() if results is not None else "",
        )
        try:
            await self.store.put(message)
        except StorageError as exc:
            metrics.messages_rejected.labels("storage_error").inc()
            log.error(
                "reject DATA from [%s]: queue write failed: %s",
                session.client_ip,
                exc,
                extra=fields(event="rejected", client=session.client_ip, reason="storage_error"),
            )
            return Replies.STORAGE_ERROR
        session.messages += 1
        for domain in sorted({r.domain for r in recipients}):
            metrics.messages_accepted.labels(domain).inc()
        log.info(
            "%s: accepted from=<%s> size=%d nrcpt=%d client=[%s] helo=%s",
            queue_id,
            message.sender,
            len(message.body),
            len(recipients),
            session.client_ip,
            message.helo,  # the log escapes what is not printable (words.printable)
            extra=fields(
                queue_id=queue_id,
                event="accepted",
                from_=message.sender,
                size=len(message.body),
                nrcpt=len(recipients),
                client=session.client_ip,
                helo=message.helo,
            ),
        )
        if self.on_accepted is not None:
            self.on_accepted(message)
        return Replies.QUEUED.format(id=queue_id)


def _give_back(shared: ClientCounts, client_ip: str, asked: asyncio.Future[Refusal | None]) -> None:
    """A connection the shared count took for a session that went away before it heard so."""
    if not asked.cancelled() and asked.exception() is None and asked.result() is None:
        shared.disconnect(client_ip)


def _protocol(session: RelaySession, envelope: RelayEnvelope) -> str:
    """RFC 3848 / RFC 6531 3.7.3 "with" keywords."""
    tls = session.ssl is not None
    if not session.extended_smtp:
        return "SMTPS" if tls else "SMTP"
    base = "UTF8SMTP" if envelope.smtp_utf8 else "ESMTP"
    return base + ("S" if tls else "")


def _tls_description(session: RelaySession) -> str | None:
    if session.ssl is None:
        return None
    ssl_object = session.ssl.get("ssl_object")
    if ssl_object is None:
        return "using TLS"
    cipher = ssl_object.cipher()
    return f"using {ssl_object.version()} with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits)"


def client_allowed(address: str, networks: tuple[str, ...]) -> bool:
    """Whether a client address falls in one of the configured networks (ETRN and the like)."""
    if not networks:
        return False  # asked at every EHLO: no parsing when nobody may
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(net, strict=False) for net in networks)
