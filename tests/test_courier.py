"""relay.courier against a real (fake) primary over TCP: bytes, replies, TLS and failures."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.delivery.courier import (
    OutboundSession,
    Outgoing,
    OutgoingRecipient,
    Reply,
    SessionError,
    _data_payload,
    probe,
    verify_recipient,
)
from relay.delivery.mx import Hop

try:  # tests/ is on sys.path while it has no __init__.py; the project root once it has one
    import fakeprimary
except ModuleNotFoundError:
    from tests import fakeprimary

FakePrimary = fakeprimary.FakePrimary
unused_port = fakeprimary.unused_port
fake_primary = fakeprimary.fake_primary  # the fixture, under its own name
Start = Callable[..., Awaitable[FakePrimary]]

HELO = "backup.test"
QUICK = 0.3  # seconds: a reply timeout short enough for tests, long enough for loopback

# Everything a byte-exact relay must not touch: 8-bit bytes, UTF-8, lines starting with '.',
# a lone '.' line (end-of-data if left unstuffed), a bare CR and a bare LF inside lines.
BODY = (
    b"Received: from client.example.net by backup.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"caf\xc3\xa9 \xe2\x82\xac 100, and a latin-1 byte: \xe9 and \xff\r\n"
    b".a line starting with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"a bare CR here\rand the line goes on\r\n"
    b"a bare LF here\nand the line goes on\r\n"
    b"last line\r\n"
)


def message(*recipients: str | OutgoingRecipient, **fields: Any) -> Outgoing:
    rcpts = tuple(
        r if isinstance(r, OutgoingRecipient) else OutgoingRecipient(r) for r in recipients
    )
    fields.setdefault("body", BODY)
    fields.setdefault("sender", "alice@example.net")
    return Outgoing(id=fields.pop("id", "Q1"), recipients=rcpts, **fields)


async def deliver(fake: FakePrimary, msg: Outgoing, **open_args: Any) -> dict[str, Reply]:
    session = await OutboundSession.open(fake.hop(), helo=HELO, **open_args)
    try:
        return await session.send(msg)
    finally:
        await session.close()


def verbs(fake: FakePrimary) -> list[str]:
    return [command.split()[0] for command in fake.commands]


# -- bytes on the wire -----------------------------------------------------------------------


async def test_body_arrives_byte_exact_with_8bit_utf8_dots_and_bare_cr_lf(
    fake_primary: Start,
) -> None:
    fake = await fake_primary(size_limit=10_000_000)

    replies = await deliver(fake, message("bob@example.org", eightbit=True))

    assert replies == {"bob@example.org": Reply(250, "2.0.0 Ok: queued")}
    [delivered] = fake.delivered
    assert delivered.data == BODY
    assert delivered.mail_from == "alice@example.net"
    assert delivered.mail_options == [f"SIZE={len(BODY)}", "BODY=8BITMIME"]


async def test_body_without_final_crlf_gets_one_before_the_dot(fake_primary: Start) -> None:
    fake = await fake_primary()
    body = b"Subject: short\r\n\r\nno line ending at the end"

    await deliver(fake, message("bob@example.org", body=body))

    assert fake.delivered[0].data == body + b"\r\n"


async def test_dot_after_bare_lf_or_cr_is_stuffed_so_no_end_of_data_can_be_smuggled(
    fake_primary: Start,
) -> None:
    fake = await fake_primary()
    smuggled = b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    body = b"Subject: hi\r\n\r\nhello\n.\r\n" + smuggled + b"bye\r.\r\nend\r\n"

    replies = await deliver(fake, message("bob@example.org", body=body))

    assert replies["bob@example.org"].code == 250
    assert len(fake.transactions) == 1
    # A strict CRLF receiver such as aiosmtpd keeps the extra dot: the documented cost.
    expected = b"Subject: hi\r\n\r\nhello\n..\r\n" + smuggled + b"bye\r..\r\nend\r\n"
    assert fake.delivered[0].data == expected
    assert not any("evil" in command for command in fake.commands)


async def test_a_large_body_sent_in_many_chunks_arrives_byte_exact(fake_primary: Start) -> None:
    fake = await fake_primary()
    lines = [b"%06d " % n + bytes(range(128, 128 + 90)) + b"\r\n" for n in range(12_000)]
    body = b"Subject: big\r\n\r\n" + b"".join(lines)  # about 1.2 MB

    replies = await deliver(fake, message("bob@example.org", body=body))

    assert replies["bob@example.org"].code == 250
    assert fake.delivered[0].data == body


async def test_empty_body_is_sent_as_an_empty_message(fake_primary: Start) -> None:
    fake = await fake_primary()

    replies = await deliver(fake, message("bob@example.org", body=b""))

    assert replies["bob@example.org"].code == 250
    assert fake.delivered[0].data == b""


# -- several messages, several recipients ----------------------------------------------------


async def test_two_messages_travel_over_one_connection_without_rset_after_a_completed_one(
    fake_primary: Start,
) -> None:
    fake = await fake_primary()
    second_body = b"Subject: second\r\n\r\nsecond message\r\n"

    session = await OutboundSession.open(fake.hop(), helo=HELO)
    first = await session.send(message("bob@example.org"))
    second = await session.send(message("carol@example.org", id="Q2", body=second_body))
    await session.close()

    assert first["bob@example.org"].code == 250
    assert second["carol@example.org"].code == 250
    assert fake.connections == 1
    assert [t.data for t in fake.delivered] == [BODY, second_body]
    assert [t.rcpts for t in fake.delivered] == [
        [("bob@example.org", [])],
        [("carol@example.org", [])],
    ]
    assert verbs(fake) == [
        "EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "QUIT",
    ]  # fmt: skip


async def test_each_recipient_keeps_its_own_reply_250_450_550(fake_primary: Start) -> None:
    fake = await fake_primary(
        replies={
            "later@example.org": "450 4.2.1 mailbox busy",
            "nobody@example.org": "550 5.1.1 User unknown",
        }
    )

    replies = await deliver(
        fake, message("bob@example.org", "later@example.org", "nobody@example.org")
    )

    assert replies == {
        "bob@example.org": Reply(250, "2.0.0 Ok: queued"),
        "later@example.org": Reply(450, "4.2.1 mailbox busy"),
        "nobody@example.org": Reply(550, "5.1.1 User unknown"),
    }
    assert [r.permanent for r in replies.values()] == [False, False, True]
    assert str(replies["nobody@example.org"]) == "550 5.1.1 User unknown"
    [delivered] = fake.delivered
    assert delivered.data == BODY


async def test_accepted_recipients_get_the_reply_to_the_dot_even_when_it_is_a_refusal(
    fake_primary: Start,
) -> None:
    fake = await fake_primary(data_reply="554 5.6.0 content rejected")

    replies = await deliver(fake, message("bob@example.org", "carol@example.org"))

    assert set(replies.values()) == {Reply(554, "5.6.0 content rejected")}


async def test_a_refused_final_dot_ends_the_transaction_too(fake_primary: Start) -> None:
    """4xx/5xx to the dot is the end of the transaction (RFC 5321 4.1.1.4): no RSET needed."""
    fake = await fake_primary(data_reply="554 5.6.0 content rejected")

    session = await OutboundSession.open(fake.hop(), helo=HELO)
    first = await session.send(message("bob@example.org"))
    second = await session.send(message("carol@example.org", id="Q2"))
    await session.close()

    assert first["bob@example.org"].code == second["carol@example.org"].code == 554
    assert verbs(fake) == ["EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "QUIT"]


async def test_with_pipelining_mail_every_rcpt_and_data_go_in_one_flight(
    fake_primary: Start,
) -> None:
    fake = await fake_primary(replies={"carol@example.org": "550 5.1.1 User unknown"})
    session = await OutboundSession.open(fake.hop(), helo=HELO)
    replies = await session.send(
        message("bob@example.org", "carol@example.org", "dave@example.org")
    )
    await session.close()

    # Each reply is its own recipient's: carol's refusal, the others the dot's 250.
    assert replies["carol@example.org"] == Reply(550, "5.1.1 User unknown")
    assert replies["bob@example.org"].code == replies["dave@example.org"].code == 250
    assert [r for r, _ in fake.delivered[0].rcpts] == [
        "bob@example.org",
        "carol@example.org",
        "dave@example.org",
    ]
    flight = [
        (command.split()[0], ahead)
        for command, ahead in zip(fake.commands, fake.sent_ahead, strict=True)
        if command.split()[0] in ("MAIL", "RCPT", "DATA")
    ]
    # When the server read MAIL and each RCPT, the rest of the flight had already arrived.
    assert flight == [
        ("MAIL", True),
        ("RCPT", True),
        ("RCPT", True),
        ("RCPT", True),
        ("DATA", False),
    ]


async def test_without_pipelining_each_command_waits_for_its_reply(fake_primary: Start) -> None:
    fake = await fake_primary(pipelining=False)
    await deliver(fake, message("bob@example.org", "carol@example.org"))
    assert not any(fake.sent_ahead)


async def test_a_server_silent_mid_flight_leaves_every_recipient_undecided(
    fake_primary: Start,
) -> None:
    fake = await fake_primary(stall="RCPT")  # answers MAIL, never the RCPTs
    session = await OutboundSession.open(fake.hop(), helo=HELO, timeout=1.0)
    with pytest.raises(SessionError) as raised:
        await session.send(message("bob@example.org", "carol@example.org"))
    await session.close()
    assert raised.value.reply.code == 421  # temporary: both are tried again, nothing was sent
    assert not fake.delivered


@pytest.mark.parametrize("pipelining", [False, True])
async def test_no_accepted_recipient_means_no_body_and_an_rset(
    fake_primary: Start, pipelining: bool
) -> None:
    fake = await fake_primary(
        replies={"nobody@example.org": "550 5.1.1 User unknown"}, pipelining=pipelining
    )

    session = await OutboundSession.open(fake.hop(), helo=HELO)
    replies = await session.send(message("nobody@example.org"))
    again = await session.send(message("bob@example.org", id="Q2"))
    await session.close()

    assert replies == {"nobody@example.org": Reply(550, "5.1.1 User unknown")}
    assert again["bob@example.org"].code == 250
    assert len(fake.delivered) == 1  # Q2 only: the refused flight's DATA carried no body
    if pipelining:  # DATA travels in the flight; the server refuses it (RFC 2920 3.1)
        first = ["EHLO", "MAIL", "RCPT", "DATA", "RSET"]
    else:
        first = ["EHLO", "MAIL", "RCPT", "RSET"]
    assert verbs(fake) == [*first, "MAIL", "RCPT", "DATA", "QUIT"]


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize(
    ("mail_reply", "permanent"),
    [("451 4.3.0 try again later", False), ("553 5.7.1 sender rejected", True)],
)
async def test_mail_from_rejection_is_every_recipients_reply(
    fake_primary: Start, mail_reply: str, permanent: bool, pipelining: bool
) -> None:
    fake = await fake_primary(mail_reply=mail_reply, pipelining=pipelining)

    replies = await deliver(fake, message("bob@example.org", "carol@example.org"))

    code, text = mail_reply.split(" ", 1)
    assert replies == {
        "bob@example.org": Reply(int(code), text),
        "carol@example.org": Reply(int(code), text),
    }
    assert all(reply.permanent is permanent for reply in replies.values())
    assert not fake.delivered
    if not pipelining:  # in a flight the RCPTs and DATA were sent with MAIL, and refused
        assert "RCPT" not in verbs(fake) and "DATA" not in verbs(fake)


# -- limits and extensions -------------------------------------------------------------------


async def test_message_over_the_servers_size_fails_permanently_without_sending(
    fake_primary: Start,
) -> None:
    fake = await fake_primary(size_limit=100)

    session = await OutboundSession.open(fake.hop(), helo=HELO)
    replies = await session.send(message("bob@example.org", "carol@example.org"))
    await session.close()

    assert session.max_size == 100
    for reply in replies.values():
        assert reply.code == 552
        assert reply.text.startswith("5.3.4 message size exceeds fixed limit of remote server")
        assert reply.permanent
    assert "MAIL" not in verbs(fake)


async def test_smtputf8_message_to_a_server_without_smtputf8_fails_with_5_6_7(
    fake_primary: Start,
) -> None:
    fake = await fake_primary(smtputf8=False)

    session = await OutboundSession.open(fake.hop(), helo=HELO)
    replies = await session.send(message("bob@example.org", smtputf8=True))
    await session.close()

    assert not session.supports_smtputf8
    reply = replies["bob@example.org"]
    assert reply.code == 553 and reply.text.startswith("5.6.7 ") and reply.permanent
    assert "MAIL" not in verbs(fake)


async def test_smtputf8_message_is_sent_with_smtputf8_and_utf8_addresses(
    fake_primary: Start,
) -> None:
    fake = await fake_primary()

    replies = await deliver(fake, message("bøb@exämple.org", sender="jösé@example.net"))

    assert replies["bøb@exämple.org"].code == 250
    [delivered] = fake.delivered
    assert delivered.mail_from == "jösé@example.net"
    assert delivered.mail_options == ["SMTPUTF8"]
    assert delivered.rcpts == [("bøb@exämple.org", [])]


async def test_8bit_body_goes_as_is_to_a_server_without_8bitmime(fake_primary: Start) -> None:
    fake = await fake_primary(eightbitmime=False)

    replies = await deliver(fake, message("bob@example.org", eightbit=True))

    assert replies["bob@example.org"].code == 250
    assert fake.delivered[0].mail_options == []
    assert fake.delivered[0].data == BODY


DSN_RECIPIENT = OutgoingRecipient(
    "bob@example.org", notify="SUCCESS,FAILURE", orcpt="rfc822;Bob@Example.org"
)


async def test_dsn_parameters_pass_through_exactly_when_dsn_is_offered(
    fake_primary: Start,
) -> None:
    fake = await fake_primary(dsn=True)

    await deliver(fake, message(DSN_RECIPIENT, envid="QQ314159+2Bx", ret="HDRS"))

    [delivered] = fake.delivered
    assert delivered.mail_options == ["RET=HDRS", "ENVID=QQ314159+2Bx"]
    assert delivered.rcpts == [
        ("bob@example.org", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob@Example.org"])
    ]


async def test_dsn_parameters_are_dropped_when_dsn_is_not_offered(fake_primary: Start) -> None:
    fake = await fake_primary(dsn=False)

    session = await OutboundSession.open(fake.hop(), helo=HELO)
    replies = await session.send(message(DSN_RECIPIENT, envid="QQ314159", ret="FULL"))
    await session.close()

    assert replies["bob@example.org"].code == 250
    [delivered] = fake.delivered
    assert delivered.mail_options == []
    assert delivered.rcpts == [("bob@example.org", [])]


async def test_server_that_does_not_know_ehlo_is_greeted_with_helo(fake_primary: Start) -> None:
    fake = await fake_primary(ehlo_reply="502 5.5.1 EHLO not implemented")

    replies = await deliver(fake, message(DSN_RECIPIENT, eightbit=True, ret="HDRS"))

    assert replies["bob@example.org"].code == 250
    assert verbs(fake)[:2] == ["EHLO", "HELO"]
    [delivered] = fake.delivered  # no ESMTP, so no parameters at all
    assert delivered.mail_options == []
    assert delivered.rcpts == [("bob@example.org", [])]
    assert delivered.data == BODY


# -- STARTTLS --------------------------------------------------------------------------------


async def test_opportunistic_tls_is_used_when_offered_without_checking_the_certificate(
    fake_primary: Start,
) -> None:
    fake = await fake_primary(starttls=True)

    session = await OutboundSession.open(fake.hop(), helo=HELO, tls="opportunistic")
    replies = await session.send(message("bob@example.org"))
    await session.close()

    assert session.tls_active
    assert replies["bob@example.org"].code == 250
    assert verbs(fake)[:3] == ["EHLO", "STARTTLS", "EHLO"]
    assert fake.delivered[0].data == BODY


async def test_opportunistic_tls_falls_back_to_plain_text_once_when_the_handshake_fails(
    fake_primary: Start,
) -> None:
    fake = await fake_primary(starttls_broken=True)

    session = await OutboundSession.open(fake.hop(), helo=HELO, tls="opportunistic", timeout=5)
    replies = await session.send(message("bob@example.org"))
    await session.close()

    assert not session.tls_active
    assert fake.connections == 2
    assert verbs(fake) == ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert replies["bob@example.org"].code == 250


async def test_tls_none_never_sends_starttls(fake_primary: Start) -> None:
    fake = await fake_primary(starttls=True)

    await deliver(fake, message("bob@example.org"), tls="none")

    assert "STARTTLS" not in verbs(fake)


async def test_require_tls_fails_temporarily_when_starttls_is_not_offered(
    fake_primary: Start,
) -> None:
    fake = await fake_primary(starttls=False)

    with pytest.raises(SessionError) as raised:
        await OutboundSession.open(fake.hop(), helo=HELO, tls="require")

    assert raised.value.reply.code == 421
    assert raised.value.reply.text.startswith("4.7.0 ")
    assert not raised.value.permanent


async def test_require_tls_fails_temporarily_without_plain_retry_when_handshake_fails(
    fake_primary: Start,
) -> None:
    fake = await fake_primary(starttls_broken=True)

    with pytest.raises(SessionError) as raised:
        await OutboundSession.open(fake.hop(), helo=HELO, tls="require", timeout=5)

    assert raised.value.reply.text.startswith("4.7.5 STARTTLS with primary.test[127.0.0.2]")
    assert not raised.value.permanent
    assert fake.connections == 1


async def test_require_tls_accepts_an_unverifiable_certificate(fake_primary: Start) -> None:
    fake = await fake_primary(starttls=True)

    session = await OutboundSession.open(fake.hop("some-other-name.test"), helo=HELO, tls="require")
    replies = await session.send(message("bob@example.org"))
    await session.close()

    assert session.tls_active
    assert replies["bob@example.org"].code == 250


async def test_verify_tls_delivers_when_chain_and_hostname_check_out(
    fake_primary: Start, tmp_path: Path
) -> None:
    fake = await fake_primary(starttls=True, hostname="primary.test")
    cafile = fake.write_ca(tmp_path / "ca.pem")

    session = await OutboundSession.open(
        fake.hop("primary.test"), helo=HELO, tls="verify", cafile=cafile
    )
    replies = await session.send(message("bob@example.org"))
    await session.close()

    assert session.tls_active
    assert replies["bob@example.org"].code == 250


async def test_verify_tls_fails_temporarily_on_a_hostname_mismatch(
    fake_primary: Start, tmp_path: Path
) -> None:
    fake = await fake_primary(starttls=True, hostname="primary.test")
    cafile = fake.write_ca(tmp_path / "ca.pem")

    with pytest.raises(SessionError) as raised:
        await OutboundSession.open(fake.hop("wrong.test"), helo=HELO, tls="verify", cafile=cafile)

    assert raised.value.reply.code == 421
    assert raised.value.reply.text.startswith("4.7.5 ")
    assert "wrong.test" in raised.value.reply.text
    assert not raised.value.permanent
    assert fake.delivered == [] and fake.connections == 1


async def test_verify_tls_fails_temporarily_when_the_ca_is_unknown(fake_primary: Start) -> None:
    fake = await fake_primary(starttls=True)

    with pytest.raises(SessionError) as raised:
        await OutboundSession.open(fake.hop(), helo=HELO, tls="verify")  # system store only

    assert raised.value.reply.text.startswith("4.7.5 ")
    assert "certificate verify failed" in raised.value.reply.text
    assert not raised.value.permanent


# -- session failures ------------------------------------------------------------------------


async def test_connection_refused_is_a_temporary_session_error() -> None:
    port = unused_port("127.0.0.10")
    hop = Hop("127.0.0.10", "127.0.0.10", port, preference=0)

    with pytest.raises(SessionError) as raised:
        await OutboundSession.open(hop, helo=HELO)

    assert raised.value.reply == Reply(421, f"4.4.1 connection refused by 127.0.0.10:{port}")
    assert not raised.value.permanent


async def test_421_greeting_is_a_temporary_session_error_with_the_servers_words(
    fake_primary: Start,
) -> None:
    fake = await fake_primary(greeting="421 4.3.2 primary.test too busy, try later")

    with pytest.raises(SessionError) as raised:
        await OutboundSession.open(fake.hop(), helo=HELO)

    assert raised.value.reply == Reply(421, "4.3.2 primary.test too busy, try later")
    assert not raised.value.permanent


async def test_rejected_ehlo_is_a_session_error_with_its_permanence(fake_primary: Start) -> None:
    fake = await fake_primary(ehlo_reply="554 5.7.1 go away")

    with pytest.raises(SessionError) as raised:
        await OutboundSession.open(fake.hop(), helo=HELO)

    assert raised.value.reply == Reply(554, "5.7.1 go away")
    assert raised.value.permanent


@pytest.mark.parametrize("point", ["data", "dot"])
async def test_disconnect_during_data_is_a_session_error_never_a_2xx(
    fake_primary: Start, point: str
) -> None:
    fake = await fake_primary(disconnect=point)
    session = await OutboundSession.open(fake.hop(), helo=HELO)

    with pytest.raises(SessionError) as raised:
        await session.send(message("bob@example.org"))

    assert raised.value.reply.code == 421
    assert raised.value.reply.text.startswith("4.4.2 connection to primary.test[127.0.0.2]")
    assert not raised.value.permanent
    with pytest.raises(SessionError):  # a broken session is not reused
        await session.send(message("bob@example.org", id="Q2"))
    await session.close()
    assert verbs(fake) == ["EHLO", "MAIL", "RCPT", "DATA"]


@pytest.mark.parametrize("point", ["greeting", "EHLO"])
async def test_server_that_stalls_before_the_session_opens_times_out(
    fake_primary: Start, point: str
) -> None:
    fake = await fake_primary(stall=point)

    with pytest.raises(SessionError) as raised:
        await OutboundSession.open(fake.hop(), helo=HELO, timeout=QUICK)

    assert raised.value.reply.code == 421
    assert not raised.value.permanent


@pytest.mark.parametrize("point", ["MAIL", "RCPT", "DATA", "dot"])
async def test_server_that_stalls_mid_transaction_times_out(
    fake_primary: Start, point: str
) -> None:
    fake = await fake_primary(stall=point)
    session = await OutboundSession.open(fake.hop(), helo=HELO, timeout=QUICK)

    with pytest.raises(SessionError) as raised:
        await session.send(message("bob@example.org"))
    await session.close()

    assert raised.value.reply.code == 421
    assert raised.value.reply.text.startswith("4.4.2 timed out after ")
    assert not raised.value.permanent


@pytest.mark.parametrize("pipelining", [False, True])
async def test_421_to_rcpt_breaks_the_session(fake_primary: Start, pipelining: bool) -> None:
    fake = await fake_primary(
        replies={"carol@example.org": "421 4.7.0 too many errors, bye"}, pipelining=pipelining
    )
    session = await OutboundSession.open(fake.hop(), helo=HELO)

    with pytest.raises(SessionError) as raised:
        await session.send(message("bob@example.org", "carol@example.org"))
    await session.close()

    assert raised.value.reply == Reply(421, "4.7.0 too many errors, bye")
    assert not fake.delivered  # no body after a 421, pipelined or not
    if not pipelining:
        assert "DATA" not in verbs(fake)


async def test_garbage_reply_is_a_temporary_session_error(fake_primary: Start) -> None:
    fake = await fake_primary(mail_reply="hello, I am not an SMTP server")
    session = await OutboundSession.open(fake.hop(), helo=HELO)

    with pytest.raises(SessionError) as raised:
        await session.send(message("bob@example.org"))
    await session.close()

    assert raised.value.reply.code == 421
    assert raised.value.reply.text.startswith("4.5.0 ")


async def test_close_never_raises_when_the_server_is_gone(fake_primary: Start) -> None:
    fake = await fake_primary()
    session = await OutboundSession.open(fake.hop(), helo=HELO)

    await fake.stop()
    await session.close()
    await session.close()


# -- probe and callout -----------------------------------------------------------------------


async def test_probe_returns_the_greeting_and_quits(fake_primary: Start) -> None:
    fake = await fake_primary()

    reply = await probe(fake.hop(), helo=HELO)

    assert reply.code == 220 and "primary.test" in reply.text
    assert verbs(fake) == ["EHLO", "QUIT"]


async def test_probe_of_a_dead_hop_raises_a_temporary_session_error() -> None:
    hop = Hop("dead.test", "127.0.0.11", unused_port("127.0.0.11"), preference=0)

    with pytest.raises(SessionError) as raised:
        await probe(hop, helo=HELO, timeout=QUICK)

    assert raised.value.reply.text.startswith("4.4.1 connection refused by dead.test[127.0.0.11]")


async def test_verify_recipient_returns_the_rcpt_reply_without_sending_data(
    fake_primary: Start,
) -> None:
    fake = await fake_primary(replies={"nobody@example.org": "550 5.1.1 User unknown"})

    known = await verify_recipient(fake.hop(), helo=HELO, address="bob@example.org")
    unknown = await verify_recipient(fake.hop(), helo=HELO, address="nobody@example.org")

    assert known == Reply(250, "2.1.5 Ok")
    assert unknown == Reply(550, "5.1.1 User unknown")
    assert [t.mail_from for t in fake.transactions] == ["", ""]
    assert fake.commands.count("MAIL FROM:<>") == 2
    assert "DATA" not in verbs(fake)
    assert verbs(fake)[-4:] == ["MAIL", "RCPT", "RSET", "QUIT"]


async def test_verify_recipient_without_a_verdict_raises(fake_primary: Start) -> None:
    fake = await fake_primary(mail_reply="550 5.7.1 null sender refused")

    with pytest.raises(SessionError) as raised:
        await verify_recipient(fake.hop(), helo=HELO, address="bob@example.org")

    reply = raised.value.reply
    assert reply.code == 421 and not reply.permanent  # no verdict is never "no such user"
    assert reply.text.endswith("refused MAIL FROM:<>: 550 5.7.1 null sender refused")


# -- dot-stuffing ----------------------------------------------------------------------------

_LINE_START_DOT = re.compile(rb"(?:\A|(?<=[\r\n]))\.")  # a dot at the start of any line


@given(st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b".."]), max_size=30))
def test_dot_stuffing_doubles_every_dot_that_starts_a_line(parts: list[bytes]) -> None:
    body = b"".join(parts)
    stuffed = _LINE_START_DOT.sub(b"..", body)
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    assert _data_payload(body) == stuffed + b".\r\n"
