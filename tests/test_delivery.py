"""The delivery scheduler against real fake primaries over TCP, with an injected clock.

Each test drives `Scheduler.tick()` itself and waits for the sessions it started (`settle()`),
so retries, backoff and lifetime are exercised by moving the clock, never by sleeping.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from relay import config as config_module
from relay.authresults import AuthResults
from relay.delivery import scheduler as delivery
from relay.delivery.mx import Router
from relay.delivery.outcomes import OPERATOR_BOUNCE, backoff
from relay.delivery.scheduler import Scheduler
from relay.envelope import domain_of
from relay.ops import metrics
from relay.store import FAILED, HELD, QUEUED, AsyncStore, NewMessage, NewRecipient, Store
from tests.conftest import LOCAL_DNS
from tests.dnsserver import DnsServer, dns_server
from tests.fakeprimary import FakePrimary, fake_primary, unused_port
from tests.hostile import eventually

__all__ = ["dns_server", "fake_primary"]

BODY = b"Received: from x by y; Sun, 29 Nov 2026 10:00:00 +0000\r\nSubject: hi\r\n\r\nhello\r\n"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, tmp_path: Path, clock: Clock) -> None:
        self.tmp_path = tmp_path
        self.clock = clock
        self.store = AsyncStore(str(tmp_path / "queue.db"), clock)
        self.settings: dict[str, Any] = {}
        self.scheduler: Scheduler | None = None
        self._count = 0

    def configure(
        self,
        primary: list[str],
        nameservers: list[str] | None = None,
        mx_port: int = 25,
        postmaster: str | None = None,
        **sections: Any,
    ) -> None:
        data: dict[str, Any] = {
            "hostname": "relay.test",
            "smtp": {"listen": [f"127.0.0.20:{mx_port}"]},
            "queue": {"path": str(self.tmp_path / "queue.db")},
            "retry": {"min": "1m", "max": "10m"},
            "delivery": {"per_host_concurrency": 1, "probe_interval": "1s"},
            "dns": {"nameservers": nameservers or [LOCAL_DNS.address]},
            "domain": [{"name": "example.test", "primary": primary, "tls": "none"}],
        }
        data["delivery"]["mx_port"] = mx_port
        if postmaster is not None:
            data["postmaster"] = postmaster
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        cfg = config_module.from_mapping(data, "test.toml")
        router = Router(
            hostname="relay.test",
            listen=[("127.0.0.20", mx_port)],
            nameservers=cfg.dns.nameservers,
            mx_port=mx_port,
            timeout=2.0,
        )
        self.scheduler = Scheduler(
            store=self.store,
            get_config=lambda: cfg,
            router=router,
            clock=self.clock,
            rng=random.Random(7),
        )

    async def put(
        self,
        recipients: list[str],
        sender: str = "alice@sender.test",
        body: bytes = BODY,
        **fields: Any,
    ) -> str:
        self._count += 1
        if sender and "auth" not in fields:
            # As intake stores it for a sender whose SPF passed: these tests are about what a
            # DSN says, so its sender is one a DSN may go to (unauthenticated: test_auth.py).
            fields["auth"] = AuthResults(spf="pass", spf_domain=domain_of(sender)).to_json()
        message = NewMessage(
            id=f"M{self._count:04d}",
            sender=sender,
            recipients=tuple(NewRecipient(r) for r in recipients),
            body=body,
            received_at=self.clock.now,
            **fields,
        )
        await self.store.put(message)
        return message.id

    async def run(self) -> None:
        assert self.scheduler is not None
        await self.scheduler.tick()
        await self.scheduler.settle()

    def rows(self) -> Store:
        return Store(str(self.tmp_path / "queue.db"), self.clock)


@pytest_asyncio.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path, Clock())
    yield h
    if h.scheduler is not None:
        await h.scheduler.stop()
    h.store.close()


Start = Callable[..., Awaitable[FakePrimary]]


def _message_ids(store: Store) -> set[str]:
    return {m.id for m in store.list_messages()}


async def test_queued_mail_reaches_the_primary_byte_for_byte(
    harness: Harness, fake_primary: Start
) -> None:
    fake = await fake_primary()
    harness.configure([f"{fake.address}:{fake.port}"])
    body = BODY + b"caf\xc3\xa9 8-bit \xff bytes\r\n.leading dot\r\nbare\nLF\r\n"
    await harness.put(["bob@example.test"], body=body, eightbit=True)
    await harness.run()
    assert [t.data for t in fake.delivered] == [body]
    assert fake.delivered[0].mail_from == "alice@sender.test"
    assert _message_ids(harness.rows()) == set()


async def test_sessions_fetch_more_work_before_they_run_dry_not_at_the_next_poll(
    harness: Harness, fake_primary: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain must not stall between batches waiting for the poll timer."""
    monkeypatch.setattr(delivery, "REFILL_AT", 1)
    fake = await fake_primary()
    harness.configure([f"{fake.address}:{fake.port}"])
    scheduler = harness.scheduler
    assert scheduler is not None
    scheduler.batch = 2  # five messages take three batches
    scheduler.poll_interval = 3600.0  # only a wake can fetch the next batch in time
    for _ in range(5):
        await harness.put(["bob@example.test"])
    running = asyncio.create_task(scheduler.run())
    try:
        await eventually(lambda: len(fake.delivered) == 5, "all five delivered")
    finally:
        await scheduler.stop()
        await running


