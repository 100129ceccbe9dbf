"""Delivery status notifications (RFC 3464) built as bytes: pure functions, no I/O, no clock.

The returned message goes back into our own queue and out over SMTP unchanged, so it is built
byte by byte with CRLF line ends rather than with the `email` package: the original message is
copied in exactly as we received it (8-bit headers, odd line lengths and all). Re-parsing and
re-generating it would "repair" what the sender needs to see, or fail on it.

A report is a multipart/report (RFC 6522) of three parts: a text for people, the
message/delivery-status for programs, and the original's header section (text/rfc822-headers) or,
when the sender asked with RET=FULL (RFC 3461 4.3), the whole original (message/rfc822).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from relay.words import one_line

FAILED = "failed"
DELAYED = "delayed"
CRLF = b"\r\n"
MAX_LINE = 998  # RFC 5322 2.1.1: longer lines make the content "binary" (RFC 2045 2.8)

# RFC 3463 2: class "." subject "." detail; the class must agree with the reply code's first digit.
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_REPLY_CODE = re.compile(r"[2-5]\d\d[ -]")


@dataclass(frozen=True)
class RecipientReport:
    """One recipient's line in a report: what happened and the remote's words for it."""

    address: str  # final recipient
    original_recipient: str | None  # ORCPT as given at intake, e.g. "rfc822;Alice@example.org"
    action: str  # "failed" or "delayed"
    status: str  # "5.1.1" etc. (status_from_reply derives it)
    diagnostic: str | None  # the remote SMTP reply whole, "550 5.1.1 <a@x>: user unknown"
    remote_mta: str | None  # host name of the MTA that gave the reply
    last_attempt: datetime | None


def status_from_reply(code: int, text: str) -> str:
    """The RFC 3463 status for an SMTP reply: its enhanced code, else "5.0.0" / "4.0.0".

    An enhanced code whose class disagrees with the reply code is ignored (RFC 3463 2: the class
    repeats the reply's meaning, and a server that says "550 4.2.2" is not to be believed on the
    detail). `text` may start with the reply code ("550 5.1.1 …") or without it ("5.1.1 …").
    """
    klass = code // 100
    if klass not in (2, 4, 5):
        klass = 4  # not a reply we understand: unknown means temporary
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    if _REPLY_CODE.match(first_line):
        first_line = first_line[4:]
    match = _ENHANCED.match(first_line)
    if match and int(match.group(1)) == klass:
        return match.group(0)
    return f"{klass}.0.0"


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    original_message: bytes,
    reports: Sequence[RecipientReport],
    arrival: datetime,
    now: datetime,
    envid: str | None = None,
    ret: str | None = None,
    message_id: str,
    postmaster: str | None = None,
    to: str | None = None,
) -> bytes:
    """A complete RFC 5322 message reporting on `reports`, CRLF line ends throughout.

    `ret` is the sender's RET parameter: "FULL" returns the whole original, anything else (HDRS,
    or none given) only its header section: RFC 3461 4.3 leaves the default to us, and headers
    are enough to recognise the message without sending a large body back.
    """
    if not reports:
        raise ValueError("a DSN needs at least one recipient report")
    full = (ret or "").upper() == "FULL"
    original = original_message if full else header_section(original_message)
    status = delivery_status(reporting_mta, reports, arrival, envid)
    explanation = _lines(_explanation(reporting_mta, reports, full, postmaster))
    parts = [
        (_lines(_text_headers(explanation)), explanation),
        (_lines(_status_headers(status)), status),
        (_lines(_original_headers(original, full)), original),
    ]
    boundary = _boundary(message_id, [body for _, body in parts])
    any_failed = any(r.action == FAILED for r in reports)
    subject = (
        "Undelivered Mail Returned to Sender"
        if any_failed
        else "Delayed Mail (still being retried)"
    )
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{to if to is not None else original_sender}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",  # RFC 3834 5: no auto-reply to this, ever
        "MIME-Version: 1.0",
        # RFC 6522 3: report-type names the subtype of the second part (RFC 6533 6).
        "Content-Type: multipart/report;"
        f" report-type={delivery_status_type(status).removeprefix('message/')};",
        f'\tboundary="{boundary}"',
        "Content-Transfer-Encoding: " + _encoding(b"".join(body for _, body in parts)),
    ]
    out = [_lines(headers), CRLF, b"This is a MIME-encapsulated message." + CRLF]
    for part_headers, body in parts:
        # RFC 2046 5.1.1: the CRLF before a delimiter belongs to the delimiter, not the body.
        out += [CRLF, b"--" + boundary.encode() + CRLF, part_headers, CRLF, body]
        if body and not body.endswith(CRLF):
            out.append(CRLF)
    out += [CRLF, b"--" + boundary.encode() + b"--" + CRLF]
    return b"".join(out)


def header_section(message: bytes) -> bytes:
    """The original's header section, up to and including the CRLF that ends its last field."""
    end = message.find(b"\r\n\r\n")
    if end >= 0:
        return message[: end + 2]
    if message.startswith(CRLF):
        return b""  # no header fields at all
    return message  # header fields only, no body


def delivery_status(
    reporting_mta: str,
    reports: Sequence[RecipientReport],
    arrival: datetime,
    envid: str | None = None,
) -> bytes:
    """The message/delivery-status body: per-message fields, then one block per recipient.

    Blocks are separated by a blank line (RFC 3464 2.1). An address that is not ASCII is typed
    "utf-8" rather than "rfc822" (RFC 6533 3), and `delivery_status_type` then names the part
    message/global-delivery-status.
    """
    message_fields = [f"Reporting-MTA: dns; {reporting_mta}"]
    if envid:
        message_fields.append(f"Original-Envelope-Id: {one_line(envid)}")
    message_fields.append(f"Arrival-Date: {_date(arrival)}")
    blocks = [_lines(message_fields)] + [_lines(_recipient_fields(r)) for r in reports]
    return CRLF.join(blocks)


