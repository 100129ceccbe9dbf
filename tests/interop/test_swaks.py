"""swaks sessions against the real `relay serve`: SIZE, PIPELINING, STARTTLS, 8BITMIME, SMTPUTF8
and the DSN parameters, as a widely used SMTP test client speaks them.

The relay has a certificate from a trustme CA for relay.test and its address, so swaks verifies
it. swaks (20201014, Debian 12) has no option for MAIL/RCPT parameters; the usual workaround is
used: the address closes its own angle bracket and the parameters follow, so swaks' closing '>'
ends the last parameter's value. ENVID and ORCPT go last and open a '<' for it (both are xtext,
where '<' and '>' are plain characters), and the test checks that exactly those values are
stored and handed on to the primary.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from conftest import RelayProcess, dot_stuff, open_store, split_trace, wait_for

from tests.interop.mtas import SmtpSink, free_port, running
from tests.interop.support import RELAY_ADDRESS, relay_config, stored_bodies, wait_queue_empty

pytestmark = pytest.mark.interop

PRIMARY = "127.0.0.11"
MAX_SIZE = 64 * 1024
CONTENT = (
    b"From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: swaks 8bit\r\n"
    b"Message-ID: <swaks-1@client.test>\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n"
    + "Grüße über STARTTLS.\r\n".encode()
    + b".a line with a leading dot\r\nlast line\r\n"
)


@dataclass
class Setup:
    relay: RelayProcess
    queue: Path
    primary: SmtpSink
    ca_path: Path
    workdir: Path

    def swaks(self, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Runs swaks against the relay; its exit status and transcript (stdout and stderr)."""
        assert self.relay.address is not None
        host, port = self.relay.address
        command = ["swaks", "--server", f"{host}:{port}", "--helo", "client.test", *args]
        if data is not None:
            message = self.workdir / "message.eml"
            message.write_bytes(data)
            command += ["--data", f"@{message}"]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=60, check=False, errors="replace"
        )


@pytest.fixture
def setup(workdir: Path, tmp_path: Path, relay_process: Callable[[Path], RelayProcess]) -> Setup:
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test", RELAY_ADDRESS)
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    port = free_port(PRIMARY, RELAY_ADDRESS)
    primary = SmtpSink(workdir / "primary", PRIMARY, port)
    config = relay_config(
        tmp_path,
        port,
        {"example.test": primary.hostport},
        tls={"cert": str(cert_path), "key": str(key_path)},
        smtp={"listen": [f"{RELAY_ADDRESS}:{port}"], "max_message_size": MAX_SIZE},
    )
    return Setup(relay_process(config), tmp_path / "queue" / "queue.db", primary, ca_path, workdir)


def received(transcript: str) -> list[str]:
    """The server's lines as swaks shows them ("<-  250 …", "<** 550 …", "<~  …" under TLS)."""
    return [
        line[4:] for line in transcript.splitlines() if line[:3] in ("<- ", "<**", "<~ ", "<~*")
    ]


def ehlo_keywords(lines: Sequence[str]) -> list[list[str]]:
    """Every EHLO reply's keywords, in order."""
    replies: list[list[str]] = []
    current: list[str] | None = None
    for line in lines:
        if line.startswith("250-") and current is None:
            current = []  # the first line is the greeting
        elif line.startswith("250") and current is not None:
            current.append(line[4:])
            if line[3] == " ":
                replies.append(current)
                current = None
    return replies