async def test_several_messages_share_one_session(harness: Harness, fake_primary: Start) -> None:
    fake = await fake_primary()
    harness.configure([f"{fake.address}:{fake.port}"])
    for _ in range(5):
        await harness.put(["bob@example.test"])
    await harness.run()
    assert len(fake.delivered) == 5
    assert fake.connections == 1


async def test_mixed_replies_deliver_defer_and_bounce_per_recipient(
    harness: Harness, fake_primary: Start
) -> None:
    fake = await fake_primary(
        replies={
            "later@example.test": "450 4.2.1 mailbox busy",
            "gone@example.test": "550 5.1.1 no such user",
        }
    )
    harness.configure([f"{fake.address}:{fake.port}"])
    message_id = await harness.put(["ok@example.test", "later@example.test", "gone@example.test"])
    await harness.run()
    assert [r for r, _ in fake.delivered[0].rcpts] == [
        "ok@example.test",
        "later@example.test",
        "gone@example.test",
    ]
    row = harness.rows().get(message_id)
    assert row is not None
    states = {r.address: (r.state, r.attempts, r.last_reply) for r in row.recipients}
    assert states["ok@example.test"][0] == "delivered"
    assert states["later@example.test"] == (QUEUED, 1, "450 4.2.1 mailbox busy")
    assert states["gone@example.test"] == (FAILED, 1, "550 5.1.1 no such user")
    later = next(r for r in row.recipients if r.address == "later@example.test")
    assert 48 <= later.next_attempt_at - harness.clock.now <= 60  # retry.min with jitter
    # The only recipient bounced is the rejected one, in a DSN to the sender via its own domain.
    dsns = [m for m in harness.rows().list_messages() if m.sender == ""]
    assert len(dsns) == 1
    assert [r.address for r in dsns[0].recipients] == ["alice@sender.test"]
    report = email.message_from_bytes(
        harness.rows().body(dsns[0].id) or b"", policy=email.policy.default
    )
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    blocks = status.get_payload()
    recipients = [str(b["Final-Recipient"]) for b in blocks[1:]]
    assert recipients == ["rfc822; gone@example.test"]
    assert str(blocks[1]["Status"]) == "5.1.1"
    assert "550 5.1.1 no such user" in str(blocks[1]["Diagnostic-Code"])


