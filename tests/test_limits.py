"""Limits over real sockets: what one client, or all of them, may take; each refusal's reply and
metric reason; and that a well-behaved client is still served while others hit the limits.

Distinct client hosts are distinct loopback addresses (127.0.0.x). Every test ends by checking
that no connection slot, session or DATA byte was left held.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from conftest import DOMAIN, Conversation, conversation, dot_stuff, make_config, smtp_address
from hostile import (
    SIMPLE,
    closes,
    deliver,
    eventually,
    greeting,
    open_connections,
    rejected,
    slots_free,
    stored_count,
)

from relay.ops import metrics
from relay.service import Relay
from relay.smtp.limits import Limits, client_key

RelayFactory = Callable[..., Awaitable[Relay]]
WELL_BEHAVED = "127.0.0.1"


async def served(server: Relay) -> str:
    """A well-behaved client from its own address sends one message; the 250 text."""
    async with conversation(smtp_address(server), source=WELL_BEHAVED) as talk:
        await talk.ehlo()
        return await deliver(talk)


# -- connections ------------------------------------------------------------------------------


async def test_connections_over_the_per_client_limit_get_421_while_other_clients_are_served(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(smtp={"max_connections_per_ip": 3})
    address = smtp_address(server)
    before = rejected("max_connections_per_ip")
    held = [await Conversation.open(address, source="127.0.0.5") for _ in range(3)]
    try:
        line, closed = await greeting(address, source="127.0.0.5")
        assert line == "421 4.7.0 relay.test Error: too many connections from [127.0.0.5]"
        assert closed
        assert rejected("max_connections_per_ip") == before + 1
        assert "queued as" in await served(server)
        await held.pop().close()
        await eventually(lambda: server.limits.per_client["127.0.0.5"] == 2, "a slot back")
        line, _ = await greeting(address, source="127.0.0.5")
        assert line.startswith("220 ")
    finally:
        for talk in held:
            await talk.close()
    await eventually(lambda: slots_free(server), "every slot back")


async def test_connections_over_the_total_get_421_and_the_slots_come_back(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(smtp={"max_connections": 4})
    address = smtp_address(server)
    before = rejected("max_connections")
    held = [await Conversation.open(address, source=f"127.0.0.{11 + n}") for n in range(4)]
    try:
        line, closed = await greeting(address, source="127.0.0.20")
        assert line == "421 4.7.0 relay.test Error: too many connections, try again later"
        assert closed
        assert rejected("max_connections") == before + 1
    finally:
        for talk in held:
            await talk.close()
    await eventually(lambda: slots_free(server), "every slot back")
    assert "queued as" in await served(server)


async def test_a_connection_flood_from_one_host_leaves_a_well_behaved_client_served(
    relay_factory: RelayFactory,
) -> None:
    """200 connections at once from one host: 10 get in, the rest 421; mail still flows."""
    server = await relay_factory(smtp={"max_connections_per_ip": 10, "max_connections": 50})
    address = smtp_address(server)
    baseline = open_connections()

    answered: list[str] = []
    all_answered = asyncio.Event()

    async def flood_one() -> str:
        """Holds its connection until every flooder has its first line: all 200 at once."""
        code = "reset"
        with contextlib.suppress(ConnectionError):
            reader, writer = await asyncio.open_connection(*address, local_addr=("127.0.0.7", 0))
            try:
                code = (await reader.readline()).decode()[:3]
                answered.append(code)
                if len(answered) == 200:
                    all_answered.set()
                await asyncio.wait_for(all_answered.wait(), 15)
            finally:
                writer.close()
            return code
        answered.append(code)
        if len(answered) == 200:
            all_answered.set()
        return code

    flood = [asyncio.create_task(flood_one()) for _ in range(200)]
    replies = await asyncio.gather(served(server), served(server), *flood)
    assert all("queued as" in reply for reply in replies[:2])
    codes = replies[2:]
    assert set(codes) <= {"220", "421", "reset"}
    assert codes.count("220") > 0 and codes.count("421") >= 100
    await eventually(lambda: slots_free(server), "every slot back")
    await eventually(lambda: open_connections() == baseline, "relay_smtp_connections back")
    assert stored_count(server) == 2


async def test_a_port_probe_gives_its_connection_slot_back_at_once(
    relay_factory: RelayFactory,
) -> None:
    """Connect and close before the banner (monitoring checks, port scanners): the slot comes
    back at once, not after the command timeout, or a few probes lock a client out."""
    server = await relay_factory(smtp={"max_connections_per_ip": 1, "command_timeout": 300})
    address = smtp_address(server)
    baseline = open_connections()
    accepted = metrics.REGISTRY.get_sample_value("relay_smtp_connections_total") or 0
    for _ in range(3):
        # Blocking, on purpose: connect and close are both in before the relay's loop runs, so
        # the close arrives before the session's command loop has started.
        socket.create_connection(address).close()
    await eventually(
        lambda: metrics.REGISTRY.get_sample_value("relay_smtp_connections_total") == accepted + 3,
        "the probes taken in",
    )
    await eventually(lambda: slots_free(server), "every slot back")
    await eventually(lambda: open_connections() == baseline, "relay_smtp_connections back")
    assert "queued as" in await served(server)


# -- per session and per minute ---------------------------------------------------------------


async def test_the_message_after_max_messages_per_session_gets_421_and_the_session_ends(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(smtp={"max_messages_per_session": 2})
    before = rejected("max_messages")
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        await deliver(talk)
        await deliver(talk)
        reply = await talk.command("MAIL FROM:<sender@client.test>")
        assert reply.text == "421 4.7.0 relay.test Error: too many messages in one session"
        assert await closes(talk.reader)
    assert rejected("max_messages") == before + 1
    assert stored_count(server) == 2
    assert "queued as" in await served(server)  # a new session starts counting afresh


async def test_messages_over_the_rate_per_client_get_421_and_other_clients_are_unaffected(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(smtp={"rate_per_ip": 3})
    before = rejected("rate_per_ip")
    async with conversation(smtp_address(server), source="127.0.0.8") as talk:
        await talk.ehlo()
        for _ in range(3):
            await deliver(talk)
        reply = await talk.command("MAIL FROM:<sender@client.test>")
        assert reply.text == (
            "421 4.7.0 relay.test Error: too many messages from [127.0.0.8], slow down"
        )
        assert await closes(talk.reader)
    async with conversation(smtp_address(server), source="127.0.0.8") as talk:
        await talk.ehlo()
        reply = await talk.command("MAIL FROM:<sender@client.test>")
        assert reply.code == 421  # the minute is not over: a new connection does not help
    assert rejected("rate_per_ip") == before + 2
    assert "queued as" in await served(server)
    assert stored_count(server) == 4


def test_the_rate_window_slides_and_ipv6_clients_count_by_their_64(tmp_path: Path) -> None:
    now = [1000.0]
    config = make_config(tmp_path, smtp={"rate_per_ip": 2})
    limits = Limits(lambda: config, clock=lambda: now[0], free_space=lambda: None)

    class Session:
        messages = 0
        slot: str | None = None

        def __init__(self, ip: str) -> None:
            self.client_ip = ip

    a, b = Session("2001:db8::1"), Session("2001:db8::ffff:2")
    assert limits.mail(a) is None and limits.mail(b) is None
    refusal = limits.mail(Session("2001:db8:0:0:1::3"))
    assert refusal is not None and refusal.reason == "rate_per_ip"
    assert limits.mail(Session("2001:db8:0:1::1")) is None  # another /64
    now[0] += 59.0
    assert limits.mail(a) is not None
    now[0] += 1.5
    assert limits.mail(a) is None  # the first two left the window
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("192.0.2.7") == "192.0.2.7"


# -- command lines and timeouts ---------------------------------------------------------------


async def test_an_overlong_command_line_gets_500_5_5_2_and_the_session_goes_on(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(smtp={"max_line_length": 512})
    before = rejected("line_too_long")
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        reply = await talk.command(b"NOOP " + b"x" * 600)
        assert reply.text == "500 5.5.2 Error: command line too long"
        reply = await talk.command(b"MAIL FROM:<" + b"a" * 5000 + b"@client.test>")
        assert reply.text == "500 5.5.2 Error: command line too long"
        assert (await talk.command("NOOP")).code == 250
        await deliver(talk)
    assert rejected("line_too_long") == before + 2


async def test_an_idle_client_gets_421_at_the_command_timeout_and_others_are_served(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(smtp={"command_timeout": "0.5s"})
    before = rejected("command_timeout")
    async with conversation(smtp_address(server), source="127.0.0.9") as idle:
        await idle.ehlo()
        assert "queued as" in await served(server)
        reply = await idle.reply()  # nothing sent: the server speaks first, then hangs up
        assert reply.text == "421 4.4.2 relay.test Error: timeout exceeded"
        assert await closes(idle.reader)
    assert rejected("command_timeout") == before + 1
    await eventually(lambda: slots_free(server), "the idle client's slot back")


async def test_a_client_dripping_a_command_byte_by_byte_is_cut_at_the_command_timeout(
    relay_factory: RelayFactory,
) -> None:
    """Slowloris: bytes keep coming, but a command that never ends does not reset the timer."""
    server = await relay_factory(smtp={"command_timeout": "0.5s"})
    async with conversation(smtp_address(server), source="127.0.0.9") as slow:
        await slow.ehlo()

        async def drip() -> None:
            with contextlib.suppress(ConnectionError):
                while True:
                    await slow.send(b"x")
                    await asyncio.sleep(0.05)

        dripping = asyncio.create_task(drip())
        try:
            assert "queued as" in await served(server)
            reply = await slow.reply()
            assert reply.text == "421 4.4.2 relay.test Error: timeout exceeded"
        finally:
            dripping.cancel()
            await asyncio.gather(dripping, return_exceptions=True)
    await eventually(lambda: slots_free(server), "the slow client's slot back")


async def test_a_client_stalling_in_data_is_cut_at_the_data_timeout_and_nothing_is_stored(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(smtp={"data_timeout": "0.5s", "command_timeout": "30s"})
    before = rejected("data_timeout")
    async with conversation(smtp_address(server), source="127.0.0.9") as slow:
        await slow.ehlo()
        await slow.command("MAIL FROM:<sender@client.test>")
        await slow.command(f"RCPT TO:<rcpt@{DOMAIN}>")
        assert (await slow.command("DATA")).code == 354
        await slow.send(b"Subject: never finished\r\n\r\nhalf a line")
        assert "queued as" in await served(server)
        reply = await slow.reply()
        assert reply.text == "421 4.4.2 relay.test Error: timeout exceeded"
        assert await closes(slow.reader)
    assert rejected("data_timeout") == before + 1
    assert stored_count(server) == 1  # the well-behaved client's only
    await eventually(lambda: slots_free(server), "the slow client's slot back")


async def test_a_slow_but_steady_client_is_not_cut_while_data_keeps_coming(
    relay_factory: RelayFactory,
) -> None:
    """data_timeout bounds the silence between reads, not the length of a transfer, for a client
    that keeps up smtp.min_data_rate (here 160 bytes/s against a minimum of 100; a trickle below
    the minimum runs out of time: tests/test_door.py)."""
    server = await relay_factory(smtp={"data_timeout": "0.5s", "min_data_rate": 100})
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        await talk.command("MAIL FROM:<sender@client.test>")
        await talk.command(f"RCPT TO:<rcpt@{DOMAIN}>")
        await talk.command("DATA")
        wire = dot_stuff(SIMPLE + b"".join(b"line %d\r\n" % n for n in range(8)))
        for start in range(0, len(wire), 16):
            await talk.send(wire[start : start + 16])
            await asyncio.sleep(0.1)  # paced like a slow link; 1 s in all, twice the timeout
        assert (await talk.reply()).code == 250


# -- memory and disk --------------------------------------------------------------------------


async def test_data_over_the_in_flight_budget_gets_451_and_the_budget_comes_back(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(smtp={"max_inflight_bytes": "200K"})
    address = smtp_address(server)
    before = rejected("inflight_bytes")
    big = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
    async with conversation(address, source="127.0.0.10") as hog:
        # One client holds 150K of an unfinished message…
        await hog.ehlo()
        await hog.command("MAIL FROM:<sender@client.test>")
        await hog.command(f"RCPT TO:<rcpt@{DOMAIN}>")
        await hog.command("DATA")
        await hog.send(big * 150)
        await eventually(lambda: server.limits.inflight_bytes >= 150_000, "150K in flight")
        # …so another one's 100K message is over the total: 451 after its dot, not stored.
        async with conversation(address) as talk:
            await talk.ehlo()
            await talk.command("MAIL FROM:<sender@client.test>")
            await talk.command(f"RCPT TO:<rcpt@{DOMAIN}>")
            await talk.command("DATA")
            await talk.send(dot_stuff(big * 100))
            reply = await talk.reply()
            assert reply.text == "451 4.3.1 Insufficient system resources, try again later"
            assert (await talk.command("NOOP")).code == 250  # the session goes on
            await hog.send(b".\r\n")
            assert (await hog.reply()).code == 250
            await eventually(lambda: server.limits.inflight_bytes == 0, "the budget back")
            await deliver(talk, content=big * 100)  # the retry fits now
    assert rejected("inflight_bytes") == before + 1
    assert stored_count(server) == 2
    await eventually(lambda: slots_free(server), "every slot and byte back")


async def test_a_client_vanishing_mid_data_gives_its_bytes_back(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory()
    talk = await Conversation.open(smtp_address(server))
    await talk.ehlo()
    await talk.command("MAIL FROM:<sender@client.test>")
    await talk.command(f"RCPT TO:<rcpt@{DOMAIN}>")
    await talk.command("DATA")
    await talk.send(b"Subject: gone\r\n\r\n" + b"y" * 100_000)
    await eventually(lambda: server.limits.inflight_bytes > 0, "bytes in flight")
    talk.writer.transport.abort()  # RST, mid-message
    await eventually(lambda: slots_free(server), "the slot and the bytes back")
    assert stored_count(server) == 0


async def test_below_min_free_space_mail_from_gets_452_before_any_data(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(queue={"min_free_space": "1000T"})  # more than any disk here
    before = rejected("low_disk_space")
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        reply = await talk.command("MAIL FROM:<sender@client.test>")
        assert reply.text == "452 4.3.1 Insufficient system storage, try again later"
        reply = await talk.command(f"RCPT TO:<rcpt@{DOMAIN}>")
        assert reply.code == 503  # no transaction was started
    assert rejected("low_disk_space") == before + 1
    assert stored_count(server) == 0


async def test_free_space_is_looked_up_once_per_commit_batch_not_per_mail_from(
    relay_factory: RelayFactory,
) -> None:
    """statvfs cost 4 % of the CPU when every MAIL FROM made one: MAILs between two commits
    share one answer, and a commit (which changed the disk) makes the next MAIL look again."""
    server = await relay_factory()
    lookups: list[int] = []
    real = server.limits.free_space

    def counted() -> int | None:
        lookups.append(1)
        return real()

    server.limits.free_space = counted
    talks = [await Conversation.open(smtp_address(server)) for _ in range(5)]
    try:
        for talk in talks:
            await talk.ehlo()
            assert (await talk.command("MAIL FROM:<sender@client.test>")).code == 250
        assert len(lookups) == 1  # five MAILs, no commit between them
        await deliver_rest(talks[0])
        assert (await talks[0].command("MAIL FROM:<sender@client.test>")).code == 250
        assert len(lookups) == 2  # the commit made the next MAIL look again
    finally:
        for talk in talks:
            await talk.close()


async def deliver_rest(talk: Conversation) -> None:
    assert (await talk.command(f"RCPT TO:<rcpt@{DOMAIN}>")).code == 250
    assert (await talk.command("DATA")).code == 354
    await talk.send(dot_stuff(SIMPLE))
    assert (await talk.reply()).code == 250
