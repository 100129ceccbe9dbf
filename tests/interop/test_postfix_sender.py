"""A real Postfix as the sender: its primary is dead, so its `smtp_fallback_relay` (us) gets the
mail, and we hand it to the primary when the primary comes back.

The sending Postfix is a private instance fed by `sendmail -C DIR`; example.test is routed to
the primary's address, where nothing listens yet. Postfix must give up on the primary, deliver
to the relay, and empty its own queue; the relay must hold the mail (with Postfix's trace header
under ours) until smtp-sink starts on the primary's address, then deliver it there byte-exact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import RelayProcess, open_store, wait_for

from tests.interop.mtas import PostfixSender, SmtpSink, free_port, running
from tests.interop.support import RELAY_ADDRESS, relay_config, stored_bodies, wait_queue_empty

pytestmark = pytest.mark.interop

PRIMARY_ADDRESS = "127.0.0.10"
SENDER_ADDRESS = "127.0.0.3"

MESSAGES = {
    "plain": (
        ["bob@example.test"],
        b"From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: fallback plain\r\n"
        b"Message-ID: <plain@sender.test>\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\n"
        b"Sent while the primary was down.\r\n.a line with a leading dot\r\n",
    ),
    "eightbit": (
        ["bob@example.test", "carol@example.test"],
        b"From: alice@sender.test\r\nTo: bob@example.test, carol@example.test\r\n"
        b"Subject: fallback 8bit\r\nMessage-ID: <eightbit@sender.test>\r\n"
        b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + "Grüße, ça marche: 8-bit text in the body.\r\n".encode(),
    ),
}


@pytest.mark.parametrize("workers", [1, 2])
def test_postfix_falls_back_to_the_relay_which_delivers_when_the_primary_returns(
    workdir: Path, tmp_path: Path, relay_process: Callable[[Path], RelayProcess], workers: int
) -> None:
    """With smtp.workers = 2, Postfix talks to an SMTP worker and the relay process delivers."""
    port = free_port(PRIMARY_ADDRESS, RELAY_ADDRESS)
    primary = SmtpSink(workdir / "primary", PRIMARY_ADDRESS, port)
    domains = {"example.test": primary.hostport}
    config = relay_config(tmp_path, port, domains, smtp={"workers": workers})
    queue = tmp_path / "queue" / "queue.db"
    relay = relay_process(config)
    assert relay.address is not None
    assert ("SMTP worker 2 (pid" in relay.log()) == (workers == 2)
    sender = PostfixSender(
        workdir / "postfix",
        SENDER_ADDRESS,
        dead_primary=primary.hostport,
        fallback=f"{RELAY_ADDRESS}:{port}",
        domain="example.test",
    )

    with running(sender):
        for recipients, content in MESSAGES.values():
            sender.sendmail("alice@sender.test", recipients, content)

        def queued_here() -> list[str]:
            with open_store(queue) as store:
                messages = store.list_messages()
            return [m.id for m in messages] if len(messages) == len(MESSAGES) else []

        ids = wait_for(queued_here, "Postfix to fall back to the relay", 60)
        wait_for(lambda: "Mail queue is empty" in sender.queue_listing(), "Postfix's queue")
        log = sender.log()
        assert f"connect to {PRIMARY_ADDRESS}[{PRIMARY_ADDRESS}]:{port}: Connection refused" in log
        assert f"relay={RELAY_ADDRESS}[{RELAY_ADDRESS}]:{port}" in log

    bodies = stored_bodies(queue, ids)
    by_kind = {}
    with open_store(queue) as store:
        for queue_id in ids:
            row = store.get(queue_id)
            assert row is not None
            assert row.client_ip == SENDER_ADDRESS and row.helo == "sender.test"
            kind = "eightbit" if b"<eightbit@" in bodies[queue_id] else "plain"
            by_kind[kind] = queue_id
            assert sorted(r.address for r in row.recipients) == MESSAGES[kind][0]
            assert row.eightbit == (kind == "eightbit")  # Postfix said BODY=8BITMIME
    for kind, queue_id in by_kind.items():
        body = bodies[queue_id]
        # Our trace header, then Postfix's, then what was given to sendmail.
        ours, theirs = body.split(b"\r\nReceived: ", 1)
        assert ours.startswith(f"Received: from sender.test ([{SENDER_ADDRESS}])".encode())
        assert b"by sender.test (Postfix" in theirs
        assert body.endswith(MESSAGES[kind][1].split(b"\r\n\r\n", 1)[1])

    with running(primary):
        wait_queue_empty(queue, "the relay to deliver to the returning primary")
        wait_for(lambda: len(primary.captures()) >= len(MESSAGES), "the primary's dumps")
        captures = primary.captures()
    assert len(captures) == len(MESSAGES)
    for capture in captures:
        kind = "eightbit" if b"<eightbit@" in capture.raw else "plain"
        assert capture.delivered == capture.expected(bodies[by_kind[kind]])
        recipients = sorted(args.split()[0] for args in capture.rcpt_args)
        assert recipients == [f"<{r}>" for r in MESSAGES[kind][0]]