async def test_deferred_recipient_is_retried_only_once_due_and_then_delivered(
    harness: Harness, fake_primary: Start
) -> None:
    fake = await fake_primary(replies={"bob@example.test": "451 4.3.0 try later"})
    harness.configure([f"{fake.address}:{fake.port}"])
    message_id = await harness.put(["bob@example.test"])
    await harness.run()
    assert len(fake.transactions) == 1
    await harness.run()  # not due yet: no new attempt
    assert len(fake.transactions) == 1
    fake.replies.clear()
    harness.clock.now += 61
    await harness.run()
    assert len(fake.delivered) == 1
    assert message_id not in _message_ids(harness.rows())


@pytest.mark.parametrize(
    ("attempts", "low", "high"),
    [
        (1, 60, 60),
        (2, 96, 120),
        (3, 192, 240),
        (4, 384, 480),
        (5, 600, 600),  # 960 capped at retry.max
        (40, 600, 600),  # no overflow, no silent stop: still the cap
    ],
)
def test_backoff_grows_exponentially_with_jitter_up_to_the_cap(
    attempts: int, low: float, high: float
) -> None:
    for seed in range(20):
        delay = backoff(attempts, 60.0, 600.0, random.Random(seed))
        assert low * 0.8 - 1e-9 <= delay <= high + 1e-9
        assert 60.0 <= delay <= 600.0


async def test_new_mail_wakes_the_scheduler_unless_its_destination_is_known_down(
    harness: Harness, fake_primary: Start
) -> None:
    """While the primary is down, each accepted message must not cost a scheduler pass: the
    next poll defers all of them together, and the probe owns the recovery."""
    port = unused_port("127.0.0.3")
    harness.configure([f"127.0.0.3:{port}"], retry={"min": "1h", "max": "4h"})
    scheduler = harness.scheduler
    assert scheduler is not None
    scheduler.accepted(["example.test"])  # never tried: worth a try at once
    assert scheduler.wake.is_set()

    await harness.put(["bob@example.test"])
    await harness.run()  # refused: the destination is now known down
    assert scheduler.up.is_down("example.test")
    scheduler.wake.clear()
    scheduler.accepted(["example.test"])
    assert not scheduler.wake.is_set()
    scheduler.accepted(["example.test", "other.test"])  # one recipient may go elsewhere
    assert scheduler.wake.is_set()

    # Mail found due while the destination is down is deferred without a connection, and
    # says so in Postfix's words (relay queue show: "not tried").
    second = await harness.put(["carol@example.test"])
    await harness.run()
    row = harness.rows().get(second)
    assert row is not None
    reply = row.recipients[0].last_reply or ""
    assert reply.startswith("421 4.4.1 delivery temporarily suspended: connection refused")


async def test_unreachable_primary_defers_and_the_probe_delivers_on_recovery(
    harness: Harness, fake_primary: Start
) -> None:
    port = unused_port("127.0.0.3")
    harness.configure(
        [f"127.0.0.3:{port}"], retry={"min": "1h", "max": "4h"}, delivery={"probe_interval": 0.05}
    )
    message_id = await harness.put(["bob@example.test"])
    await harness.run()
    row = harness.rows().get(message_id)
    assert row is not None and row.recipients[0].state == QUEUED
    assert row.recipients[0].attempts == 1
    assert harness.scheduler is not None
    assert harness.scheduler.up.is_down("example.test")
    fake = await fake_primary(address="127.0.0.3", port=port)
    scheduler = harness.scheduler
    recovered = scheduler.up.get("example.test").recovered
    await asyncio.wait_for(recovered.wait(), 10)
    # The backoff (1h) never elapsed: the probe made the mail due now.
    await harness.run()
    assert len(fake.delivered) == 1
    assert message_id not in _message_ids(harness.rows())


