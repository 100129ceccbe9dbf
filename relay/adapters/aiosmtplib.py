"""aiosmtplib, adapted: writing a message body as stored, on aiosmtplib's own protocol object.

Checked against aiosmtplib 5.1 (pinned to 5.x in pyproject.toml). aiosmtplib's own `data()`
rewrites bare CR and LF into CRLF, and a backup MX must hand over the bytes it stored, so the
body goes out on aiosmtplib's protocol object directly.
"""

from __future__ import annotations

import asyncio

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
