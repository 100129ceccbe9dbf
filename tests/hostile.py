"""Helpers for the tests of limits, recipient policy, TLS and bad input (relay.limits, .policy).

Raw clients that may be refused before the banner, waits on conditions with a deadline that do
not block the event loop the relay under test runs on, and the rejection counters by reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import DEADLINE, DOMAIN, Conversation, dot_stuff, open_store

from relay.ops import metrics
from relay.service import Relay

SIMPLE = b"From: <sender@client.test>\r\nSubject: hello\r\n\r\nHello.\r\n"


async def eventually(condition: Callable[[], Any], what: str, within: float = DEADLINE) -> Any:
    """Polls `condition` without blocking the loop (the relay runs on it) until it is true."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(0.01)


def rejected(reason: str) -> float:
    """relay_messages_rejected_total{reason}, read from the registry the endpoint serves."""
    value = metrics.REGISTRY.get_sample_value("relay_messages_rejected_total", {"reason": reason})
    return value or 0.0


def open_connections() -> float:
    return metrics.REGISTRY.get_sample_value("relay_smtp_connections") or 0.0


def slots_free(server: Relay) -> bool:
    """No session open, no connection slot and no DATA byte held: nothing leaked."""
    limits = server.limits
    return (
        not server.handler.sessions
        and limits.connections == 0
        and not limits.per_client
        and limits.inflight_bytes == 0
    )


async def greeting(address: tuple[str, int], source: str = "127.0.0.1") -> tuple[str, bool]:
    """Connects and reads the first line; (that line, whether the server then closed)."""
    reader, writer = await asyncio.open_connection(*address, local_addr=(source, 0))
    try:
        line = (await asyncio.wait_for(reader.readline(), DEADLINE)).decode().rstrip("\r\n")
        closed = line.startswith("421") and await closes(reader)
        return line, closed
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def closes(reader: asyncio.StreamReader, within: float = DEADLINE) -> bool:
    """Whether the server closes the connection (EOF) within `within`, ignoring what it sends."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def deliver(
    talk: Conversation,
    recipients: list[str] | None = None,
    content: bytes = SIMPLE,
    sender: str = "sender@client.test",
) -> str:
    """One whole transaction that must succeed; the reply text to the final dot."""
    reply = await talk.command(f"MAIL FROM:<{sender}>")
    assert reply.code == 250, reply
    for recipient in recipients or [f"rcpt@{DOMAIN}"]:
        reply = await talk.command(f"RCPT TO:<{recipient}>")
        assert reply.code == 250, reply
    reply = await talk.command("DATA")
    assert reply.code == 354, reply
    await talk.send(dot_stuff(content))
    final = await talk.reply()
    assert final.code == 250, final
    return final.text


def stored_count(server: Relay) -> int:
    with open_store(server.config.queue.path) as store:
        return len(store.list_messages())
