"""relay.dsn: reports parsed back with the stdlib `email` package, and checked byte for byte."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime
from email.message import EmailMessage, Message

import pytest

from relay.delivery.dsn import RecipientReport, build_dsn, status_from_reply

ARRIVAL = datetime(2026, 3, 1, 9, 30, 0, tzinfo=UTC)
NOW = datetime(2026, 3, 2, 10, 0, 0, tzinfo=UTC)
ATTEMPT = datetime(2026, 3, 2, 9, 59, 0, tzinfo=UTC)
ORIGINAL_HEADERS = (
    b"Received: from client.test by backup.test; Sun, 1 Mar 2026 09:30:00 +0000\r\n"
    b"From: Alice <alice@sender.test>\r\n"
    b"To: bob@example.test\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <orig-1@sender.test>\r\n"
)
ORIGINAL_BODY = b"Hello Bob,\r\n\r\nthe numbers are attached.\r\n"
ORIGINAL = ORIGINAL_HEADERS + b"\r\n" + ORIGINAL_BODY


def report(
    address: str = "bob@example.test",
    *,
    action: str = "failed",
    reply: str | None = "550 5.1.1 <bob@example.test>: user unknown",
    remote_mta: str | None = "mx1.example.test",
    original_recipient: str | None = "rfc822;Bob@example.test",
    last_attempt: datetime | None = ATTEMPT,
) -> RecipientReport:
    code, _, text = (reply or "").partition(" ")
    default = 550 if action == "failed" else 451
    return RecipientReport(
        address=address,
        original_recipient=original_recipient,
        action=action,
        status=status_from_reply(int(code) if code.isdigit() else default, text),
        diagnostic=reply,
        remote_mta=remote_mta,
        last_attempt=last_attempt,
    )


def build(
    *reports: RecipientReport,
    original: bytes = ORIGINAL,
    envid: str | None = None,
    ret: str | None = None,
) -> bytes:
    return build_dsn(
        reporting_mta="backup.test",
        original_sender="alice@sender.test",
        original_message=original,
        reports=reports or (report(),),
        arrival=ARRIVAL,
        now=NOW,
        envid=envid,
        ret=ret,
        message_id="<dsn-1@backup.test>",
    )


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> list[Message]:
    payload = message.get_payload()
    assert isinstance(payload, list)
    return payload


def status_blocks(message: EmailMessage) -> list[Message]:
    status = parts(message)[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return blocks


# -- status_from_reply ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "text", "status"),
    [
        (550, "5.1.1 <bob@example.test>: user unknown", "5.1.1"),
        (550, "550 5.1.1 <bob@example.test>: user unknown", "5.1.1"),  # code repeated
        (552, "5.2.2", "5.2.2"),
        (550, "5.7.100 three-digit detail", "5.7.100"),  # RFC 3463: up to 3 digits
        (451, "4.7.1 greylisted, try again later", "4.7.1"),
        (421, "4.4.2 closing connection", "4.4.2"),
        (250, "2.0.0 Ok", "2.0.0"),
        (550, "4.2.2 mailbox full", "5.0.0"),  # class disagrees with the reply code
        (451, "5.1.1 user unknown", "4.0.0"),
        (550, "user unknown", "5.0.0"),
        (451, "try again later", "4.0.0"),
        (554, "", "5.0.0"),
        (550, "see 5.1.1 in the docs", "5.0.0"),  # only at the start of the text
        (550, "5.1.1000 not a status", "5.0.0"),
        (550, "5.1 incomplete", "5.0.0"),
        (550, "5.1.1.1 too long", "5.0.0"),
        (550, "5.1.1 first line\n550 5.1.2 second line", "5.1.1"),
        (999, "5.1.1 nonsense code", "4.0.0"),  # unknown means temporary
    ],
)
def test_status_from_reply(code: int, text: str, status: str) -> None:
    assert status_from_reply(code, text) == status


# -- a failure report -------------------------------------------------------------------------


def test_a_failure_report_is_a_multipart_report_with_the_three_parts() -> None:
    message = parse(build())

    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert str(message["From"]) == "Mail Delivery System <MAILER-DAEMON@backup.test>"
    assert message["To"].addresses[0].addr_spec == "alice@sender.test"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Message-ID"] == "<dsn-1@backup.test>"
    assert message["Date"].datetime == NOW
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert [part.get_content_type() for part in parts(message)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert not message.defects
    assert all(not part.defects for part in parts(message))


def test_the_human_part_names_each_recipient_and_the_reason() -> None:
    text = parts(parse(build()))[0]

    assert isinstance(text, EmailMessage)
    content = text.get_content()
    assert "backup.test" in content
    assert (
        "<bob@example.test>: host mx1.example.test said: "
        "550 5.1.1 <bob@example.test>: user unknown" in content
    )


def test_the_delivery_status_has_per_message_and_per_recipient_fields() -> None:
    blocks = status_blocks(parse(build(envid="ENV-42")))

    assert len(blocks) == 2
    per_message, recipient = blocks
    assert per_message["Reporting-MTA"] == "dns; backup.test"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVAL
    assert recipient["Original-Recipient"] == "rfc822;Bob@example.test"
    assert recipient["Final-Recipient"] == "rfc822; bob@example.test"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "5.1.1"
    assert recipient["Remote-MTA"] == "dns; mx1.example.test"
    assert recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.test>: user unknown"
    assert email.utils.parsedate_to_datetime(recipient["Last-Attempt-Date"]) == ATTEMPT


def test_without_envid_there_is_no_original_envelope_id() -> None:
    per_message = status_blocks(parse(build()))[0]

    assert per_message["Original-Envelope-Id"] is None


def test_by_default_only_the_original_header_section_is_returned() -> None:
    data = build()
    original = parts(parse(data))[2]

    assert original.get_content_type() == "text/rfc822-headers"
    assert ORIGINAL_HEADERS in data
    assert b"numbers are attached" not in data
    assert "Subject: quarterly numbers" in str(original.get_payload())


@pytest.mark.parametrize("ret", ["HDRS", "hdrs"])
def test_ret_hdrs_returns_the_header_section(ret: str) -> None:
    original = parts(parse(build(ret=ret)))[2]

    assert original.get_content_type() == "text/rfc822-headers"


@pytest.mark.parametrize("ret", ["FULL", "full"])
def test_ret_full_returns_the_whole_original_byte_for_byte(ret: str) -> None:
    data = build(ret=ret)
    original = parts(parse(data))[2]

    assert original.get_content_type() == "message/rfc822"
    inner = original.get_payload()[0]
    assert inner["Message-ID"] == "<orig-1@sender.test>"
    assert "the numbers are attached." in inner.get_content()
    assert ORIGINAL in data


def test_every_line_ends_in_crlf() -> None:
    for data in (build(), build(ret="FULL")):
        assert b"\n" not in data.replace(b"\r\n", b"")
        assert b"\r" not in data.replace(b"\r\n", b"")
        assert data.endswith(b"--\r\n")


# -- several recipients, delays ---------------------------------------------------------------


def test_one_report_covers_several_recipients_each_with_its_own_block() -> None:
    data = build(
        report("bob@example.test"),
        report(
            "carol@example.test",
            reply="552 5.2.2 mailbox full",
            remote_mta="mx2.example.test",
            original_recipient=None,
        ),
        report(
            "dave@example.test",
            reply=None,
            remote_mta=None,
            original_recipient=None,
            last_attempt=None,
        ),
    )
    message = parse(data)
    blocks = status_blocks(message)

    assert [block["Final-Recipient"] for block in blocks[1:]] == [
        "rfc822; bob@example.test",
        "rfc822; carol@example.test",
        "rfc822; dave@example.test",
    ]
    assert [block["Status"] for block in blocks[1:]] == ["5.1.1", "5.2.2", "5.0.0"]
    bob, carol, dave = blocks[1:]
    assert carol["Original-Recipient"] is None
    assert carol["Remote-MTA"] == "dns; mx2.example.test"
    assert carol["Diagnostic-Code"] == "smtp; 552 5.2.2 mailbox full"
    for field in ("Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date", "Original-Recipient"):
        assert dave[field] is None
        assert bob[field] is not None
    text = parts(message)[0].get_payload()
    assert isinstance(text, str)
    for name in ("bob@example.test", "carol@example.test", "dave@example.test"):
        assert name in text
    assert "mailbox full" in text


def test_a_delay_warning_says_the_mail_is_still_being_retried() -> None:
    delayed = report(action="delayed", reply="451 4.4.1 connection timed out")
    message = parse(build(delayed))

    assert message["Subject"] == "Delayed Mail (still being retried)"
    block = status_blocks(message)[1]
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    text = parts(message)[0].get_payload()
    assert isinstance(text, str)
    assert "WARNING ONLY" in text
    assert "will keep trying" in text


def test_a_report_with_failures_and_delays_is_an_undelivered_report() -> None:
    message = parse(
        build(
            report("bob@example.test"),
            report("carol@example.test", action="delayed", reply="451 4.3.0 try later"),
        )
    )

    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert [b["Action"] for b in status_blocks(message)[1:]] == ["failed", "delayed"]


def test_a_multi_line_reply_is_kept_whole_in_the_diagnostic_code() -> None:
    reply = "550-5.1.1 The email account that you tried to reach does not exist.\r\n550 5.1.1 Bye"
    block = status_blocks(parse(build(report(reply=reply))))[1]

    diagnostic = " ".join(block["Diagnostic-Code"].split())
    assert diagnostic == (
        "smtp; 550-5.1.1 The email account that you tried to reach does not exist. 550 5.1.1 Bye"
    )


# -- 8-bit originals --------------------------------------------------------------------------


def test_8bit_original_headers_are_kept_as_bytes_and_labelled_8bit() -> None:
    headers = "From: Zoë <zoe@sender.test>\r\nSubject: Grüße aus Köln\r\n".encode()
    latin1 = b"X-Legacy: caf\xe9\r\n"  # not UTF-8 at all: still returned as it came
    data = build(original=headers + latin1 + b"\r\nbody\r\n")

    assert headers + latin1 in data
    original = parts(parse(data))[2]
    assert original.get_content_type() == "text/rfc822-headers"
    assert original["Content-Transfer-Encoding"] == "8bit"
    assert parse(data)["Content-Transfer-Encoding"] == "8bit"


def test_ret_full_8bit_original_is_returned_unchanged_as_8bit() -> None:
    original_bytes = "Subject: Grüße\r\n\r\nÄrger mit dem Server\r\n".encode()
    data = build(original=original_bytes, ret="FULL")

    assert original_bytes in data
    original = parts(parse(data))[2]
    assert original.get_content_type() == "message/rfc822"
    assert original["Content-Transfer-Encoding"] == "8bit"


def test_an_ascii_report_is_7bit_throughout() -> None:
    data = build(ret="FULL")

    assert data.isascii()
    assert parse(data)["Content-Transfer-Encoding"] == "7bit"


def test_a_utf8_recipient_makes_a_global_delivery_status() -> None:
    data = build(report("zoë@example.test"))
    status = parts(parse(data))[1]

    assert status.get_content_type() == "message/global-delivery-status"
    assert parse(data).get_param("report-type") == "global-delivery-status"  # RFC 6522 3
    assert "Final-Recipient: utf-8; zoë@example.test".encode() in data


# -- edge cases -------------------------------------------------------------------------------


def test_the_boundary_never_occurs_in_the_original() -> None:
    first = build(ret="FULL")
    boundary = re.search(rb'boundary="([^"]+)"', first)
    assert boundary is not None
    hostile = ORIGINAL + b"--" + boundary.group(1) + b"\r\n"

    data = build(original=hostile, ret="FULL")
    original = parts(parse(data))[2]

    assert hostile in data
    assert original.get_content_type() == "message/rfc822"
    assert len(parts(parse(data))) == 3


def test_an_original_without_a_body_is_returned_whole_as_its_headers() -> None:
    data = build(original=ORIGINAL_HEADERS)

    assert ORIGINAL_HEADERS in data
    assert parts(parse(data))[2].get_content_type() == "text/rfc822-headers"


def test_a_report_needs_at_least_one_recipient() -> None:
    with pytest.raises(ValueError, match="at least one"):
        build_dsn(
            reporting_mta="backup.test",
            original_sender="alice@sender.test",
            original_message=ORIGINAL,
            reports=[],
            arrival=ARRIVAL,
            now=NOW,
            message_id="<dsn-1@backup.test>",
        )


def test_the_same_inputs_give_the_same_bytes() -> None:
    assert build(ret="FULL") == build(ret="FULL")
