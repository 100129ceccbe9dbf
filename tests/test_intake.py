"""SMTP intake over real sockets: what a backup MX accepts, refuses, and stores byte for byte.

Each test starts a real Relay in-process on 127.0.0.1 (an ephemeral port) and talks to it with a
raw client (`Conversation`, exact bytes) or smtplib. "Stored" always means read back from the
queue database through `relay.store.Store`, as the CLI would.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given
from hypothesis import strategies as st

from relay.adapters.aiosmtpd import parse_address
from relay.service import Relay
from relay.smtp.intake import RelaySMTP
from relay.store import MessageRow, NewMessage, StorageError
from tests.conftest import (
    DOMAIN,
    HOSTNAME,
    Conversation,
    Reply,
    conversation,
    dot_stuff,
    metrics_url,
    open_store,
    sample,
    scrape,
    send_mail,
    smtp_address,
    split_trace,
)

RelayFactory = Callable[..., Awaitable[Relay]]

SIMPLE = b"From: <sender@client.test>\r\nSubject: hello\r\n\r\nHello.\r\n"


def stored(server: Relay, queue_id: str) -> tuple[MessageRow, bytes]:
    with open_store(server.config.queue.path) as store:
        row = store.get(queue_id)
        body = store.body(queue_id)
    assert row is not None and body is not None, f"{queue_id} is not in the queue"
    return row, body


def queue_ids(server: Relay) -> list[str]:
    with open_store(server.config.queue.path) as store:
        return [row.id for row in store.list_messages()]


def split_received(body: bytes) -> tuple[str, bytes]:
    """(our Received header as text, the message as it came: after our trace headers)."""
    received, _, rest = split_trace(body)
    return received.decode("utf-8"), rest


async def transaction(
    talk: Conversation,
    recipients: list[str],
    content: bytes = SIMPLE,
    *,
    sender: str = "sender@client.test",
    mail_params: str = "",
) -> Reply:
    """MAIL, RCPT…, DATA and the content (dot-stuffed here); the reply to the final dot."""
    reply = await talk.command(f"MAIL FROM:<{sender}>{mail_params}")
    assert reply.code == 250, reply
    for recipient in recipients:
        reply = await talk.command(f"RCPT TO:<{recipient}>")
        assert reply.code == 250, reply
    reply = await talk.command("DATA")
    assert reply.code == 354, reply
    await talk.send(dot_stuff(content))
    return await talk.reply()


# -- the listener and the greeting ------------------------------------------------------------


async def test_listening_on_port_zero_reports_the_port_actually_bound(relay_server: Relay) -> None:
    host, port = smtp_address(relay_server)
    assert (host, port) != ("127.0.0.1", 0) and port > 0
    async with conversation((host, port)) as talk:
        assert talk.banner is not None
        assert talk.banner.text == f"220 {HOSTNAME} ESMTP relay"


async def test_ehlo_advertises_the_extensions_a_backup_mx_needs(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(smtp={"max_message_size": "10M"})
    async with conversation(smtp_address(server)) as talk:
        reply = await talk.ehlo("client.test")
    assert reply.lines[0] == f"250-{HOSTNAME}"
    keywords = [line[4:] for line in reply.lines[1:]]
    for extension in ("8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES", "DSN"):
        assert extension in keywords
    assert f"SIZE {10 * 1024 * 1024}" in keywords


# -- relaying: our domains only ---------------------------------------------------------------

ACCEPTED = "250 2.1.5 Ok"
RELAY_MATRIX = [
    (f"user@{DOMAIN}", ACCEPTED),
    (f"user@{DOMAIN.upper()}", ACCEPTED),
    ("Mixed.Case@Example.Test", ACCEPTED),
    ("user@other.test", "550 5.7.1 <user@other.test>: Relay access denied"),
    (f"user@sub.{DOMAIN}", f"550 5.7.1 <user@sub.{DOMAIN}>: Relay access denied"),
    (f"user@{DOMAIN}.evil.test", f"550 5.7.1 <user@{DOMAIN}.evil.test>: Relay access denied"),
    ("user@test", "550 5.7.1 <user@test>: Relay access denied"),
    ("user@localhost", "550 5.7.1 <user@localhost>: Relay access denied"),
    ("postmaster@other.test", "550 5.7.1 <postmaster@other.test>: Relay access denied"),
    ("user@[127.0.0.1]", "550 5.7.1 <user@[127.0.0.1]>: Relay access denied"),
    ("user@[IPv6:::1]", "550 5.7.1 <user@[IPv6:::1]>: Relay access denied"),
    # An RFC 5321 source route is ignored (C.): what is left is judged on its own domain.
    (f"@{DOMAIN}:user@other.test", "550 5.7.1 <user@other.test>: Relay access denied"),
]


@pytest.mark.parametrize("client", ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.254.0.9"])
async def test_only_configured_domains_are_accepted_from_every_client(
    relay_server: Relay, client: str
) -> None:
    async with conversation(smtp_address(relay_server), source=client) as talk:
        await talk.ehlo()
        assert (await talk.command("MAIL FROM:<sender@client.test>")).code == 250
        replies = [
            (rcpt, (await talk.command(f"RCPT TO:<{rcpt}>")).text) for rcpt, _ in RELAY_MATRIX
        ]
    assert replies == RELAY_MATRIX


async def test_a_recipient_without_a_domain_is_refused_as_bad_syntax(relay_server: Relay) -> None:
    # RFC 5321 4.1.2: a Mailbox is Local-part "@" Domain. A bare local part is not relayed
    # anywhere; it is refused permanently as bad destination syntax (RFC 3463 5.1.3).
    async with conversation(smtp_address(relay_server), source="127.0.0.2") as talk:
        await talk.ehlo()
        await talk.command("MAIL FROM:<sender@client.test>")
        assert (
            await talk.command("RCPT TO:<user>")
        ).text == "501 5.1.3 Bad recipient address syntax"
        assert (await talk.command("RCPT TO:<user@>")).code == 553


@pytest.mark.parametrize(
    "address",
    [
        f"user%other.test@{DOMAIN}",
        f"other.test!user@{DOMAIN}",
        f'"user@other.test"@{DOMAIN}',
    ],
)
async def test_sender_specified_routing_through_our_domain_is_refused(
    relay_server: Relay, address: str
) -> None:
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        await talk.command("MAIL FROM:<sender@client.test>")
        reply = await talk.command(f"RCPT TO:<{address}>")
    assert reply.text == f"550 5.7.1 <{address}>: sender-specified routing is not accepted"


async def test_recipients_beyond_max_recipients_get_452_and_the_rest_are_queued(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(smtp={"max_recipients": 3})
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        await talk.command("MAIL FROM:<sender@client.test>")
        replies = [(await talk.command(f"RCPT TO:<r{i}@{DOMAIN}>")).text for i in range(5)]
        assert replies == [ACCEPTED] * 3 + ["452 4.5.3 Error: too many recipients"] * 2
        assert (await talk.command("DATA")).code == 354
        await talk.send(dot_stuff(SIMPLE))
        reply = await talk.reply()
    assert reply.code == 250
    row, _ = stored(server, reply.queue_id)
    assert [r.address for r in row.recipients] == [f"r{i}@{DOMAIN}" for i in range(3)]


async def test_a_repeated_recipient_is_queued_once(relay_server: Relay) -> None:
    """The same address twice, its domain in any case. (A local part in another case is
    another mailbox: tests/test_door.py.)"""
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        reply = await transaction(talk, [f"bob@{DOMAIN}", f"bob@{DOMAIN.upper()}", f"bob@{DOMAIN}"])
    row, _ = stored(relay_server, reply.queue_id)
    assert [r.address for r in row.recipients] == [f"bob@{DOMAIN}"]


# -- size -------------------------------------------------------------------------------------

LIMIT = 10 * 1024


def message_of_size(size: int) -> bytes:
    """A message of exactly `size` octets in lines of at most 80, ending in CRLF."""
    head = b"Subject: size test\r\n\r\n"
    lines, left = [head], size - len(head)
    while left > 0:
        take = 79 if left == 81 else min(80, left)  # never leave a 1-octet remainder
        lines.append(b"x" * (take - 2) + b"\r\n")
        left -= take
    message = b"".join(lines)
    assert len(message) == size
    return message


async def test_size_declared_over_the_limit_is_refused_at_mail(relay_factory: RelayFactory) -> None:
    server = await relay_factory(smtp={"max_message_size": LIMIT})
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        over = await talk.command(f"MAIL FROM:<sender@client.test> SIZE={LIMIT + 1}")
        at = await talk.command(f"MAIL FROM:<sender@client.test> SIZE={LIMIT}")
    assert over.text == "552 5.3.4 Message size exceeds fixed limit"
    assert at.text == "250 2.1.0 Ok"


async def test_data_over_the_limit_is_refused_and_nothing_is_stored(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(smtp={"max_message_size": LIMIT})
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        too_big = await transaction(talk, [f"bob@{DOMAIN}"], message_of_size(LIMIT + 1))
        big_stream = await transaction(talk, [f"bob@{DOMAIN}"], message_of_size(20 * LIMIT))
        # The session goes on: a message of exactly the limit is accepted on the same connection.
        just_fits = await transaction(talk, [f"bob@{DOMAIN}"], message_of_size(LIMIT))
    assert too_big.text == "552 5.3.4 Message size exceeds fixed limit"
    assert big_stream.text == "552 5.3.4 Message size exceeds fixed limit"
    assert just_fits.code == 250
    assert queue_ids(server) == [just_fits.queue_id]
    _, body = stored(server, just_fits.queue_id)
    assert split_received(body)[1] == message_of_size(LIMIT)


@pytest.mark.parametrize("split", [1, 2])
async def test_a_message_at_the_limit_is_not_truncated_when_its_final_dot_arrives_apart(
    relay_factory: RelayFactory, split: int
) -> None:
    """The size check must not trim a message whose terminator reaches us in two reads.

    TCP decides where reads split, so this drives the DATA reader of a real RelaySMTP with a
    StreamReader fed in two parts: the message and the start of ".\\r\\n", then the rest.
    """
    server = await relay_factory(smtp={"max_message_size": LIMIT})
    protocol = RelaySMTP(server.handler, hostname=HOSTNAME, data_size_limit=LIMIT)
    reader = asyncio.StreamReader()
    protocol._reader = reader
    content = message_of_size(LIMIT)
    wire = dot_stuff(content)
    reader.feed_data(wire[: len(content) + split])
    reading = asyncio.create_task(protocol._read_data())
    for _ in range(1000):  # until the reader has taken the first part and waits for more
        if reading.done() or not reader._buffer:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0)
    reader.feed_data(wire[len(content) + split :] + b"QUIT\r\n")
    try:
        assert await asyncio.wait_for(reading, 5) == content
    finally:
        if protocol._timeout_handle is not None:
            protocol._timeout_handle.cancel()
    assert await reader.readline() == b"QUIT\r\n"


# -- the trace header and loops ---------------------------------------------------------------


async def test_received_header_names_helo_client_host_protocol_queue_id_recipient_and_date(
    relay_server: Relay,
) -> None:
    before = time.time()
    async with conversation(smtp_address(relay_server), source="127.0.0.2") as talk:
        await talk.ehlo("sender-host.client.test")
        reply = await transaction(talk, [f"alice@{DOMAIN}"])
    after = time.time()
    assert reply.text == f"250 2.0.0 Ok: queued as {reply.queue_id}"
    _, body = stored(relay_server, reply.queue_id)
    header, rest = split_received(body)
    assert rest == SIMPLE
    match = re.fullmatch(
        r"Received: from sender-host\.client\.test \(\[127\.0\.0\.2\]\)\r\n"
        rf"\tby {re.escape(HOSTNAME)} \(relay\) with ESMTP id {reply.queue_id}\r\n"
        rf"\tfor <alice@{re.escape(DOMAIN)}>; (?P<date>[^\r\n]+)\r\n",
        header,
    )
    assert match, header
    date = parsedate_to_datetime(match["date"]).timestamp()
    assert int(before) <= date <= after


async def test_received_header_for_several_recipients_names_none_of_them(
    relay_server: Relay,
) -> None:
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo("client.test")
        reply = await transaction(talk, [f"alice@{DOMAIN}", f"bob@{DOMAIN}"])
    header, _ = split_received(stored(relay_server, reply.queue_id)[1])
    assert re.fullmatch(
        r"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
        rf"\tby {re.escape(HOSTNAME)} \(relay\) with ESMTP id {reply.queue_id}; [^\r\n]+\r\n",
        header,
    ), header
    assert "alice" not in header and "bob" not in header


async def test_received_header_says_smtp_after_helo_and_cleans_a_hostile_helo(
    relay_server: Relay,
) -> None:
    async with conversation(smtp_address(relay_server)) as talk:
        assert (await talk.command("HELO evil(host)\x7f")).code == 250
        reply = await transaction(talk, [f"alice@{DOMAIN}"])
    header, _ = split_received(stored(relay_server, reply.queue_id)[1])
    assert header.startswith("Received: from evil?host?? ([127.0.0.1])\r\n")
    assert f" with SMTP id {reply.queue_id}\r\n" in header


def with_received(count: int) -> bytes:
    trace = b"".join(
        b"Received: from hop%d.test by hop%d.test;\r\n\tMon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i)
        for i in range(count)
    )
    return trace + b"Subject: loop\r\n\r\nReceived: in the body does not count\r\n"


async def test_max_hops_received_headers_pass_and_one_more_is_a_loop(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(smtp={"max_hops": 3})
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        at_limit = await transaction(talk, [f"bob@{DOMAIN}"], with_received(3))
        looping = await transaction(talk, [f"bob@{DOMAIN}"], with_received(4))
        mixed_case = await transaction(
            talk, [f"bob@{DOMAIN}"], b"RECEIVED: x\r\nreceived : y\r\n" + with_received(2)
        )
    assert at_limit.code == 250
    assert looping.text == "554 5.4.6 Too many hops: mail forwarding loop"
    assert mixed_case.text == "554 5.4.6 Too many hops: mail forwarding loop"
    assert queue_ids(server) == [at_limit.queue_id]


# -- bytes kept exactly -----------------------------------------------------------------------

EIGHT_BIT = (
    b"From: =?utf-8?q?J=C3=B6rg?= <jorg@client.test>\r\n"
    b"Subject: caf\xc3\xa9 \xe9t\xe9 (latin-1 and utf-8 mixed)\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + bytes(range(0x80, 0x100)) + b"\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"the line above is a lone dot; this one has a bare\nLF and a bare\rCR\r\n"
    b"NUL\x00 and trailing spaces   \r\n" + b"y" * 5000 + b"\r\n"
    b"\r\n"
    b"\r\n"
    b"the end\r\n"
)


async def test_an_8bit_message_is_stored_byte_for_byte(relay_server: Relay) -> None:
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        reply = await transaction(talk, [f"bob@{DOMAIN}"], EIGHT_BIT, mail_params=" BODY=8BITMIME")
    assert reply.code == 250, reply
    row, body = stored(relay_server, reply.queue_id)
    received, results, rest = split_trace(body)
    assert rest == EIGHT_BIT
    assert body == received + results + EIGHT_BIT
    assert row.eightbit and not row.smtputf8
    assert row.size == len(body)


async def test_an_smtputf8_message_keeps_its_utf8_addresses_and_bytes(relay_server: Relay) -> None:
    sender = "jörg.müller@bücher.test"
    recipient = f"zoë.ñandú@{DOMAIN}"
    content = (
        f"From: {sender}\r\nTo: {recipient}\r\nSubject: grüße ✓ 日本語\r\n\r\n"
        "..leading dot, then emoji 📬\r\n"
    ).encode()
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        reply = await transaction(
            talk, [recipient], content, sender=sender, mail_params=" SMTPUTF8 BODY=8BITMIME"
        )
    assert reply.code == 250, reply
    row, body = stored(relay_server, reply.queue_id)
    header, rest = split_received(body)
    assert rest == content
    assert row.sender == sender
    assert [r.address for r in row.recipients] == [recipient]
    assert row.smtputf8 and row.eightbit
    assert f" with UTF8SMTP id {reply.queue_id}\r\n" in header
    assert f"\tfor <{recipient}>; " in header


async def test_utf8_addresses_without_smtputf8_are_refused(relay_server: Relay) -> None:
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        mail = await talk.command("MAIL FROM:<jörg@bücher.test>")
        assert (await talk.command("MAIL FROM:<jorg@client.test>")).code == 250
        rcpt = await talk.command(f"RCPT TO:<zoë@{DOMAIN}>")
    assert mail.text == "553 5.6.7 Non-ASCII address requires SMTPUTF8"
    assert rcpt.text == "553 5.6.7 Non-ASCII address requires SMTPUTF8"


async def test_an_empty_message_is_stored_as_just_the_trace_header(relay_server: Relay) -> None:
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        reply = await transaction(talk, [f"bob@{DOMAIN}"], b"")
    _, body = stored(relay_server, reply.queue_id)
    assert split_received(body)[1] == b""


async def test_long_command_lines_are_accepted_up_to_max_line_length(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(smtp={"max_line_length": 1024})
    orcpt = "rfc822;" + "o" * 90
    rcpt = f"RCPT TO:<{'l' * 64}@{DOMAIN}> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT={orcpt}"
    padded = rcpt + " " * (1000 - len(rcpt))
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        await talk.command("MAIL FROM:<sender@client.test>")
        fits = await talk.command(padded)
        too_long = await talk.command(padded + " " * 100)
    assert fits.text == ACCEPTED
    assert too_long.text == "500 5.5.2 Error: command line too long"


# -- pipelining -------------------------------------------------------------------------------


async def test_pipelined_commands_get_their_replies_in_order(relay_server: Relay) -> None:
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        await talk.send(
            b"MAIL FROM:<sender@client.test>\r\n"
            b"RCPT TO:<alice@example.test>\r\n"
            b"RCPT TO:<mallory@other.test>\r\n"
            b"RCPT TO:<bob@example.test>\r\n"
            b"DATA\r\n"
        )
        replies = await talk.replies(5)
        await talk.send(dot_stuff(SIMPLE) + b"QUIT\r\n")
        final, goodbye = await talk.replies(2)
    assert [r.text for r in replies] == [
        "250 2.1.0 Ok",
        ACCEPTED,
        "550 5.7.1 <mallory@other.test>: Relay access denied",
        ACCEPTED,
        "354 End data with <CR><LF>.<CR><LF>",
    ]
    assert final.code == 250 and goodbye.code == 221
    row, body = stored(relay_server, final.queue_id)
    assert [r.address for r in row.recipients] == ["alice@example.test", "bob@example.test"]
    assert split_received(body)[1] == SIMPLE


async def test_a_whole_session_in_one_packet_is_answered_in_order(relay_server: Relay) -> None:
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.send(
            b"EHLO client.test\r\n"
            b"MAIL FROM:<sender@client.test>\r\n"
            b"RCPT TO:<alice@example.test>\r\n"
            b"DATA\r\n" + dot_stuff(SIMPLE) + b"MAIL FROM:<second@client.test>\r\n"
            b"RCPT TO:<bob@example.test>\r\n"
            b"DATA\r\n" + dot_stuff(b"Subject: two\r\n\r\n.dot\r\n") + b"QUIT\r\n"
        )
        replies = await talk.replies(10)
    assert [r.code for r in replies] == [250, 250, 250, 354, 250, 250, 250, 354, 250, 221]
    first, second = replies[4], replies[8]
    assert split_received(stored(relay_server, first.queue_id)[1])[1] == SIMPLE
    row, body = stored(relay_server, second.queue_id)
    assert row.sender == "second@client.test"
    assert split_received(body)[1] == b"Subject: two\r\n\r\n.dot\r\n"


# -- DSN parameters (RFC 3461) ----------------------------------------------------------------


async def test_dsn_parameters_are_stored_with_their_case(relay_server: Relay) -> None:
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        mail = await talk.command("MAIL FROM:<sender@client.test> RET=hdrs ENVID=QQ314159+2BxY")
        a = await talk.command(
            "RCPT TO:<alice@example.test> NOTIFY=failure,Delay ORCPT=rfc822;Alice@Example.TEST"
        )
        b = await talk.command("RCPT TO:<bob@example.test> NOTIFY=NEVER")
        c = await talk.command("RCPT TO:<carol@example.test>")
        assert [mail.code, a.code, b.code, c.code] == [250, 250, 250, 250]
        assert (await talk.command("DATA")).code == 354
        await talk.send(dot_stuff(SIMPLE))
        reply = await talk.reply()
    row, _ = stored(relay_server, reply.queue_id)
    assert (row.ret, row.envid) == ("HDRS", "QQ314159+2BxY")
    recipients = {r.address: (r.notify, r.orcpt) for r in row.recipients}
    assert recipients == {
        "alice@example.test": ("DELAY,FAILURE", "rfc822;Alice@Example.TEST"),
        "bob@example.test": ("NEVER", None),
        "carol@example.test": (None, None),
    }


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            "RCPT TO:<a@example.test> NOTIFY=NEVER,SUCCESS",
            "501 5.5.4 Bad value for parameter NOTIFY",
        ),
        ("RCPT TO:<a@example.test> NOTIFY=SOMETIMES", "501 5.5.4 Bad value for parameter NOTIFY"),
        ("RCPT TO:<a@example.test> ORCPT=no-type", "501 5.5.4 Bad value for parameter ORCPT"),
        ("RCPT TO:<a@example.test> FOO=bar", "555 5.5.4 Unsupported parameter FOO"),
    ],
)
async def test_malformed_dsn_parameters_are_refused(
    relay_server: Relay, command: str, expected: str
) -> None:
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        await talk.command("MAIL FROM:<sender@client.test>")
        assert (await talk.command(command)).text == expected


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("RET=ALL", "501 5.5.4 Bad value for parameter RET"),
        ("ENVID=has\x01control", "501 5.5.4 Bad value for parameter ENVID"),
        ("BODY=BINARYMIME", "501 5.5.4 Bad value for parameter BODY"),
        ("SIZE=lots", "501 5.5.4 Bad value for parameter SIZE"),
        ("AUTH=<>", "555 5.5.4 Unsupported parameter AUTH"),
    ],
)
async def test_malformed_mail_parameters_are_refused(
    relay_server: Relay, params: str, expected: str
) -> None:
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        assert (await talk.command(f"MAIL FROM:<sender@client.test> {params}")).text == expected


# -- durability: 250 only after the commit ----------------------------------------------------


class FailingStore:
    """An AsyncStore whose every write fails, as a dead disk would make it."""

    async def put(self, message: NewMessage) -> None:
        raise StorageError("injected: disk on fire")


async def test_a_failing_store_gets_451_and_never_250(relay_server: Relay) -> None:
    real = relay_server.handler.store
    relay_server.handler.store = FailingStore()  # type: ignore[assignment]
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        failed = await transaction(talk, [f"bob@{DOMAIN}"])
        relay_server.handler.store = real
        ok = await transaction(talk, [f"bob@{DOMAIN}"])
    assert failed.text == "451 4.3.0 Error: queue file write error"
    assert ok.code == 250
    assert queue_ids(relay_server) == [ok.queue_id]


def execute(path: str, *statements: str) -> None:
    """DDL from another connection, as a second process (an operator, a bug) would run it."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()