async def test_lifetime_expiry_bounces_with_the_last_error(
    harness: Harness, fake_primary: Start
) -> None:
    fake = await fake_primary(replies={"bob@example.test": "452 4.2.2 mailbox full"})
    harness.configure([f"{fake.address}:{fake.port}"], queue={"lifetime": "1d"})
    message_id = await harness.put(["bob@example.test"])
    await harness.run()
    harness.clock.now += 86400 + 1
    await harness.run()
    rows = harness.rows()
    assert message_id not in _message_ids(rows)
    dsns = [m for m in rows.list_messages() if m.sender == ""]
    assert len(dsns) == 1
    text = (rows.body(dsns[0].id) or b"").decode()
    assert "452 4.2.2 mailbox full" in text
    assert "Action: failed" in text


async def test_lifetime_expiry_holds_when_configured(harness: Harness, fake_primary: Start) -> None:
    fake = await fake_primary(replies={"bob@example.test": "452 4.2.2 mailbox full"})
    harness.configure(
        [f"{fake.address}:{fake.port}"], queue={"lifetime": "1d", "on_expiry": "hold"}
    )
    message_id = await harness.put(["bob@example.test"])
    await harness.run()
    harness.clock.now += 86400 + 1
    await harness.run()
    row = harness.rows().get(message_id)
    assert row is not None and row.state == HELD
    assert not [m for m in harness.rows().list_messages() if m.sender == ""]


async def test_no_dsn_to_the_null_sender(harness: Harness, fake_primary: Start) -> None:
    fake = await fake_primary(replies={"bob@example.test": "550 5.1.1 no such user"})
    harness.configure([f"{fake.address}:{fake.port}"])
    before = _sample("relay_bounces_suppressed_total", domain="example.test")
    await harness.put(["bob@example.test"], sender="")
    await harness.run()
    assert harness.rows().list_messages() == []
    assert _sample("relay_bounces_suppressed_total", domain="example.test") == before + 1


async def test_a_failed_bounce_goes_to_the_postmaster_once_and_never_loops(
    harness: Harness, fake_primary: Start
) -> None:
    """A double bounce (RFC 5321 4.5.5: no DSN to <>) is reported to the postmaster; when that
    report fails too, it is dropped: at most one extra message, never a stream."""
    refuse = "550 5.1.1 no such user"
    fake = await fake_primary(replies={"bob@example.test": refuse, "pm@example.test": refuse})
    harness.configure([f"{fake.address}:{fake.port}"], postmaster="pm@example.test")
    bounce = await harness.put(["bob@example.test"], sender="")
    await harness.run()
    [notice] = harness.rows().list_messages()
    assert (notice.sender, [r.address for r in notice.recipients]) == ("", ["pm@example.test"])
    text = (harness.rows().body(notice.id) or b"").decode()
    assert "To: <pm@example.test>" in text
    assert "please send mail to <pm@example.test>" in text
    assert f"{bounce}@" not in text and "no such user" in text
    await harness.run()
    assert harness.rows().list_messages() == []
    rcpts = [rcpt for t in fake.transactions for rcpt, _ in t.rcpts]
    assert rcpts == ["bob@example.test", "pm@example.test"]


async def test_an_operator_bounce_copies_the_postmaster(
    harness: Harness, fake_primary: Start
) -> None:
    port = unused_port("127.0.0.3")
    harness.configure([f"127.0.0.3:{port}"], postmaster="pm@example.test")
    message_id = await harness.put(["bob@example.test"])
    harness.rows().request_bounce([message_id])
    await harness.run()
    [notice] = [m for m in harness.rows().list_messages() if m.sender == ""]
    assert [r.address for r in notice.recipients] == ["alice@sender.test", "pm@example.test"]


async def test_operator_bounce_fails_remaining_recipients_with_a_dsn(
    harness: Harness, fake_primary: Start
) -> None:
    port = unused_port("127.0.0.3")
    harness.configure([f"127.0.0.3:{port}"])
    message_id = await harness.put(["bob@example.test"])
    harness.rows().request_bounce([message_id])
    await harness.run()
    rows = harness.rows()
    assert message_id not in _message_ids(rows)
    dsns = [m for m in rows.list_messages() if m.sender == ""]
    assert len(dsns) == 1
    assert OPERATOR_BOUNCE in (rows.body(dsns[0].id) or b"").decode()


