"""aiosmtpd, adapted: the plumbing under relay.intake's SMTP verbs.

Checked against aiosmtpd 1.4.6 (pinned exactly in pyproject.toml). `SMTPProtocol` is aiosmtpd's
`SMTP` with its per-connection set-up, command loop, timers and line reader replaced, because
those run for every command of every session and aiosmtpd's versions cost a third of a short
session's CPU. Every private name of aiosmtpd, of asyncio's StreamReader and of the email
parser that the relay touches is here, each with why; relay.intake's `RelaySMTP` subclass holds
the verbs and speaks only through the public methods below. tests/test_intake.py checks that
`__init__` sets what aiosmtpd's own would and that the address parser agrees with aiosmtpd's.
"""

from __future__ import annotations

import asyncio
import collections
import re
import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException, login_always_fail

_BOGUS_LIMIT = 5  # unknown commands before the session is closed (aiosmtpd's BOGUS_LIMIT)
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# `<dot-atom@domain>`: the address form of nearly all mail, fast-pathed in parse_address.
_PLAIN_ANGLE_ADDR = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")

_PREFIXED: dict[tuple[type, str], tuple[str, ...]] = {}


def prefixed(cls: type, prefix: str) -> tuple[str, ...]:
    """Names of cls's attributes that start with prefix, without it (aiosmtpd's dispatch)."""
    names = _PREFIXED.get((cls, prefix))
    if names is None:
        names = tuple(name[len(prefix) :] for name in dir(cls) if name.startswith(prefix))
        _PREFIXED[(cls, prefix)] = names
    return names


def parse_address(arg: str) -> tuple[str | None, str | None]:
    """The address of a MAIL or RCPT argument and the text after it, as aiosmtpd parses it.

    Nearly every client sends a plain `<local@domain>`; that form is taken apart by one
    regular expression. Anything else (quoted local parts, source routes, `<>`, stray
    spaces) goes through the RFC 5322 parser (the email package's private
    `_header_value_parser`) as in aiosmtpd, which gives the same answer for the plain form.
    """
    match = _PLAIN_ANGLE_ADDR.match(arg)
    if match is not None:
        rest = arg[match.end() :].lstrip(" \t")  # the parser takes the blanks after ">"
        if not rest.startswith("("):  # but also a comment, which it alone knows how to skip
            return match.group(1), rest
    parsed: Any
    try:
        if arg.lstrip().startswith("<"):
            parsed, rest = get_angle_addr(arg)
        else:
            parsed, rest = get_addr_spec(arg)
    except HeaderParseError:
        return None, None
    try:
        return str(parsed.addr_spec), str(rest)
    except IndexError:
        return None, None


def split_command(line: bytes) -> tuple[str, str | None]:
    """(VERB in upper case, or "" when it is not ASCII; the argument, or None)."""
    command_bytes, _, arg_bytes = line.partition(b" ")
    try:
        command = command_bytes.upper().decode("ascii")
    except UnicodeDecodeError:
        command = ""
    # The argument may be UTF-8 (SMTPUTF8) or stray 8-bit: surrogateescape keeps the original
    # bytes recoverable, as in aiosmtpd.
    arg = str(arg_bytes.strip(), "utf-8", "surrogateescape") if arg_bytes else None
    return command, arg


