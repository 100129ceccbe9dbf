"""Real MTAs as the primary: what the relay queued reaches each of them byte for byte.

For each primary (Postfix's smtp-sink, a Postfix instance, Exim, OpenSMTPD) the relay takes mail
while the primary is down, then the primary starts and the relay's probe notices. Each message
must arrive exactly as the relay stored it (its Received header on top of the client's bytes),
compared after the primary's own Received header and in the primary's own line ending. A 7-bit
message with dot lines, an 8-bit one (BODY=8BITMIME), and an SMTPUTF8 one: delivered where the
primary offers SMTPUTF8, bounced with 5.6.7 where it does not (RFC 6531 3.5). A recipient the
primary refuses with a 5xx yields a DSN (RFC 3464) to the sender naming only that recipient,
delivered to the sender's domain (here a second smtp-sink) from the null sender.
"""

from __future__ import annotations

import email
import email.message
import email.parser
import email.policy
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import LOCAL_DNS, RelayProcess, wait_for

from tests.interop.mtas import (
    Capture,
    EximPrimary,
    OpenSmtpdPrimary,
    PostfixPrimary,
    Server,
    SmtpSink,
    free_port,
    running,
)
from tests.interop.support import (
    RELAY_ADDRESS,
    relay_config,
    stored_bodies,
    submit,
    wait_queue_empty,
)

pytestmark = pytest.mark.interop

DOMAIN = "example.test"
SENDER_DOMAIN = "sender.test"
SENDER = f"alice@{SENDER_DOMAIN}"
PRIMARY_ADDRESS = "127.0.0.11"
STRICT_ADDRESS = "127.0.0.12"  # smtp-sink cannot refuse one recipient: a second one refuses all
DSN_ADDRESS = "127.0.0.9"
STRICT_DOMAIN = "strict.test"


def message(kind: str, subject: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"From: Alice <alice@sender.test>\r\n"
        b"To: <bob@example.test>\r\n"
        b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <" + kind.encode() + b"@sender.test>\r\n"
        b"Subject: " + subject.encode() + b"\r\n" + extra + b"\r\n" + body
    )


PLAIN = message(
    "plain",
    "interop plain",
    b"A 7-bit message.\r\n"
    b".A line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"trailing spaces   \r\n" + b"x" * 900 + b"\r\n"
    b"\r\n"
    b"-- \r\nthe end\r\n",
)
EIGHTBIT = message(
    "eightbit",
    "interop 8bit",
    "Grüße aus Köln, ça va? Ελληνικά, 日本語.\r\n".encode()
    + b"latin-1 bytes: caf\xe9 \xff\xfe\r\n",
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n",
)
UTF8 = message(
    "utf8",
    "interop utf8",
    "Jörg's mailbox has a UTF-8 name.\r\n".encode(),
    "X-Recipient: jörg@example.test\r\n".encode(),
)
REFUSED = message("refused", "interop refused", b"one of us is unknown there\r\n")


@dataclass
class Peer:
    """A primary under test, the servers to start for it, and who it refuses."""

    primary: Server
    servers: list[Server]
    domains: dict[str, str]
    refused: str
    smtputf8: bool
    refusal: str = "no such user here"  # what the primary says to the refused recipient


def sink_peer(workdir: Path, port: int) -> Peer:
    sink = SmtpSink(workdir / "sink", PRIMARY_ADDRESS, port)
    strict = SmtpSink(
        workdir / "strict",
        STRICT_ADDRESS,
        port,
        ["-f", "RCPT", "-B", "550 5.1.1 Recipient address rejected: no such user here"],
    )
    return Peer(
        sink,
        [sink, strict],
        {DOMAIN: sink.hostport, STRICT_DOMAIN: strict.hostport},
        f"nobody@{STRICT_DOMAIN}",
        smtputf8=False,
    )


def mta_peer(
    kind: Callable[..., Server], smtputf8: bool, refusal: str = "no such user here"
) -> Callable[[Path, int], Peer]:
    def make(workdir: Path, port: int) -> Peer:
        refused = f"refused@{DOMAIN}"
        server = kind(workdir / "primary", PRIMARY_ADDRESS, port, [DOMAIN], [refused])
        return Peer(server, [server], {DOMAIN: server.hostport}, refused, smtputf8, refusal)

    return make


PEERS = {
    "smtp-sink": sink_peer,
    "postfix": mta_peer(PostfixPrimary, smtputf8=True),
    "exim": mta_peer(EximPrimary, smtputf8=True),
    # OpenSMTPD's reject has a fixed text.
    "opensmtpd": mta_peer(OpenSmtpdPrimary, smtputf8=False, refusal="Invalid recipient"),
}


def captures_with(primary: Server, marker: bytes) -> list[Capture]:
    return [c for c in primary.captures() if marker in c.raw]