async def test_notify_never_suppresses_the_dsn(harness: Harness, fake_primary: Start) -> None:
    fake = await fake_primary(replies={"bob@example.test": "550 5.1.1 no such user"})
    harness.configure([f"{fake.address}:{fake.port}"])
    message = NewMessage(
        id="N1",
        sender="alice@sender.test",
        recipients=(NewRecipient("bob@example.test", notify="NEVER"),),
        body=BODY,
        received_at=harness.clock.now,
        auth=AuthResults(spf="pass", spf_domain="sender.test").to_json(),  # see Harness.put
    )
    await harness.store.put(message)
    await harness.run()
    assert harness.rows().list_messages() == []


async def test_dsn_parameters_reach_the_primary(harness: Harness, fake_primary: Start) -> None:
    fake = await fake_primary()
    harness.configure([f"{fake.address}:{fake.port}"])
    message = NewMessage(
        id="D1",
        sender="alice@sender.test",
        recipients=(
            NewRecipient(
                "bob@example.test", notify="DELAY,FAILURE", orcpt="rfc822;Bob@Example.test"
            ),
        ),
        body=BODY,
        received_at=harness.clock.now,
        envid="Env-42",
        ret="HDRS",
    )
    await harness.store.put(message)
    await harness.run()
    sent = fake.delivered[0]
    assert "RET=HDRS" in sent.mail_options
    assert "ENVID=Env-42" in sent.mail_options
    assert sent.rcpts[0][1] == ["NOTIFY=DELAY,FAILURE", "ORCPT=rfc822;Bob@Example.test"]


async def test_attempts_are_kept_for_queue_show(harness: Harness, fake_primary: Start) -> None:
    fake = await fake_primary(replies={"bob@example.test": "451 4.3.0 try later"})
    harness.configure([f"{fake.address}:{fake.port}"])
    message_id = await harness.put(["bob@example.test"])
    await harness.run()
    harness.clock.now += 3600
    await harness.run()
    row = harness.rows().get(message_id)
    assert row is not None
    assert [(a.address, a.host, a.reply) for a in row.attempts] == [
        ("bob@example.test", fake.address, "451 4.3.0 try later")
    ] * 2