async def test_an_sqlite_error_inside_the_write_gets_451_and_stores_nothing(
    relay_server: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    path = relay_server.config.queue.path
    execute(
        path,
        "CREATE TRIGGER refuse BEFORE INSERT ON recipients"
        " BEGIN SELECT RAISE(ABORT, 'simulated write failure'); END",
    )
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        failed = await transaction(talk, [f"bob@{DOMAIN}"])
        assert failed.text == "451 4.3.0 Error: queue file write error"
        assert "queue write failed: simulated write failure" in caplog.text
        assert "queue commit failed" not in caplog.text  # this job failed alone, in its savepoint
        # The message row was written before the recipients failed: it must be gone too.
        assert queue_ids(relay_server) == []
        execute(path, "DROP TRIGGER refuse")
        ok = await transaction(talk, [f"bob@{DOMAIN}"])
    assert ok.code == 250
    assert queue_ids(relay_server) == [ok.queue_id]


async def test_a_failing_commit_gets_451_and_stores_nothing(
    relay_server: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """A constraint checked only at COMMIT: the write succeeds, the commit does not."""
    path = relay_server.config.queue.path
    execute(
        path,
        "CREATE TABLE poison (message_id TEXT"
        " REFERENCES messages(id) DEFERRABLE INITIALLY DEFERRED)",
        "CREATE TRIGGER poison AFTER INSERT ON messages"
        " BEGIN INSERT INTO poison VALUES ('no such message'); END",
    )
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        failed = await transaction(talk, [f"bob@{DOMAIN}"])
        assert failed.text == "451 4.3.0 Error: queue file write error"
        assert "queue commit failed: FOREIGN KEY constraint failed" in caplog.text
        assert queue_ids(relay_server) == []
        execute(path, "DROP TRIGGER poison", "DROP TABLE poison")
        ok = await transaction(talk, [f"bob@{DOMAIN}"])
    assert ok.code == 250
    assert queue_ids(relay_server) == [ok.queue_id]


async def test_a_read_only_queue_gets_451(relay_server: Relay) -> None:
    await relay_server.store.run(lambda store: store.conn.execute("PRAGMA query_only=ON"))
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        failed = await transaction(talk, [f"bob@{DOMAIN}"])
    assert failed.text == "451 4.3.0 Error: queue file write error"
    assert queue_ids(relay_server) == []


async def test_the_queue_id_in_the_250_is_the_stored_message(relay_server: Relay) -> None:
    queue_id = await asyncio.to_thread(
        send_mail, smtp_address(relay_server), [f"alice@{DOMAIN}", f"bob@{DOMAIN}"]
    )
    row, _ = stored(relay_server, queue_id)
    assert row.id == queue_id
    assert row.sender == "sender@client.test"
    assert [(r.address, r.domain) for r in row.recipients] == [
        (f"alice@{DOMAIN}", DOMAIN),
        (f"bob@{DOMAIN}", DOMAIN),
    ]


# -- metrics ----------------------------------------------------------------------------------


async def test_metrics_count_accepted_and_rejected_mail_and_the_queue(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(smtp={"max_message_size": LIMIT})
    url = metrics_url(server)
    before = await asyncio.to_thread(scrape, url)
    assert sample(before, "relay_queue_messages", state="queued") == 0

    address = smtp_address(server)
    await asyncio.to_thread(send_mail, address, [f"alice@{DOMAIN}"])
    held = await asyncio.to_thread(send_mail, address, [f"bob@{DOMAIN}"])
    async with conversation(address) as talk:
        await talk.ehlo()
        await talk.command("MAIL FROM:<sender@client.test>")
        assert (await talk.command("RCPT TO:<x@other.test>")).code == 550
        assert (await talk.command("RCPT TO:<x%y@example.test>")).code == 550
        await talk.command("RSET")
        assert (await talk.command(f"MAIL FROM:<a@b.test> SIZE={LIMIT + 1}")).code == 552
    with open_store(server.config.queue.path) as store:
        store.hold([held])

    after = await asyncio.to_thread(scrape, url)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("relay_messages_accepted_total", domain=DOMAIN) == 2
    assert delta("relay_messages_rejected_total", reason="relay_denied") == 1
    assert delta("relay_messages_rejected_total", reason="bad_recipient") == 1
    assert delta("relay_messages_rejected_total", reason="too_big") == 1
    assert sample(after, "relay_queue_messages", state="queued") == 1
    assert sample(after, "relay_queue_messages", state="held") == 1
    # Held mail is neither delivered nor expired: counted apart (issue 12).
    assert sample(after, "relay_queue_recipients", domain=DOMAIN) == 1
    assert sample(after, "relay_queue_held_messages", domain=DOMAIN) == 1
    assert delta("relay_smtp_connections_total") == 3


async def test_healthz_says_ok_while_serving(relay_server: Relay) -> None:
    import urllib.request

    def get() -> tuple[int, bytes]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(metrics_url(relay_server, "/healthz"), timeout=10) as response:
            return response.status, response.read()

    assert await asyncio.to_thread(get) == (200, b"ok\n")


# -- hostile or broken clients ----------------------------------------------------------------


async def test_an_ehlo_that_is_not_utf8_does_not_stop_the_mail(relay_server: Relay) -> None:
    async with conversation(smtp_address(relay_server)) as talk:
        assert (await talk.command(b"EHLO caf\xe9.client.test")).code == 250
        reply = await transaction(talk, [f"bob@{DOMAIN}"])
    assert reply.code == 250, reply
    row, body = stored(relay_server, reply.queue_id)
    assert row.helo == "caf\\xe9.client.test"
    assert split_received(body)[0].startswith("Received: from caf?.client.test ([127.0.0.1])")


async def test_addresses_that_are_not_utf8_are_refused(relay_server: Relay) -> None:
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        mail = await talk.command(b"MAIL FROM:<j\xf6rg@client.test> SMTPUTF8")
        assert (await talk.command("MAIL FROM:<jorg@client.test> SMTPUTF8")).code == 250
        rcpt = await talk.command(b"RCPT TO:<zo\xeb@example.test>")
    assert mail.text == "553 5.1.3 Error: malformed address"
    assert rcpt.text == "553 5.1.3 Error: malformed address"


async def test_parameters_of_a_refused_mail_do_not_leak_into_the_next(relay_server: Relay) -> None:
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        refused = await talk.command(
            "MAIL FROM:<jörg@bücher.test> SMTPUTF8 BODY=8BITMIME RET=HDRS ENVID=X1 BAD=1"
        )
        assert refused.text == "555 5.5.4 Unsupported parameter BAD"
        assert (await talk.command("MAIL FROM:<plain@client.test>")).code == 250
        assert (await talk.command(f"RCPT TO:<zoë@{DOMAIN}>")).code == 553
        assert (await talk.command("RCPT TO:<zoe@example.test>")).code == 250
        assert (await talk.command("DATA")).code == 354
        await talk.send(dot_stuff(SIMPLE))
        reply = await talk.reply()
    row, body = stored(relay_server, reply.queue_id)
    assert (row.smtputf8, row.eightbit, row.ret, row.envid) == (False, False, None, None)
    assert " with ESMTP id " in split_received(body)[0]


async def test_an_internal_error_is_a_temporary_failure_not_a_500(
    relay_server: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object) -> str:
        raise RuntimeError("a bug in a policy check")

    monkeypatch.setattr(relay_server.handler, "rcpt", broken)
    async with conversation(smtp_address(relay_server)) as talk:
        await talk.ehlo()
        await talk.command("MAIL FROM:<sender@client.test>")
        reply = await talk.command(f"RCPT TO:<bob@{DOMAIN}>")
    assert reply.text == "451 4.3.0 Error: internal error, try again later"


# -- aiosmtpd's constructor and address parser, replaced for speed -----------------------------


async def test_protocol_sets_what_aiosmtpd_would(relay_factory: RelayFactory) -> None:
    """RelaySMTP builds its dispatch tables once per class instead of calling aiosmtpd's
    __init__ per connection; an aiosmtpd release that adds or changes an attribute fails here."""
    server = await relay_factory()
    ours = server._protocol()

    theirs = RelaySMTP.__new__(RelaySMTP)
    theirs.line_length_limit = ours.line_length_limit
    theirs._refusal, theirs._reading_data, theirs._buffered, theirs._junk = None, False, 0, 0
    theirs.relay_handler = server.handler
    theirs._new_session, theirs._new_envelope = ours._new_session, ours._new_envelope
    SMTP.__init__(
        theirs,
        server.handler,
        hostname=ours.hostname,
        ident="ESMTP relay",
        data_size_limit=ours.data_size_limit,
        enable_SMTPUTF8=True,
        decode_data=False,
        tls_context=ours.tls_context,
        timeout=ours._timeout_duration,
    )
    theirs.command_size_limit = ours.command_size_limit
    theirs.command_size_limits = ours.command_size_limits
    # aiosmtpd's bound-method table is a property of ours, built on demand (only HELP reads
    # it) from the verb names it keeps; ours also keeps an idle deadline (refresh_deadline) and
    # the factories of its session and envelope types.
    ours_only = {"_deadline", "_new_session", "_new_envelope"}
    assert sorted(vars(ours)) == sorted(set(vars(theirs)) | ours_only)
    assert {k: v.__func__ for k, v in ours._smtp_methods.items()} == {
        k: v.__func__ for k, v in theirs._smtp_methods.items()
    }
    built_per_connection = {"_stream_reader_wr", "_stream_writer", "_task", "_closed", "_loop"}
    for name, value in vars(theirs).items():
        mine = vars(ours)[name]
        if name == "_handle_hooks":
            assert {k: v.__func__ for k, v in mine.items()} == {
                k: v.__func__ for k, v in value.items()
            }, name
        elif name == "_auth_methods":
            assert "AUTH" in ours._smtp_methods  # ours answers 502; no mechanism is offered
        elif name == "require_starttls":  # aiosmtpd's is None or False; read as a truth value
            assert not mine and not value
        elif isinstance(value, (bool, int, str, float, frozenset, type(None))):
            assert mine == value, name
        else:
            assert name in built_per_connection or type(mine) is type(value), name


_ATOM = st.text(alphabet="abcxyzABC019!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=6)
_LABEL = st.text(alphabet="abcXYZ0129-", min_size=1, max_size=6)


@given(
    local=st.lists(_ATOM, min_size=1, max_size=3).map(".".join),
    domain=st.lists(_LABEL, min_size=1, max_size=3).map(".".join),
    rest=st.sampled_from(["", " SIZE=100", " BODY=8BITMIME SMTPUTF8", " \tNOTIFY=NEVER", "X"]),
)
def test_plain_address_fast_path_agrees_with_the_parser(local: str, domain: str, rest: str) -> None:
    arg = f"<{local}@{domain}>{rest}"
    protocol = RelaySMTP.__new__(RelaySMTP)
    fast = parse_address(arg)
    slow = SMTP._getaddr(protocol, arg)
    assert fast == slow
    assert fast == (f"{local}@{domain}", rest.lstrip(" \t"))


@pytest.mark.parametrize(
    "arg",
    [
        '<"john doe"@example.test>',
        "<@a.test:bob@example.test>",
        "<>",
        " <bob@example.test>",
        "bob@example.test SIZE=1",
        "<bob@example.test",
        "<.bob@example.test>",
        "<bob@>",
        "<bob@example.test> (a comment) SIZE=1",
    ],
)
def test_other_address_forms_are_parsed_as_aiosmtpd_does(arg: str) -> None:
    protocol = RelaySMTP.__new__(RelaySMTP)
    assert parse_address(arg) == SMTP._getaddr(protocol, arg)


async def test_a_busy_session_outlives_the_command_timeout_counted_from_connect(
    relay_factory: RelayFactory,
) -> None:
    """The idle timeout runs from the last command, not from the connection: a client that keeps
    working is never cut off (aiosmtpd's own timer, armed at connect, must not survive)."""
    server = await relay_factory(smtp={"command_timeout": "1s"})
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        started = time.monotonic()
        while time.monotonic() - started < 2.5:  # past the timeout counted from connect
            assert (await talk.command("MAIL FROM:<sender@client.test>")).code == 250
            assert (await talk.command("RSET")).code == 250
            await asyncio.sleep(0.3)  # pacing the client, well inside the 1 s timeout
        assert (await talk.command("NOOP")).code == 250
