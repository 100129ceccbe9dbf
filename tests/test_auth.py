"""Sender authentication (issue 15 parts 2 and 4): SPF, DKIM and DMARC at the end of DATA, the
Authentication-Results header, the per-domain policies, and no backscatter.

Every check runs over real sockets against the relay, with every DNS answer from a real
authoritative server on loopback (tests/dnsserver.py): SPF and DMARC records, DKIM keys made
here and published there. Clients connect from 127.0.0.x.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dkim
import pytest
from fakeprimary import FakePrimary, fake_primary
from hostile import eventually, rejected

from relay.authresults import AuthResults, org_domain
from relay.ops import metrics
from relay.service import Relay
from relay.smtp import arc as arc_keys
from relay.smtp.auth import from_domain
from tests.conftest import (
    DOMAIN,
    HOSTNAME,
    conversation,
    open_store,
    relay_cli,
    smtp_address,
    split_trace,
    write_config,
)
from tests.dnsserver import DnsServer, dns_server

__all__ = ["dns_server", "fake_primary"]

RelayFactory = Callable[..., Awaitable[Relay]]
StartPrimary = Callable[..., Awaitable[FakePrimary]]
SENDER_DOMAIN = "sender.test"
MESSAGE = (
    b"From: Alice <alice@sender.test>\r\nTo: bob@example.test\r\nSubject: the numbers\r\n"
    b"Message-ID: <n1@sender.test>\r\n\r\nHello Bob,\r\nthe numbers are attached.\r\n"
)


async def start(
    factory: RelayFactory, dns: DnsServer, *, spam: dict[str, Any] | None = None, **domain: Any
) -> Relay:
    domain.setdefault("primary", ["127.0.0.1:9"])
    return await factory(
        dns={"nameservers": [dns.address]},
        spam=spam or {},
        domain=[{"name": DOMAIN, "tls": "none", **domain}],
    )


async def send(
    server: Relay,
    content: bytes = MESSAGE,
    *,
    sender: str = f"alice@{SENDER_DOMAIN}",
    recipients: tuple[str, ...] = (f"bob@{DOMAIN}",),
    source: str = "127.0.0.1",
    helo: str = "client.sender.test",
) -> list[str]:
    """One transaction; every reply from MAIL on, the final dot's last."""
    replies = []
    async with conversation(smtp_address(server), source=source) as talk:
        await talk.ehlo(helo)
        replies.append((await talk.command(f"MAIL FROM:<{sender}>")).text)
        for recipient in recipients:
            replies.append((await talk.command(f"RCPT TO:<{recipient}>")).text)
        if all(r.startswith("250") for r in replies[1:]) or any(
            r.startswith("250") for r in replies[1:]
        ):
            assert (await talk.command("DATA")).code == 354
            await talk.send(content.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            replies.append((await talk.reply()).text)
    return replies


def stored(server: Relay) -> list[tuple[str, bytes, AuthResults | None]]:
    """(sender, stored message, stored results) of every message in the queue."""
    with open_store(server.config.queue.path) as store:
        return [
            (row.sender, store.body(row.id) or b"", AuthResults.from_json(row.auth))
            for row in store.list_messages()
        ]


def spf(dns: DnsServer, domain: str, record: str) -> None:
    dns.set(f"{domain}.", [("TXT", f'"{record}"')])


def dkim_key(dns: DnsServer, domain: str, selector: str = "s1") -> bytes:
    """A new RSA key published at selector._domainkey.domain; the private key, PEM."""
    key = arc_keys.new_key()  # a DKIM key and an ARC key are the same kind of key
    record = arc_keys.txt_strings(arc_keys.public_record(key))
    dns.set(f"{selector}._domainkey.{domain}.", [("TXT", record)])
    return key


def signed(content: bytes, domain: str, key: bytes, selector: str = "s1") -> bytes:
    signature = dkim.sign(
        content,
        selector.encode(),
        domain.encode(),
        key,
        include_headers=[b"from", b"to", b"subject", b"message-id"],
    )
    return bytes(signature) + content


def results_header(body: bytes) -> str:
    _, results, _ = split_trace(body)
    return results.decode()


# -- SPF -----------------------------------------------------------------------------------------


async def test_spf_pass_is_recorded_in_the_header_and_with_the_message(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    spf(dns_server, SENDER_DOMAIN, "v=spf1 ip4:127.0.0.0/24 -all")
    server = await start(relay_factory, dns_server)
    replies = await send(server)
    assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
    [(_, body, results)] = stored(server)
    header = results_header(body)
    assert header.startswith(f"Authentication-Results: {HOSTNAME};\r\n")
    assert f"spf=pass smtp.mailfrom={SENDER_DOMAIN}" in header
    assert "dkim=none" in header
    assert results is not None and results.spf == "pass" and results.spf_domain == SENDER_DOMAIN
    assert results.authenticated(f"alice@{SENDER_DOMAIN}")


async def test_spf_fail_is_tagged_by_default_and_refused_at_rcpt_where_the_domain_says_so(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    spf(dns_server, SENDER_DOMAIN, "v=spf1 ip4:192.0.2.1 -all")
    tagging = await start(relay_factory, dns_server)
    replies = await send(tagging)
    assert replies[-1].startswith("250 ")
    [(_, body, results)] = stored(tagging)
    assert f"spf=fail smtp.mailfrom={SENDER_DOMAIN}" in results_header(body)
    assert results is not None and not results.authenticated(f"alice@{SENDER_DOMAIN}")
    await tagging.stop(grace=1)

    refusing = await start(relay_factory, dns_server, spf_fail="reject")
    before = rejected("spf")
    replies = await send(refusing)
    assert replies[1] == (
        f"550 5.7.1 <bob@{DOMAIN}>: SPF: {SENDER_DOMAIN} does not allow [127.0.0.1] to send"
        " its mail"
    )
    assert rejected("spf") == before + 1
    assert len(stored(refusing)) == 1  # only the tagged one from before: nothing new


async def test_softfail_neutral_and_temperror_are_never_refused(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    spf(dns_server, "soft.test", "v=spf1 ~all")
    spf(dns_server, "neutral.test", "v=spf1 ?all")
    dns_server.servfail("broken.test.")
    server = await start(relay_factory, dns_server, spf_fail="reject")
    for domain, _ in (
        ("soft.test", "softfail"),
        ("neutral.test", "neutral"),
        ("broken.test", "temperror"),
    ):
        replies = await send(server, sender=f"alice@{domain}")
        assert replies[-1].startswith("250 "), (domain, replies)
    found = {results.spf_domain: results.spf for _, _, results in stored(server) if results}
    assert found == {"soft.test": "softfail", "neutral.test": "neutral", "broken.test": "temperror"}


async def test_a_null_sender_is_checked_by_its_helo_name(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    spf(dns_server, "mta.sender.test", "v=spf1 ip4:127.0.0.1 -all")
    server = await start(relay_factory, dns_server)
    replies = await send(server, sender="", helo="mta.sender.test")
    assert replies[-1].startswith("250 ")
    [(_, body, results)] = stored(server)
    assert "spf=pass smtp.helo=mta.sender.test" in results_header(body)
    assert results is not None and results.spf_scope == "helo"
    assert not results.authenticated("")  # a DSN never goes to <> anyway


async def test_a_silent_dns_server_is_a_temperror_at_the_deadline_and_blocks_nobody_else(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    dns_server.drop("slow.test.")  # never answers
    server = await start(relay_factory, dns_server, spam={"auth_timeout": "2s"})
    started = time.monotonic()
    slow = asyncio.ensure_future(send(server, sender="alice@slow.test"))
    await eventually(lambda: dns_server.asked("slow.test."), "the relay asking about slow.test")
    # Meanwhile another client is served at once: the lookups do not hold the event loop.
    other_started = time.monotonic()
    async with conversation(smtp_address(server)) as talk:
        assert (await talk.ehlo("other.test")).code == 250
        assert (await talk.command("NOOP")).code == 250
    assert time.monotonic() - other_started < 1.0
    replies = await slow
    assert replies[-1].startswith("250 "), replies
    assert 1.5 <= time.monotonic() - started < 6
    results = stored(server)[0][2]
    assert results is not None and results.spf == "temperror"


# -- DKIM ---------------------------------------------------------------------------------------


async def test_a_good_dkim_signature_passes_and_a_changed_body_fails(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    key = dkim_key(dns_server, SENDER_DOMAIN)
    server = await start(relay_factory, dns_server)
    good = signed(MESSAGE, SENDER_DOMAIN, key)
    await send(server, good)
    await send(server, good.replace(b"numbers are", b"numbers were"))
    (_, first, passed), (_, second, failed) = stored(server)
    assert f"dkim=pass header.d={SENDER_DOMAIN} header.s=s1" in results_header(first)
    assert f"dkim=fail header.d={SENDER_DOMAIN} header.s=s1" in results_header(second)
    # An aligned DKIM pass authenticates the sender for a DSN even without SPF.
    assert passed is not None and passed.authenticated(f"alice@{SENDER_DOMAIN}")
    assert failed is not None and not failed.authenticated(f"alice@{SENDER_DOMAIN}")
    # The message itself is stored as it came, signature included.
    assert split_trace(first)[2] == good


async def test_a_signature_whose_key_is_not_published_is_a_permerror(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    key = dkim_key(DnsServer(), SENDER_DOMAIN)  # published on a server nobody asks
    server = await start(relay_factory, dns_server)
    await send(server, signed(MESSAGE, SENDER_DOMAIN, key))
    [(_, body, _)] = stored(server)
    assert f"dkim=permerror header.d={SENDER_DOMAIN}" in results_header(body)


# -- DMARC --------------------------------------------------------------------------------------


async def test_dmarc_reject_is_honoured_by_default_and_only_tagged_where_asked(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    dns_server.set(f"_dmarc.{SENDER_DOMAIN}.", [("TXT", '"v=DMARC1; p=reject"')])
    spf(dns_server, SENDER_DOMAIN, "v=spf1 ip4:192.0.2.1 -all")
    honouring = await start(relay_factory, dns_server)
    before = rejected("dmarc")
    replies = await send(honouring)
    assert replies[-1] == (
        f"550 5.7.1 DMARC: {SENDER_DOMAIN} asks receivers to reject mail that fails its checks"
    )
    assert rejected("dmarc") == before + 1
    assert stored(honouring) == []
    await honouring.stop(grace=1)

    tagging = await start(relay_factory, dns_server, dmarc_reject="tag")
    replies = await send(tagging)
    assert replies[-1].startswith("250 ")
    [(_, body, results)] = stored(tagging)
    header = results_header(body)
    assert f"dmarc=fail policy.dmarc=reject header.from={SENDER_DOMAIN}" in header
    assert results is not None and results.dmarc == "fail" and results.dmarc_policy == "reject"


async def test_dmarc_passes_with_an_aligned_signature_from_a_subdomain_policy_of_the_org(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    # From: a subdomain with no record of its own: the organizational domain's sp= applies,
    # and a signature of the organizational domain is aligned (relaxed).
    dns_server.set(f"_dmarc.{SENDER_DOMAIN}.", [("TXT", '"v=DMARC1; p=none; sp=reject"')])
    key = dkim_key(dns_server, SENDER_DOMAIN)
    content = MESSAGE.replace(b"alice@sender.test", b"alice@news.sender.test")
    assert org_domain("news.sender.test") == SENDER_DOMAIN
    server = await start(relay_factory, dns_server)
    replies = await send(server, signed(content, SENDER_DOMAIN, key))
    assert replies[-1].startswith("250 "), replies
    unsigned = await send(server, content)
    assert unsigned[-1].startswith("550 5.7.1 DMARC: news.sender.test "), unsigned
    [(_, body, results)] = stored(server)
    assert "dmarc=pass policy.dmarc=reject header.from=news.sender.test" in results_header(body)
    assert results is not None and results.dmarc == "pass"


async def test_a_dns_failure_never_refuses_a_message_from_a_p_reject_domain(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    dns_server.servfail(f"_dmarc.{SENDER_DOMAIN}.")
    server = await start(relay_factory, dns_server)
    replies = await send(server)
    assert replies[-1].startswith("250 ")
    [(_, body, _)] = stored(server)
    assert "dmarc=temperror" in results_header(body)


# -- the header -------------------------------------------------------------------------------


async def test_a_forged_result_under_our_name_is_removed_and_others_results_are_kept(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    forged = (
        f"Authentication-Results: {HOSTNAME}; spf=pass smtp.mailfrom=bank.test;\r\n"
        "\tdkim=pass header.d=bank.test\r\n"
        f"Authentication-Results: (forged) {HOSTNAME.upper()}; dmarc=pass\r\n"
        "Authentication-Results: mx.elsewhere.test; spf=fail smtp.mailfrom=bank.test\r\n"
    ).encode()
    server = await start(relay_factory, dns_server)
    await send(server, forged + MESSAGE)
    [(_, body, _)] = stored(server)
    _, ours, rest = split_trace(body)
    assert ours.count(b"Authentication-Results:") == 1
    assert rest == (
        b"Authentication-Results: mx.elsewhere.test; spf=fail smtp.mailfrom=bank.test\r\n" + MESSAGE
    )


async def test_the_primary_receives_our_results(
    relay_factory: RelayFactory, dns_server: DnsServer, fake_primary: StartPrimary
) -> None:
    spf(dns_server, SENDER_DOMAIN, "v=spf1 ip4:127.0.0.0/24 -all")
    primary = await fake_primary()
    server = await start(relay_factory, dns_server, primary=[f"{primary.address}:{primary.port}"])
    await send(server)
    await eventually(lambda: [t for t in primary.transactions if t.data], "the delivery")
    data = primary.transactions[0].data or b""
    assert f"Authentication-Results: {HOSTNAME};".encode() in data
    assert f"spf=pass smtp.mailfrom={SENDER_DOMAIN}".encode() in data


async def test_with_the_checks_off_nothing_is_asked_or_added(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    server = await start(relay_factory, dns_server, spam={"auth": False}, spf_fail="reject")
    await send(server)
    [(_, body, results)] = stored(server)
    assert results is None
    assert split_trace(body)[1] == b""
    assert not [q for q in dns_server.queries if SENDER_DOMAIN in q[0]]


# -- no backscatter (part 4) --------------------------------------------------------------------


def suppressed(domain: str = DOMAIN) -> float:
    value = metrics.REGISTRY.get_sample_value("relay_bounces_suppressed_total", {"domain": domain})
    return value or 0.0


def dsns_generated() -> float:
    return metrics.REGISTRY.get_sample_value("relay_bounces_total") or 0.0


def queue_rows(server: Relay) -> list[Any]:
    with open_store(server.config.queue.path) as store:
        return store.list_messages()


async def refusing_primary(start_primary: StartPrimary) -> FakePrimary:
    return await start_primary(replies={f"gone@{DOMAIN}": "550 5.1.1 no such user"})


async def test_an_unauthenticated_senders_bounce_is_held_for_the_operator(
    relay_factory: RelayFactory,
    dns_server: DnsServer,
    fake_primary: StartPrimary,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    primary = await refusing_primary(fake_primary)
    server = await start(relay_factory, dns_server, primary=[f"{primary.address}:{primary.port}"])
    before, dsns = suppressed(), dsns_generated()
    caplog.set_level(logging.INFO, logger="relay.delivery")
    await send(server, recipients=(f"gone@{DOMAIN}", f"bob@{DOMAIN}"))

    def held() -> list[Any]:
        return [
            r
            for m in queue_rows(server)
            for r in m.recipients
            if r.hold_reason == "unauthenticated bounce"
        ]

    [recipient] = await eventually(held, "the refused recipient held")
    assert recipient.address == f"gone@{DOMAIN}"
    assert recipient.last_reply == "550 5.1.1 no such user"
    assert [r for r, _ in primary.transactions[0].rcpts] == [f"gone@{DOMAIN}", f"bob@{DOMAIN}"]
    assert suppressed() == before + 1
    assert dsns_generated() == dsns  # no DSN to the likely forged sender
    [row] = queue_rows(server)
    assert row.sender == f"alice@{SENDER_DOMAIN}"  # only the original: no DSN queued
    lines = [r.getMessage() for r in caplog.records if "not authenticated" in r.getMessage()]
    assert len(lines) == 1 and "bounce held: unauthenticated bounce" in lines[0]

    # The operator sees it, with the stored results, and can still bounce it by hand.
    cli = write_config(tmp_path, "cli.toml")  # the same queue file
    code, listing, _ = await asyncio.to_thread(relay_cli, cli, "queue")
    assert f"gone@{DOMAIN}  (held: unauthenticated bounce, 1 attempt)" in listing
    code, shown, _ = await asyncio.to_thread(relay_cli, cli, "queue", "show", row.id)
    assert f"auth: spf=none ({SENDER_DOMAIN}) dkim=none dmarc=none" in shown
    assert "held: unauthenticated bounce" in shown
    code, _, err = await asyncio.to_thread(relay_cli, cli, "queue", "bounce", row.id)
    assert code == 0, err
    await eventually(lambda: dsns_generated() == dsns + 1, "the operator's bounce sent")
    await eventually(
        lambda: all(m.sender == "" for m in queue_rows(server)), "the original gone, DSN queued"
    )


async def test_send_bounces_and_discard_drops_without_a_dsn(
    relay_factory: RelayFactory, dns_server: DnsServer, fake_primary: StartPrimary
) -> None:
    primary = await refusing_primary(fake_primary)
    hop = [f"{primary.address}:{primary.port}"]
    sending = await start(relay_factory, dns_server, primary=hop, bounce_unauthenticated="send")
    dsns = dsns_generated()
    await send(sending, recipients=(f"gone@{DOMAIN}",))
    await eventually(lambda: dsns_generated() == dsns + 1, "the DSN")
    await sending.stop(grace=1)

    discarding = await start(
        relay_factory, dns_server, primary=hop, bounce_unauthenticated="discard"
    )
    before, dsns = suppressed(), dsns_generated()
    await send(discarding, recipients=(f"gone@{DOMAIN}",))
    await eventually(lambda: suppressed() == before + 1, "the bounce discarded")
    await eventually(lambda: not queue_rows(discarding), "the message gone")
    assert dsns_generated() == dsns


async def test_an_authenticated_sender_gets_its_dsn(
    relay_factory: RelayFactory, dns_server: DnsServer, fake_primary: StartPrimary
) -> None:
    spf(dns_server, SENDER_DOMAIN, "v=spf1 ip4:127.0.0.0/24 -all")
    primary = await refusing_primary(fake_primary)
    server = await start(relay_factory, dns_server, primary=[f"{primary.address}:{primary.port}"])
    before, dsns = suppressed(), dsns_generated()
    await send(server, recipients=(f"gone@{DOMAIN}",))
    await eventually(lambda: dsns_generated() == dsns + 1, "the DSN")
    [dsn] = await eventually(lambda: queue_rows(server), "the DSN queued")
    assert dsn.sender == "" and [r.address for r in dsn.recipients] == [f"alice@{SENDER_DOMAIN}"]
    assert suppressed() == before


def test_stored_results_round_trip_and_garbage_is_not_checked() -> None:
    results = AuthResults(spf="pass", spf_domain="a.test", dmarc="none")
    assert AuthResults.from_json(results.to_json()) == results
    assert json.loads(results.to_json())["dkim"] == []
    assert AuthResults.from_json("") is None
    assert AuthResults.from_json("{not json") is None
    assert AuthResults.from_json('{"spf": "pass"}') is None


async def test_a_flood_from_one_sender_asks_the_dns_once_per_record(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    """Answers are kept for their TTL, as a resolver's cache would keep them."""
    spf(dns_server, SENDER_DOMAIN, "v=spf1 ip4:127.0.0.0/24 -all")
    server = await start(relay_factory, dns_server)
    for _ in range(5):
        assert (await send(server))[-1].startswith("250 ")
    asked = [q for q in dns_server.queries if SENDER_DOMAIN in q[0]]
    assert sorted(asked) == [(f"_dmarc.{SENDER_DOMAIN}.", "TXT"), (f"{SENDER_DOMAIN}.", "TXT")]
    assert all(r is not None and r.spf == "pass" for _, _, r in stored(server))


@pytest.mark.parametrize(
    ("header", "domain"),
    [
        (b"From: Alice <alice@Sender.Test>\r\n", "sender.test"),
        (b'From: "bob@forged.test" <bob@real.test>\r\n', "real.test"),
        (b"From: a@b.test, c@d.test\r\n", None),  # two authors: DMARC cannot judge (6.6.1)
        (b"From: a@b.test\r\nFrom: c@d.test\r\n", None),  # two From fields
        (b"From: <a@[192.0.2.1]>\r\n", None),  # an address literal has no DMARC record
        (b"From: undisclosed\r\n", None),
        (b"Subject: no author\r\n", None),
    ],
)
def test_the_from_domain_dmarc_judges(header: bytes, domain: str | None) -> None:
    assert from_domain(header + b"\r\nbody\r\n") == domain