def _sample(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return value or 0.0


# -- routing through real DNS (RFC 5321 5.1) ---------------------------------------------------


async def _two_fakes_on_one_port(start: Start, first: str, second: str) -> tuple[FakePrimary, ...]:
    """MX hosts all listen on delivery.mx_port: find a port free on both addresses."""
    one = await start(address=first)
    two = await start(address=second, port=one.port)
    return one, two


async def test_mx_preference_delivers_to_the_best_host_and_never_past_ourselves(
    harness: Harness, fake_primary: Start, dns_server: DnsServer
) -> None:
    best, third = await _two_fakes_on_one_port(fake_primary, "127.0.0.10", "127.0.0.30")
    dns_server.set(
        "example.test.",
        [("MX", "10 mx1.example.test."), ("MX", "20 relay.test."), ("MX", "30 mx3.example.test.")],
    )
    dns_server.set("mx1.example.test.", [("A", "127.0.0.10")])
    dns_server.set("relay.test.", [("A", "127.0.0.20")])
    dns_server.set("mx3.example.test.", [("A", "127.0.0.30")])
    harness.configure([], nameservers=[dns_server.address], mx_port=best.port)
    await harness.put(["bob@example.test"])
    await harness.run()
    assert len(best.delivered) == 1
    # The primary goes away: the host at 30 (worse than us) is never tried; mail waits.
    await best.stop()
    await harness.put(["carol@example.test"])
    await harness.run()
    assert third.connections == 0
    assert len(harness.rows().list_messages()) == 1
    assert ("mx3.example.test.", "A") not in dns_server.queries


async def test_fallback_across_hosts_of_equal_preference_and_across_addresses(
    harness: Harness, fake_primary: Start, dns_server: DnsServer
) -> None:
    live = await fake_primary(address="127.0.0.12")
    dns_server.set(
        "example.test.", [("MX", "10 dead.example.test."), ("MX", "10 mx.example.test.")]
    )
    dns_server.set("dead.example.test.", [("A", "127.0.0.11")])
    # mx.example.test has a dead address and a live one: both are tried.
    dns_server.set("mx.example.test.", [("A", "127.0.0.13"), ("A", "127.0.0.12")])
    harness.configure([], nameservers=[dns_server.address], mx_port=live.port)
    for _ in range(4):
        await harness.put(["bob@example.test"])
        await harness.run()
    assert len(live.delivered) == 4
    assert harness.rows().list_messages() == []


async def test_when_we_are_the_best_mx_mail_is_kept_with_a_clear_error(
    harness: Harness, fake_primary: Start, dns_server: DnsServer
) -> None:
    other = await fake_primary(address="127.0.0.30")
    dns_server.set("example.test.", [("MX", "10 relay.test."), ("MX", "20 backup.example.test.")])
    dns_server.set("relay.test.", [("A", "127.0.0.20")])
    dns_server.set("backup.example.test.", [("A", "127.0.0.30")])
    harness.configure([], nameservers=[dns_server.address], mx_port=other.port)
    before = _sample("relay_routing_failures_total", domain="example.test", kind="no_preferred_mx")
    message_id = await harness.put(["bob@example.test"])
    await harness.run()
    row = harness.rows().get(message_id)
    assert row is not None and row.recipients[0].state == QUEUED
    assert "no MX host preferred over relay.test" in (row.recipients[0].last_reply or "")
    assert other.connections == 0
    after = _sample("relay_routing_failures_total", domain="example.test", kind="no_preferred_mx")
    assert after == before + 1


async def test_a_domain_that_does_not_exist_fails_its_recipients_for_good(
    harness: Harness, dns_server: DnsServer
) -> None:
    harness.configure([], nameservers=[dns_server.address])
    message_id = await harness.put(["bob@example.test"])
    await harness.run()
    assert message_id not in _message_ids(harness.rows())
    dsns = [m for m in harness.rows().list_messages() if m.sender == ""]
    assert len(dsns) == 1


async def test_dns_servfail_defers(harness: Harness, dns_server: DnsServer) -> None:
    dns_server.servfail("example.test.")
    harness.configure([], nameservers=[dns_server.address])
    message_id = await harness.put(["bob@example.test"])
    await harness.run()
    row = harness.rows().get(message_id)
    assert row is not None and row.recipients[0].state == QUEUED


# -- what the primary cannot take ---------------------------------------------------------------


async def test_smtputf8_message_to_a_primary_without_it_bounces_with_5_6_7(
    harness: Harness, fake_primary: Start
) -> None:
    fake = await fake_primary(smtputf8=False)
    harness.configure([f"{fake.address}:{fake.port}"])
    await harness.put(["bob@example.test"], sender="józef@sender.test", smtputf8=True)
    await harness.run()
    assert fake.delivered == []
    dsns = [m for m in harness.rows().list_messages() if m.sender == ""]
    assert len(dsns) == 1
    assert b"5.6.7" in (harness.rows().body(dsns[0].id) or b"")


async def test_message_bigger_than_the_primary_takes_bounces_with_5_3_4(
    harness: Harness, fake_primary: Start
) -> None:
    fake = await fake_primary(size_limit=100)
    harness.configure([f"{fake.address}:{fake.port}"])
    await harness.put(["bob@example.test"], body=BODY + b"x" * 200 + b"\r\n")
    await harness.run()
    assert fake.delivered == []
    dsns = [m for m in harness.rows().list_messages() if m.sender == ""]
    assert b"5.3.4" in (harness.rows().body(dsns[0].id) or b"")


async def test_delay_warning_is_sent_once_after_warn_after(
    harness: Harness, fake_primary: Start
) -> None:
    fake = await fake_primary(replies={"bob@example.test": "451 4.3.0 try later"})
    harness.configure([f"{fake.address}:{fake.port}"], retry={"warn_after": "4h"})
    await harness.put(["bob@example.test"])
    await harness.run()
    assert [m for m in harness.rows().list_messages() if m.sender == ""] == []
    seen: dict[str, bytes] = {}
    for _ in range(4):
        harness.clock.now += 3 * 3600
        assert harness.scheduler is not None
        await harness.scheduler.tick()  # the warning is queued in the same write as the deferral
        await harness.scheduler.settle()
        rows = harness.rows()
        seen |= {m.id: rows.body(m.id) or b"" for m in rows.list_messages() if m.sender == ""}
    assert len(seen) == 1
    text = next(iter(seen.values())).decode()
    assert "Action: delayed" in text
    assert "Delayed Mail" in text


async def test_an_io_error_recording_outcomes_stops_delivery_until_they_are_written(
    harness: Harness, fake_primary: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO cannot be made on demand with a real disk here: the error is injected at the SQLite
    layer, inside the real writer thread's transaction, where a failing disk would raise it."""
    fake = await fake_primary()
    harness.configure([f"{fake.address}:{fake.port}"])
    scheduler = harness.scheduler
    assert scheduler is not None
    ids = [await harness.put([f"user{n}@example.test"]) for n in range(3)]
    failing = True
    record = Store.record

    def record_or_fail(store: Store, message_id: str, outcomes: Any) -> bool:
        if failing:
            raise sqlite3.OperationalError("disk I/O error")
        return record(store, message_id, outcomes)

    monkeypatch.setattr(Store, "record", record_or_fail)
    await harness.run()
    assert len(fake.delivered) == 1  # the first outcome failed: no second message was sent
    assert scheduler.blocked == "delivery stopped: outcomes of 1 message not yet recorded"
    for _ in range(3):  # every later pass retries the bookkeeping, never the delivery
        harness.clock.now += 3600
        await harness.run()
    assert len(fake.delivered) == 1
    assert harness.store.problems() == ["queue write failed: disk I/O error"]
    assert _message_ids(harness.rows()) == set(ids)

    failing = False
    await harness.run()
    await harness.run()
    assert scheduler.blocked is None
    delivered = sorted(t.rcpts[0][0] for t in fake.delivered)
    assert delivered == [f"user{n}@example.test" for n in range(3)]
    assert _message_ids(harness.rows()) == set()


async def test_a_hold_stops_a_message_already_found_due(
    harness: Harness, fake_primary: Start
) -> None:
    """The operator holds a message while its session is being opened: it is not sent."""
    fake = await fake_primary()
    harness.configure([f"{fake.address}:{fake.port}"])
    message_id = await harness.put(["bob@example.test"])
    scheduler = harness.scheduler
    assert scheduler is not None
    opened = scheduler.connect

    async def hold_then_open(hop: Any, **options: Any) -> Any:
        harness.rows().hold([message_id])  # another connection, as `relay queue hold` is
        return await opened(hop, **options)

    scheduler.connect = hold_then_open
    await harness.run()

    [row] = harness.rows().list_messages()
    assert (row.id, row.state) == (message_id, "held")


async def test_a_refusal_the_courier_makes_itself_is_not_reported_as_the_primary_s(
    harness: Harness, fake_primary: Start
) -> None:
    """A queued address the courier will not write out (from before intake refused such
    addresses) fails with a DSN that names no remote host: nobody "said" it."""
    fake = await fake_primary()
    harness.configure([f"{fake.address}:{fake.port}"])
    await harness.put(["bob\x1b@example.test"])
    await harness.run()
    rows = harness.rows()
    [dsn] = [m for m in rows.list_messages() if m.sender == ""]
    text = (rows.body(dsn.id) or b"").decode()
    assert "5.1.3 recipient address cannot be sent: control character" in text
    assert "said" not in text and "Remote-MTA" not in text
    assert all(not t.rcpts and t.data is None for t in fake.transactions)  # nothing sent