class SMTPProtocol(SMTP):
    """aiosmtpd's protocol with a lean set-up, command loop and timer; verbs come from a subclass.

    The subclass answers five questions: `opened()` (a reply instead of the banner, or None),
    `secured(previous)` (STARTTLS made a new session), `closed(session)`, `internal_error(exc)`
    (the reply to an exception of ours) and `timed_out()` (the line sent before closing).
    """

    def __init__(
        self,
        handler: object,
        hooks: dict[str, Callable[..., Any]],
        *,
        line_limit: int,
        hostname: str,
        data_size_limit: int | None,
        ident: str,
        tls_context: ssl.SSLContext | None,
        timeout: float,
        new_session: Callable[[asyncio.AbstractEventLoop], Session],
        new_envelope: Callable[[], Envelope],
    ) -> None:
        """Sets up what aiosmtpd's own __init__ would, for the options the relay uses.

        aiosmtpd's __init__ scans the protocol and the handler with inspect.getmembers and dir()
        on every connection, to find AUTH mechanisms, handler hooks and SMTP verbs. Those tables
        depend only on the classes, so they are built once per class here.
        """
        self._refusal: str | None = None  # a connection turned away at connect gets only this
        self._new_session = new_session
        self._new_envelope = new_envelope
        self.__ident__ = ident
        self.loop = asyncio.get_event_loop()
        # aiosmtpd sizes its line reader from line_length_limit and checks each ESMTP command
        # against command_size_limits, a class-level dict defaulting to 512 octets: both must be
        # ours, per instance, or a DSN RCPT with a long ORCPT (RFC 3461 allows 500 more octets)
        # gets "500 Command line too long" whatever the config says.
        self.line_length_limit = line_limit
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=self.loop, limit=line_limit),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop,
        )
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.command_size_limit = line_limit
        self.command_size_limits: collections.defaultdict[str, int] = collections.defaultdict(
            lambda: line_limit
        )
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = False
        self._timeout_duration = timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._tls_handshake_okay = True
        self._tls_protocol: Any = None
        self._original_transport: asyncio.BaseTransport | None = None
        self.session: Session | None = None
        self.envelope: Envelope | None = None
        self.transport: asyncio.BaseTransport | None = None
        self._handler_coroutine: asyncio.Task[None] | None = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._auth_methods: dict[str, Any] = {}  # no AUTH on a backup MX: smtp_AUTH says 502
        self._handle_hooks = hooks  # aiosmtpd's handler hook table (its STARTTLS calls one)
        self._ehlo_hook_ver = None  # the subclass's smtp_EHLO calls no hook
        self._smtp_verbs = frozenset(prefixed(type(self), "smtp_"))
        self._enforce_call_limit = False

    # -- what the subclass answers ---------------------------------------------------------

    def opened(self) -> str | None:
        raise NotImplementedError

    def secured(self, previous: Session) -> None:
        raise NotImplementedError

    def closed(self, session: Session) -> None:
        raise NotImplementedError

    async def internal_error(self, error: Exception) -> str:
        raise NotImplementedError

    def timed_out(self) -> str:
        raise NotImplementedError

    async def before_banner(self) -> str | None:
        """A reply to send instead of the banner (checks that need the network), or None."""
        return None

    def talked_first(self) -> bool:
        """The client sent something before our banner (asyncio's private reader `_buffer`)."""
        return bool(self._reader._buffer)  # type: ignore[attr-defined]

    def command_started(self, command: str) -> str | None:
        """A known verb is about to run: a reply refusing it instead, or None (the default moves
        the idle deadline)."""
        self.refresh_deadline()
        return None

    # -- what the verbs use -----------------------------------------------------------------

    @property
    def tls_active(self) -> bool:
        """STARTTLS has completed on this connection (aiosmtpd's private `_tls_protocol`)."""
        return self._tls_protocol is not None

    def reset_transaction(self) -> None:
        """A new, empty envelope (aiosmtpd's private `_set_rset_state`)."""
        self._set_rset_state()  # type: ignore[no-untyped-call]

    def end_transaction(self) -> None:
        """The envelope is done after DATA (aiosmtpd's private `_set_post_data_state`)."""
        self._set_post_data_state()  # type: ignore[no-untyped-call]

    def strip_keyword(self, keyword: str, arg: str) -> str | None:
        """`FROM:` or `TO:` taken off a MAIL/RCPT argument (aiosmtpd's private helper)."""
        rest: str | None = self._strip_command_keyword(keyword, arg)
        return rest

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def refresh_deadline(self, duration: float | None = None) -> None:
        """Moves the idle deadline; the timer itself is rescheduled only when it fires.

        Every command moves the deadline. aiosmtpd cancels and re-creates a timer each time;
        here a timer that fires before the deadline just sets itself again, which costs one
        timer per timeout period instead of one per command.
        """
        self.set_deadline(self.loop.time() + (duration or self._timeout_duration))

    def set_deadline(self, when: float) -> None:
        """The session times out at loop time `when` unless the deadline moves again."""
        loop = self.loop
        self._deadline = when
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = loop.call_at(self._deadline, self._timer_fired)

    async def read_chunk(self, size: int) -> bytes:
        return await self._reader.read(size)

    @contextmanager
    def wide_reads(self, size: int) -> Iterator[None]:
        """Lets `size` bytes gather in the reader before it pauses the socket.

        The reader's limit (asyncio's private `_limit`) is the command line length, and asyncio
        stops reading the socket whenever twice that is buffered: during DATA that would mean an
        epoll change every few kilobytes.
        """
        reader: Any = self._reader
        line_limit, reader._limit = reader._limit, size
        try:
            yield
        finally:
            reader._limit = line_limit

    def unread(self, data: bytes) -> None:
        """Gives back what a pipelining client sent after the final dot (e.g. QUIT).

        asyncio.StreamReader has no unread(); its buffer (private `_buffer`) is a bytearray that
        aiosmtpd itself manipulates (STARTTLS), so prepending there is the least surprising way.
        """
        if data:
            self._reader._buffer[0:0] = data  # type: ignore[attr-defined]

    async def push(self, status: AnyStr) -> None:
        await self.push_lines(status)

    async def push_lines(self, *lines: AnyStr) -> None:
        """Sends one reply, or the lines of a multi-line one, in a single write."""
        data = b"".join(
            (line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n" for line in lines
        )
        self._writer.write(data)
        await self._writer.drain()

    # -- aiosmtpd's private methods, replaced -------------------------------------------------

    @property
    def _smtp_methods(self) -> dict[str, Callable[[str | None], Awaitable[None]]]:
        """aiosmtpd's verb table, which its HELP reads; our command loop uses _smtp_verbs."""
        return {name: getattr(self, "smtp_" + name) for name in self._smtp_verbs}

    @_smtp_methods.setter
    def _smtp_methods(self, table: dict[str, Any]) -> None:
        self._smtp_verbs = frozenset(table)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser (a private method its verbs call), with a fast path."""
        return parse_address(arg)

    def _create_session(self) -> Session:
        return self._new_session(self.loop)

    def _create_envelope(self) -> Envelope:
        return self._new_envelope()

    @property
    def max_command_size_limit(self) -> int:
        return int(self.command_size_limit)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        previous = self.session
        super().connection_made(transport)
        if previous is None:
            self._refusal = self.opened()
        else:
            self.secured(previous)

    async def _handle_client(self) -> None:
        """The command loop: aiosmtpd's, less what the relay never enables.

        No PROXY protocol, per-command call limits or require_starttls, and no per-command
        logging (aiosmtpd builds each debug line's arguments even when debug is off). What is
        left runs for every command of every session, so it is kept short.
        """
        if not await self._greet():
            return
        bogus_budget = _BOGUS_LIMIT
        reader = self._reader
        while self.transport is not None:
            try:
                try:
                    line: bytes = await reader.readuntil()
                except asyncio.LimitOverrunError as error:
                    await self._skip_long_line(error.consumed)
                    continue
                line = line.rstrip(b"\r\n")
                command, arg = split_command(line)
                if not command:
                    await self.push("500 Error: bad syntax")
                    continue
                if len(line) > self.command_size_limit:
                    await self.push(self.line_too_long())
                    continue
                if not self._tls_handshake_okay and command != "QUIT":
                    await self.push("554 Command refused due to lack of security")
                    continue
                if command not in self._smtp_verbs:
                    bogus_budget -= 1
                    if bogus_budget < 1:
                        await self.push("502 5.5.1 Too many unrecognized commands, goodbye.")
                        self.close()
                        continue
                    await self.push(f'500 Error: command "{command}" not recognized')
                    continue
                refusal = self.command_started(command)
                if refusal is not None:
                    await self.push(refusal)
                    if refusal.startswith("421"):
                        self.close()
                    continue
                await getattr(self, "smtp_" + command)(arg)
            except (asyncio.CancelledError, ConnectionResetError):
                self._writer.close()
                raise
            except TLSSetupException as error:
                # The handshake failed half-way: nothing can be said on this connection.
                self.close()
                self.connection_lost(error)
            except Exception as error:
                await self.push(await self.internal_error(error))

    def line_too_long(self) -> str:
        raise NotImplementedError

    async def _greet(self) -> bool:
        """The banner, or the refusal sent instead of it (RFC 5321 3.1); False if refused."""
        if self._refusal is None:
            self._refusal = await self.before_banner()
        if self._refusal is not None:
            await self.push(self._refusal)
            self.close()
            return False
        await self.push(f"220 {self.hostname} {self.__ident__}")
        return True

    async def _skip_long_line(self, consumed: int) -> None:
        """Reads past an overlong command line, then says so (aiosmtpd's behaviour)."""
        await self._reader.read(consumed)
        while True:
            try:
                await self._reader.readuntil()
                break
            except asyncio.LimitOverrunError as error:
                await self._reader.read(error.consumed)
        await self.push(self.line_too_long())

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's private timer reset, which its connection_made and STARTTLS call: it must be
        ours, or aiosmtpd arms its own timer, which a later command no longer moves."""
        self.refresh_deadline(duration)

    def _timer_fired(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        """RFC 5321 4.5.3.2: say why before closing (aiosmtpd's private timeout callback)."""
        line = self.timed_out()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(line.encode() + b"\r\n")  # type: ignore[attr-defined]
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def eof_received(self) -> bool:
        """The client closed its side of the connection: close ours.

        aiosmtpd cancels the command loop here and keeps the connection half-open. When the
        close arrives before that loop has run once (a port probe: connect, then close), the
        loop never gets to close the transport, and the session would hold its connection slot
        until the command timeout. Nothing more can be read, so there is nothing to wait for.
        """
        super().eof_received()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        if self.session is not None:
            self.closed(self.session)
        super().connection_lost(error)