def test_swaks_sees_size_pipelining_8bitmime_smtputf8_dsn_and_starttls_offered_once(
    setup: Setup,
) -> None:
    done = setup.swaks(
        "-tls", "--tls-verify", "--tls-ca-path", str(setup.ca_path), "--quit-after", "AUTH"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "TLS started" in done.stdout
    before, after = ehlo_keywords(received(done.stdout))
    for keyword in (f"SIZE {MAX_SIZE}", "PIPELINING", "8BITMIME", "SMTPUTF8", "DSN"):
        assert keyword in before and keyword in after, keyword
    assert "ENHANCEDSTATUSCODES" in before
    assert "STARTTLS" in before and "STARTTLS" not in after  # RFC 3207 4.2


def test_swaks_message_over_verified_starttls_with_pipelining_and_dsn_is_kept_exactly(
    setup: Setup,
) -> None:
    done = setup.swaks(
        "-tls",
        "--tls-verify",
        "--tls-ca-path",
        str(setup.ca_path),
        "--pipeline",
        "--no-data-fixup",
        "--from",
        f"alice@sender.test> SIZE={len(CONTENT)} BODY=8BITMIME RET=HDRS ENVID=<swaks-1@client",
        "--to",
        "bob@example.test> NOTIFY=FAILURE ORCPT=rfc822;<bob@example.test",
        data=dot_stuff(CONTENT),  # --no-data-fixup: swaks sends these bytes as they are
    )
    assert done.returncode == 0, done.stdout + done.stderr
    transcript = done.stdout.splitlines()
    sent_data = next(i for i, line in enumerate(transcript) if line.startswith(" ~> DATA"))
    mail_ok = next(i for i, line in enumerate(transcript) if "250 2.1.0 Ok" in line)
    assert sent_data < mail_ok, "MAIL, RCPT and DATA were not pipelined (RFC 2920)"
    lines = received(done.stdout)
    assert lines[-2].startswith("250 2.0.0 Ok: queued as "), lines
    queue_id = lines[-2].rsplit(" ", 1)[1]

    with open_store(setup.queue) as store:
        row = store.get(queue_id)
    assert row is not None
    assert (row.sender, row.eightbit, row.smtputf8) == ("alice@sender.test", True, False)
    assert (row.ret, row.envid) == ("HDRS", "<swaks-1@client>")
    [recipient] = row.recipients
    assert (recipient.address, recipient.notify, recipient.orcpt) == (
        "bob@example.test",
        "FAILURE",
        "rfc822;<bob@example.test>",
    )
    body = stored_bodies(setup.queue, [queue_id])[queue_id]
    trace, results, rest = split_trace(body)
    assert b"with ESMTPS id " + queue_id.encode() in trace
    assert b"(using TLSv1." in trace
    assert b"\r\n\tfor <bob@example.test>; " in trace
    assert results.startswith(b"Authentication-Results: ")  # the sender checks ran (issue 15)
    assert rest == CONTENT  # after our trace headers: what swaks sent, unstuffed

    with running(setup.primary):
        wait_queue_empty(setup.queue, "delivery to the primary")
        wait_for(lambda: setup.primary.captures(), "the primary's dump")
    [capture] = setup.primary.captures()
    assert capture.mail_args == "<alice@sender.test> BODY=8BITMIME RET=HDRS ENVID=<swaks-1@client>"
    assert capture.rcpt_args == (
        "<bob@example.test> NOTIFY=FAILURE ORCPT=rfc822;<bob@example.test>",
    )
    assert capture.delivered == capture.expected(body)


def test_swaks_utf8_address_is_taken_with_smtputf8_and_refused_without(setup: Setup) -> None:
    refused = setup.swaks("--from", "alice@sender.test", "--to", "jörg@example.test")
    assert refused.returncode == 24, refused.stdout  # swaks: every recipient refused
    assert "553 5.6.7 Non-ASCII address requires SMTPUTF8" in received(refused.stdout)

    taken = setup.swaks(
        "--from",
        "alice@sender.test> SMTPUTF8 ENVID=<utf8",
        "--to",
        "jörg@example.test",
        "--pipeline",
    )
    assert taken.returncode == 0, taken.stdout
    queue_id = received(taken.stdout)[-2].rsplit(" ", 1)[1]
    with open_store(setup.queue) as store:
        row = store.get(queue_id)
    assert row is not None and row.smtputf8
    assert [r.address for r in row.recipients] == ["jörg@example.test"]
    body = stored_bodies(setup.queue, [queue_id])[queue_id]
    assert b" with UTF8SMTP id " in body.split(b"\r\n\r\n")[0]  # RFC 6531 3.7.3


def test_swaks_size_over_the_limit_is_refused_at_mail_and_after_data(setup: Setup) -> None:
    declared = setup.swaks(
        "--from", f"alice@sender.test> SIZE={MAX_SIZE + 1} ENVID=<big", "--to", "bob@example.test"
    )
    assert declared.returncode == 23, declared.stdout  # swaks: MAIL refused
    assert "552 5.3.4 Message size exceeds fixed limit" in received(declared.stdout)

    big = b"Subject: too big\r\n\r\n" + b"x" * 998 + b"\r\n"
    undeclared = setup.swaks(
        "--from",
        "alice@sender.test",
        "--to",
        "bob@example.test",
        "--no-data-fixup",
        "--suppress-data",
        data=dot_stuff(big * (MAX_SIZE // len(big) + 1)),
    )
    assert undeclared.returncode == 26, undeclared.stdout[-2000:]  # swaks: refused after data
    assert "552 5.3.4 Message size exceeds fixed limit" in received(undeclared.stdout)

    within = setup.swaks(
        "--from", f"alice@sender.test> SIZE={MAX_SIZE} ENVID=<fits", "--to", "bob@example.test"
    )
    assert within.returncode == 0, within.stdout
    with open_store(setup.queue) as store:
        assert len(store.list_messages()) == 1  # only the last one