def _recipient_fields(report: RecipientReport) -> list[str]:
    fields = []
    if report.original_recipient:
        fields.append(f"Original-Recipient: {one_line(report.original_recipient)}")
    address_type = "rfc822" if report.address.isascii() else "utf-8"
    fields += [
        f"Final-Recipient: {address_type}; {report.address}",
        f"Action: {report.action}",
        f"Status: {report.status}",
    ]
    if report.remote_mta:
        fields.append(f"Remote-MTA: dns; {report.remote_mta}")
    if report.diagnostic:
        fields.append(f"Diagnostic-Code: smtp; {_folded(report.diagnostic)}")
    if report.last_attempt:
        fields.append(f"Last-Attempt-Date: {_date(report.last_attempt)}")
    return fields


# -- the human-readable part ---------------------------------------------------------------


def _explanation(
    reporting_mta: str, reports: Sequence[RecipientReport], full: bool, postmaster: str | None
) -> list[str]:
    failed = [r for r in reports if r.action == FAILED]
    delayed = [r for r in reports if r.action != FAILED]
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if failed:
        lines += [
            "I'm sorry to have to inform you that your message could not be delivered",
            "to one or more recipients. "
            + ("It is attached below." if full else "Its header section is attached below."),
            "",
            f"For further assistance, please send mail to <{postmaster}>."
            if postmaster
            else "For further assistance, please send mail to postmaster.",
            "",
            "The mail system",
            "",
        ]
        lines += _reasons(failed)
    if delayed:
        if failed:
            lines.append("")
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered yet to the recipients below.",
            "The mail system will keep trying to deliver it.",
            "",
        ]
        lines += _reasons(delayed)
    return lines


def _reasons(reports: Sequence[RecipientReport]) -> list[str]:
    lines = []
    for report in reports:
        if report.diagnostic and report.remote_mta:
            reason = f"host {report.remote_mta} said: {one_line(report.diagnostic)}"
        elif report.diagnostic:
            reason = one_line(report.diagnostic)
        else:
            reason = f"delivery status {report.status}"
        lines += [f"<{report.address}>: {reason}", ""]
    return lines


# -- MIME plumbing --------------------------------------------------------------------------


def _text_headers(body: bytes) -> list[str]:
    charset = "us-ascii" if body.isascii() else "utf-8"
    return [
        "Content-Description: Notification",
        f"Content-Type: text/plain; charset={charset}",
        f"Content-Transfer-Encoding: {_encoding(body)}",
    ]


def _status_headers(status: bytes) -> list[str]:
    return [
        "Content-Description: Delivery report",
        f"Content-Type: {delivery_status_type(status)}",
        f"Content-Transfer-Encoding: {_encoding(status)}",
    ]


def delivery_status_type(status: bytes) -> str:
    """RFC 6533 6.2: a status with UTF-8 in it is message/global-delivery-status."""
    return "message/delivery-status" if status.isascii() else "message/global-delivery-status"


def _original_headers(original: bytes, full: bool) -> list[str]:
    if full:
        return [
            "Content-Description: Undelivered Message",
            "Content-Type: message/rfc822",
            # RFC 2046 5.2.1: message/rfc822 allows only 7bit, 8bit or binary.
            f"Content-Transfer-Encoding: {_encoding(original)}",
        ]
    charset = "" if original.isascii() else "; charset=utf-8"
    return [
        "Content-Description: Undelivered Message Headers",
        f"Content-Type: text/rfc822-headers{charset}",
        f"Content-Transfer-Encoding: {_encoding(original)}",
    ]


def _encoding(data: bytes) -> str:
    """The identity encoding that describes `data` truthfully (RFC 2045 2.7–2.9).

    Never a re-encoding: the original travels as received. "binary" (NUL, a bare CR or LF, a
    line over 998 octets) is only ever a truthful label for what SMTP received that way.
    """
    between_lines = data.replace(CRLF, b"")
    if (
        b"\0" in data
        or b"\r" in between_lines
        or b"\n" in between_lines
        or any(len(line) > MAX_LINE for line in data.split(CRLF))
    ):
        return "binary"
    return "7bit" if data.isascii() else "8bit"


def _boundary(message_id: str, bodies: list[bytes]) -> str:
    """A boundary that occurs in no part, derived from the inputs so the output is repeatable."""
    seed = hashlib.sha256(message_id.encode("utf-8", "replace")).hexdigest()[:24]
    for attempt in range(1000):
        boundary = f"=_dsn_{seed}_{attempt}"
        marker = b"--" + boundary.encode()
        if not any(marker in body for body in bodies):
            return boundary
    raise ValueError("no MIME boundary found that the message does not contain")


def _lines(lines: list[str]) -> bytes:
    return b"".join(line.encode("utf-8") + CRLF for line in lines)


def _folded(text: str) -> str:
    """A multi-line SMTP reply as one folded field value (RFC 5322 2.2.3)."""
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    return "\r\n ".join(lines)


def _date(when: datetime) -> str:
    """An RFC 5322 date; a naive datetime is taken as UTC."""
    return format_datetime(when if when.tzinfo else when.replace(tzinfo=UTC))
