"""aiosmtplib, adapted: writing a message body as stored, and pipelining (RFC 2920).

Checked against aiosmtplib 5.1 (pinned to 5.x in pyproject.toml). aiosmtplib's own `data()`
rewrites bare CR and LF into CRLF, and a backup MX must hand over the bytes it stored, so the
body goes out on aiosmtplib's protocol object directly. aiosmtplib reads one reply per command
written; `pipeline` sends MAIL, the RCPTs and DATA together and reads their replies itself.
"""

from __future__ import annotations

import asyncio
from typing import cast

from aiosmtplib.errors import SMTPResponseException
from aiosmtplib.protocol import SMTPProtocol


def expect_reply(protocol: SMTPProtocol) -> None:
    """Marks a reply as awaited before the body is written.

    Private `_response_pending`: aiosmtplib throws away reply bytes that arrive while no reply is
    marked pending. A fast server answers the final dot while we still wait in a drain, before
    `read_response()` marks one; unmarked, that 250 would be lost, the session would hang until
    the timeout and the message go out twice. aiosmtplib's own data() marks it the same way.
    """
    protocol._response_pending = True


async def drain(protocol: SMTPProtocol, seconds: float) -> None:
    """Waits until the transport's buffer is below its high-water mark.

    Private `_drain_helper` (asyncio's FlowControlMixin, which aiosmtplib's protocol extends):
    the only way to wait for flow control on a protocol without a StreamWriter.
    """
    await asyncio.wait_for(protocol._drain_helper(), seconds)


class _FlightReader(asyncio.Protocol):
    """Takes the transport's input for one pipelined flight and splits it into replies.

    aiosmtplib's protocol keeps one reply: bytes that arrive while it holds one unread are
    dropped, so it cannot receive the answers to commands sent together (RFC 2920). For the
    flight, the transport is handed to this reader (asyncio's public `set_protocol`), then
    back. Flow control and the end of the connection are passed on to aiosmtplib's protocol,
    whose state therefore stays true.
    """

    def __init__(self, owner: SMTPProtocol) -> None:
        self.owner = owner
        self.buffer = bytearray()
        self.arrived = asyncio.Event()
        self.lost: BaseException | None = None

    def data_received(self, data: bytes) -> None:
        self.buffer.extend(data)
        self.arrived.set()

    def eof_received(self) -> bool:
        self.lost = ConnectionError("the server closed the connection")
        self.arrived.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("connection lost")
        self.arrived.set()
        self.owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        self.owner.resume_writing()

    def next_reply(self) -> tuple[int, str] | None:
        """The first complete reply in the buffer, removed from it; None if there is none."""
        offset, lines = 0, []
        while (end := self.buffer.find(b"\n", offset)) != -1:
            line = bytes(self.buffer[offset : end + 1])
            offset = end + 1
            if len(line) < 3 or not line[:3].isdigit():
                text = line.decode("utf-8", "replace").strip()
                raise SMTPResponseException(-1, f"Malformed SMTP response line: {text}")
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del self.buffer[:offset]
                text = b"\n".join(lines).decode("utf-8", "surrogateescape")
                return int(line[:3]), text
        if len(self.buffer) > 1024 * 1024:
            raise SMTPResponseException(-1, "Response too long")
        return None

    async def read(self, seconds: float) -> tuple[int, str]:
        while (reply := self.next_reply()) is None:
            if self.lost is not None:
                raise self.lost
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), seconds)
        return reply


async def pipeline(
    protocol: SMTPProtocol, commands: list[bytes], seconds: float
) -> list[tuple[int, str]]:
    """Writes `commands` (each a line without CRLF) in one flight and reads one reply per
    command, in order, each within `seconds`; raises on a lost connection or a timeout.

    Every reply the server sent before a failure is lost with it: the caller treats the flight
    as unanswered (nothing is delivered before the reply to the final dot, so retrying all of
    it repeats nothing)."""
    # A WriteTransport by behaviour; uvloop's are not registered as its subclasses.
    transport = cast(asyncio.WriteTransport | None, protocol.transport)
    if transport is None or transport.is_closing():
        raise ConnectionError("connection lost")
    reader = _FlightReader(protocol)
    transport.set_protocol(reader)
    try:
        transport.write(b"".join(command + b"\r\n" for command in commands))
        return [await reader.read(seconds) for _ in commands]
    finally:
        if reader.lost is None:
            transport.set_protocol(protocol)