def dsn_reports(capture: Capture) -> list[email.message.Message]:
    """The per-recipient blocks of a multipart/report DSN (RFC 3464 2.3, and RFC 6533's
    message/global-delivery-status for a report on an SMTPUTF8 message, whose UTF-8 fields the
    email package would parse as one embedded message: split here by hand instead)."""
    report = email.message_from_bytes(capture.delivered, policy=email.policy.compat32)
    assert report.get_content_type() == "multipart/report", capture.raw[:500]
    assert str(report.get_param("report-type")).endswith("delivery-status")
    boundary = report.get_boundary()
    assert boundary is not None
    text = capture.delivered.replace(b"\r\n", b"\n").decode("utf-8")
    kind = re.compile(r"^Content-Type: message/(global-)?delivery-status", re.I | re.M)
    status = [part for part in text.split(f"--{boundary}") if kind.search(part)]
    assert len(status) == 1, capture.raw[:500]
    fields = status[0].strip("\n").split("\n\n", 1)[1]
    parser = email.parser.HeaderParser(policy=email.policy.compat32)
    blocks = [parser.parsestr(block + "\n") for block in fields.strip("\n").split("\n\n")]
    return blocks[1:]  # the first block is about the message, the others one recipient each


@pytest.mark.parametrize("name", sorted(PEERS))
def test_queued_mail_reaches_a_real_primary_byte_exact_and_its_5xx_becomes_a_dsn(
    name: str,
    workdir: Path,
    tmp_path: Path,
    relay_process: Callable[[Path], RelayProcess],
    request: pytest.FixtureRequest,
) -> None:
    port = free_port(PRIMARY_ADDRESS, STRICT_ADDRESS, DSN_ADDRESS, RELAY_ADDRESS)
    # The sender passes SPF at the relay: its bounces are owed (no backscatter rule, issue 15).
    LOCAL_DNS.set(f"{SENDER_DOMAIN}.", [("TXT", '"v=spf1 ip4:127.0.0.0/8 -all"')])
    request.addfinalizer(lambda: LOCAL_DNS.set(f"{SENDER_DOMAIN}.", []))
    peer = PEERS[name](workdir, port)
    catcher = SmtpSink(workdir / "dsn", DSN_ADDRESS, port)
    config = relay_config(tmp_path, port, {**peer.domains, SENDER_DOMAIN: catcher.hostport})
    queue = tmp_path / "queue" / "queue.db"

    with running(catcher):
        relay = relay_process(config)
        assert relay.address is not None
        # The primary is down: everything is queued.
        ids = {
            "plain": submit(relay.address, SENDER, [f"bob@{DOMAIN}"], PLAIN),
            "eightbit": submit(
                relay.address, SENDER, [f"carol@{DOMAIN}"], EIGHTBIT, ["BODY=8BITMIME"]
            ),
            "utf8": submit(
                relay.address, SENDER, [f"jörg@{DOMAIN}"], UTF8, ["SMTPUTF8", "BODY=8BITMIME"]
            ),
            "refused": submit(relay.address, SENDER, [f"dave@{DOMAIN}", peer.refused], REFUSED),
        }
        bodies = stored_bodies(queue, list(ids.values()))
        for kind, content in (
            ("plain", PLAIN),
            ("eightbit", EIGHTBIT),
            ("utf8", UTF8),
            ("refused", REFUSED),
        ):
            body = bodies[ids[kind]]
            assert body.startswith(b"Received: from client.test ") and body.endswith(content)

        with running(*peer.servers):
            wait_queue_empty(queue, f"the relay to empty its queue into {name}")

            expected_copies = {"plain": 1, "eightbit": 1, "refused": 1}
            if peer.smtputf8:
                expected_copies["utf8"] = 1
            # A 250 from the primary comes before its own local delivery writes the file.
            wait_for(
                lambda: all(
                    len(captures_with(peer.primary, f"<{kind}@sender.test>".encode())) >= copies
                    for kind, copies in expected_copies.items()
                ),
                f"{name} to store what it accepted",
            )
            for kind, copies in expected_copies.items():
                found = captures_with(peer.primary, f"<{kind}@sender.test>".encode())
                assert len(found) == copies, (kind, [c.name for c in found], peer.primary.log())
                assert found[0].delivered == found[0].expected(bodies[ids[kind]]), kind
            if not peer.smtputf8:
                assert not captures_with(peer.primary, b"<utf8@sender.test>")

            dsns = catcher.captures()
            failed = {}
            for capture in dsns:
                assert capture.mail_args.startswith("<>"), capture.mail_args  # null sender
                assert capture.rcpt_args == (f"<{SENDER}>",)
                for block in dsn_reports(capture):
                    failed[str(block["Final-Recipient"])] = block
            expected_failures = {f"rfc822; {peer.refused}"}
            if not peer.smtputf8:
                expected_failures.add(f"utf-8; jörg@{DOMAIN}")  # RFC 6533 3.1
            assert set(failed) == expected_failures, failed.keys()

            refusal = failed[f"rfc822; {peer.refused}"]
            assert refusal["Action"] == "failed"
            assert str(refusal["Status"]).startswith("5.")
            diagnostic = str(refusal["Diagnostic-Code"])
            assert diagnostic.startswith("smtp; 5") and peer.refusal in diagnostic, diagnostic
            if not peer.smtputf8:
                utf8 = failed[f"utf-8; jörg@{DOMAIN}"]
                assert utf8["Status"] == "5.6.7", utf8
