"""Hostile clients at the door (issue 14): addresses intake must refuse because delivery would.

An address the courier cannot write out, accepted with 250, comes back later as a DSN carrying
the attacker's body to a forged sender (backscatter), or, in MAIL FROM, as mail that is never
delivered. Each case here goes over a real socket to a running relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import pytest
from conftest import DEADLINE, DOMAIN, Conversation, conversation, open_store, smtp_address
from hostile import closes, deliver, eventually, rejected

from relay.delivery.courier import OutgoingRecipient, _recipient_problem
from relay.envelope import MAX_DOMAIN, MAX_LOCAL_PART, address_problem
from relay.ops import metrics
from relay.service import Relay

RelayFactory = Callable[..., Awaitable[Relay]]

CONTROLS = ["\x00", "\r", "\t", "\x7f", "\x1b", "\x01"]


def queued(server: Relay) -> int:
    with open_store(server.config.queue.path) as store:
        return len(store.list_messages())


@pytest.mark.parametrize("char", CONTROLS, ids=[f"0x{ord(c):02x}" for c in CONTROLS])
async def test_a_control_character_in_a_recipient_is_refused_at_rcpt(
    relay_server: Relay, char: str
) -> None:
    before = rejected("bad_recipient")
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        assert (await talk.command("MAIL FROM:<sender@client.test>")).code == 250
        reply = await talk.command(f"RCPT TO:<us{char}er@{DOMAIN}>".encode("latin-1"))
        # 501 when the address parses and cannot be carried, 553 when the parser had to
        # repair it (a TAB outside quotes splits it): refused either way, before any 250.
        assert reply.code in (501, 553) and reply.text[4:10] == "5.1.3 ", reply
        # The session goes on for the good recipients.
        assert (await talk.command(f"RCPT TO:<user@{DOMAIN}>")).code == 250
    assert rejected("bad_recipient") == before + 1
    assert queued(relay_server) == 0


@pytest.mark.parametrize("char", CONTROLS, ids=[f"0x{ord(c):02x}" for c in CONTROLS])
async def test_a_control_character_in_the_sender_is_refused_at_mail(
    relay_server: Relay, char: str
) -> None:
    before = rejected("bad_sender")
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        reply = await talk.command(f"MAIL FROM:<al{char}ice@client.test>".encode("latin-1"))
        assert reply.code in (501, 553) and reply.text[4:10] in ("5.1.7 ", "5.1.3 "), reply
        assert (await talk.command(f"RCPT TO:<user@{DOMAIN}>")).code == 503  # no MAIL yet
        await deliver(talk)  # a clean transaction on the same connection still works
    assert rejected("bad_sender") == before + 1


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (f"RCPT TO:<{'a' * (MAX_LOCAL_PART + 1)}@{DOMAIN}>", "501 5.1.3"),
        (f"RCPT TO:<user@{'a' * 63}.{'b' * 63}.{'c' * 63}.{'d' * 63}.{DOMAIN}>", "501 5.1.3"),
        (f"RCPT TO:<user@{DOMAIN}", "553 5.1.3"),  # no closing ">"
        (f'RCPT TO:<"us\ter"@{DOMAIN}>', "501 5.1.3"),  # a TAB, even quoted
    ],
    ids=["local-part-65", "domain-over-255", "missing-bracket", "tab-in-quotes"],
)
async def test_addresses_the_parser_would_repair_or_rfc_5321_forbids_are_refused(
    relay_factory: RelayFactory, line: str, reply: str
) -> None:
    server = await relay_factory(smtp={"max_line_length": 2048})
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        assert (await talk.command("MAIL FROM:<sender@client.test>")).code == 250
        answer = await talk.command(line)
    assert answer.text.startswith(reply), answer
    assert queued(server) == 0


async def test_a_source_route_is_still_accepted_and_dropped(relay_server: Relay) -> None:
    """RFC 5321 4.1.2: a server must accept the old source-route form and ignore the route."""
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        assert (await talk.command("MAIL FROM:<sender@client.test>")).code == 250
        assert (await talk.command(f"RCPT TO:<@hop.test:user@{DOMAIN}>")).code == 250


async def test_recipients_differing_in_local_part_case_are_both_kept(relay_server: Relay) -> None:
    """RFC 5321 2.4: local parts may be case-sensitive; a 250 is never silently dropped."""
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        reply = await deliver(talk, [f"Bob@{DOMAIN}", f"bob@{DOMAIN}", f"bob@{DOMAIN.upper()}"])
    queue_id = reply.rpartition(" ")[2]
    with open_store(relay_server.config.queue.path) as store:
        message = store.get(queue_id)
        assert message is not None
        addresses = sorted(r.address for r in message.recipients)
    assert addresses == [f"Bob@{DOMAIN}", f"bob@{DOMAIN}"]


@pytest.mark.parametrize(
    "address",
    [
        "user@example.test",
        "us\x00er@example.test",
        "us\x1ber@example.test",
        "us\u0085er@example.test",
        "j\udcf6rg@example.test",
        f"{'a' * 64}@example.test",
        f"{'a' * 65}@example.test",
        "\u00e9l\u00e8ve@\u00e9cole.test",
        f"user@{'a' * 256}",
    ],
)
def test_the_courier_refuses_exactly_what_intake_refuses(address: str) -> None:
    """One function decides for both: they can never disagree."""
    courier = _recipient_problem(OutgoingRecipient(address), utf8=True)
    assert (courier is None) == (address_problem(address) is None)
    if courier is not None:
        assert courier.local  # a refusal of ours, never "host … said" in a DSN
    assert (address_problem(f"user@{'a' * MAX_DOMAIN}") is None) is True


# -- slow clients (slowloris) -------------------------------------------------------------------


async def trickle_data(talk: Conversation, stop: asyncio.Event, pause: float = 0.3) -> str:
    """Opens DATA, then sends one byte every `pause` seconds until the server speaks or `stop`."""
    await talk.ehlo()
    assert (await talk.command("MAIL FROM:<slow@client.test>")).code == 250
    assert (await talk.command(f"RCPT TO:<user@{DOMAIN}>")).code == 250
    assert (await talk.command("DATA")).code == 354
    answer = asyncio.ensure_future(talk.reader.readline())
    try:
        while not stop.is_set():
            done, _ = await asyncio.wait({answer}, timeout=pause)
            if done:
                return answer.result().decode(errors="replace").strip()
            with contextlib.suppress(ConnectionError):
                await talk.send(b"x")
        return ""
    finally:
        answer.cancel()


async def noop_forever(talk: Conversation, stop: asyncio.Event, pause: float = 0.3) -> str:
    """NOOP every `pause` seconds: a session that does nothing but keep its slot."""
    await talk.ehlo()
    while not stop.is_set():
        reply = await talk.command("NOOP")
        if reply.code != 250:
            return reply.text
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)
    return ""


async def test_a_data_trickle_runs_out_of_time(relay_factory: RelayFactory) -> None:
    """One byte every 0.3 s used to re-arm data_timeout for ever; bytes now earn time only at
    smtp.min_data_rate, so the session ends near data_timeout after DATA began."""
    server = await relay_factory(smtp={"data_timeout": "2s", "min_data_rate": 500})
    before = rejected("data_timeout")
    stop = asyncio.Event()
    async with conversation(smtp_address(server)) as talk:
        started = time.monotonic()
        line = await asyncio.wait_for(trickle_data(talk, stop), DEADLINE)
    assert line.startswith("421 4.4.2 "), line
    assert time.monotonic() - started < 2 + 3  # 2 s and what ~10 bytes earn, plus scheduling
    assert rejected("data_timeout") == before + 1
    assert queued(server) == 0


async def test_junk_commands_beyond_the_limit_end_the_session(relay_factory: RelayFactory) -> None:
    server = await relay_factory(smtp={"max_junk_commands": 3})
    before = rejected("junk_commands")
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        for verb in ("NOOP", "RSET", "HELP"):
            assert (await talk.command(verb)).code in (250, 214), verb
        refused = await talk.command("NOOP")
        assert refused.text == (
            "421 4.7.0 relay.test Error: too many NOOP, RSET, VRFY, EXPN or HELP commands"
        )
        assert await closes(talk.reader)
    assert rejected("junk_commands") == before + 1


async def test_200_slow_clients_do_not_lock_out_a_good_one(relay_factory: RelayFactory) -> None:
    """200 slow clients from 10 addresses take every slot (half trickling DATA, half sending
    NOOPs). Over 80 % of the slots in use is stress: timeouts drop to smtp.stress_timeout and
    junk no longer keeps a session alive, so a good client (retrying on 421, as MTAs do) gets
    its mail accepted within seconds, not after the 10-minute data_timeout."""
    server = await relay_factory(
        smtp={
            "max_connections": 200,
            "max_connections_per_ip": 20,
            "stress_timeout": "1s",
            "max_junk_commands": 1000,
        }
    )
    address = smtp_address(server)
    stop = asyncio.Event()
    slow = [await Conversation.open(address, source=f"127.0.0.{11 + n // 20}") for n in range(200)]
    work = [
        asyncio.ensure_future((trickle_data if n % 2 else noop_forever)(talk, stop))
        for n, talk in enumerate(slow)
    ]
    try:
        await eventually(lambda: len(server.handler.sessions) == 200, "200 slow sessions")
        assert metrics.REGISTRY.get_sample_value("relay_smtp_stress") == 1
        started = time.monotonic()
        queue_id = None
        while queue_id is None and time.monotonic() - started < 10:
            reader, writer = await asyncio.open_connection(*address, local_addr=("127.0.0.100", 0))
            talk = Conversation(reader, writer)
            try:
                with contextlib.suppress(ConnectionError):
                    if (await talk.reply()).code == 220:  # not a 421: every slot taken
                        await talk.ehlo()
                        queue_id = (await deliver(talk)).rpartition(" ")[2]
            finally:
                await talk.close()
            if queue_id is None:
                await asyncio.sleep(0.2)  # an MTA's retry, much compressed
        assert queue_id is not None, "the good client never got in"
        assert time.monotonic() - started < 10
    finally:
        stop.set()
        await asyncio.gather(*work, return_exceptions=True)
        for talk in slow:
            await talk.close()
    with open_store(server.config.queue.path) as store:
        assert [m.id for m in store.list_messages()] == [queue_id]  # no trickle was stored
