"""Recipient validation and `accept` over real sockets, against a real (fake) primary.

The relay must refuse at RCPT time what the primary would refuse (no backscatter), keep
accepting the mailboxes it knows while the primary is down, and stay out of the way while the
primary is up when told to. The primary is tests/fakeprimary.py on 127.0.0.2.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DOMAIN,
    conversation,
    make_config,
    open_store,
    relay_command,
    relay_env,
    send_mail,
    smtp_address,
    write_config,
)
from hostile import closes, eventually, rejected, slots_free

from relay.service import Relay
from relay.store import NewMessage, NewRecipient, Store, new_queue_id
from tests.fakeprimary import FakePrimary, fake_primary

__all__ = ["fake_primary"]

RelayFactory = Callable[..., Awaitable[Relay]]
StartPrimary = Callable[..., Awaitable[FakePrimary]]

UNKNOWN = "550 5.1.1 <{}>: Recipient address rejected: User unknown"
UNVERIFIED = (
    "450 4.1.1 <{}>: Recipient address rejected: cannot verify the address while the primary"
    " mail server is unreachable, try again later"
)


def domain(**settings: Any) -> list[dict[str, Any]]:
    return [{"name": DOMAIN, "primary": ["127.0.0.1:1"], **settings}]


async def rcpt_replies(server: Relay, *addresses: str) -> list[str]:
    """One transaction, one RCPT per address; the reply texts, in order."""
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        assert (await talk.command("MAIL FROM:<sender@client.test>")).code == 250
        return [(await talk.command(f"RCPT TO:<{a}>")).text for a in addresses]


# -- lists ------------------------------------------------------------------------------------


async def test_unknown_recipients_get_550_5_1_1_and_listed_ones_are_accepted(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(domain=domain(recipients=["alice", f"bob@{DOMAIN}"]))
    before = rejected("unknown_recipient")
    replies = await rcpt_replies(
        server, f"alice@{DOMAIN}", f"Bob@{DOMAIN.upper()}", f"carol@{DOMAIN}", "alice@other.test"
    )
    assert replies == [
        "250 2.1.5 Ok",
        "250 2.1.5 Ok",
        UNKNOWN.format(f"carol@{DOMAIN}"),
        "550 5.7.1 <alice@other.test>: Relay access denied",
    ]
    assert rejected("unknown_recipient") == before + 1


async def test_a_star_accepts_every_recipient_and_no_list_means_no_check(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    server = await relay_factory(
        domain=[
            {"name": DOMAIN, "primary": ["127.0.0.1:1"], "recipients": ["*"]},
            {"name": "open.test", "primary": ["127.0.0.1:1"]},
        ]
    )
    replies = await rcpt_replies(server, f"anyone@{DOMAIN}", "whoever@open.test")
    assert replies == ["250 2.1.5 Ok", "250 2.1.5 Ok"]


async def test_the_recipients_file_is_read_again_when_it_changes_without_a_restart(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    path = tmp_path / "recipients"
    path.write_text("# exported from the primary\nalice\n  bob@example.test  # trailing note\n")
    server = await relay_factory(domain=domain(recipients=["static"], recipients_file=str(path)))
    first = await rcpt_replies(
        server, f"alice@{DOMAIN}", f"bob@{DOMAIN}", f"static@{DOMAIN}", f"dave@{DOMAIN}"
    )
    assert first == ["250 2.1.5 Ok"] * 3 + [UNKNOWN.format(f"dave@{DOMAIN}")]

    with path.open("a") as handle:  # edited in place
        handle.write("dave\n")
    assert await rcpt_replies(server, f"dave@{DOMAIN}") == ["250 2.1.5 Ok"]

    replacement = tmp_path / "recipients.new"  # the usual write-then-rename export
    replacement.write_text("erin\n")
    os.replace(replacement, path)
    assert await rcpt_replies(server, f"erin@{DOMAIN}", f"alice@{DOMAIN}") == [
        "250 2.1.5 Ok",
        UNKNOWN.format(f"alice@{DOMAIN}"),
    ]

    path.unlink()  # a botched export: the last good list stays
    assert await rcpt_replies(server, f"erin@{DOMAIN}") == ["250 2.1.5 Ok"]


async def test_a_dictionary_attack_gets_421_after_max_unknown_recipients(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(
        smtp={"max_unknown_recipients": 3}, domain=domain(recipients=["alice"])
    )
    before = rejected("too_many_unknown_recipients")
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        await talk.command("MAIL FROM:<spam@client.test>")
        for name in ("aaron", "abby", "adam"):
            reply = await talk.command(f"RCPT TO:<{name}@{DOMAIN}>")
            assert reply.text == UNKNOWN.format(f"{name}@{DOMAIN}")
        assert (await talk.command(f"RCPT TO:<alice@{DOMAIN}>")).code == 250  # known: no count
        reply = await talk.command(f"RCPT TO:<adrian@{DOMAIN}>")
        assert reply.text == (
            "421 4.7.0 relay.test Error: too many unknown recipients, closing connection"
        )
        assert await closes(talk.reader)
    assert rejected("too_many_unknown_recipients") == before + 1
    await eventually(lambda: slots_free(server), "the attacker's slot back")


# -- callouts ---------------------------------------------------------------------------------


async def test_callout_accepts_what_the_primary_accepts_and_refuses_what_it_refuses(
    relay_factory: RelayFactory, fake_primary: StartPrimary
) -> None:
    primary = await fake_primary(replies={f"nobody@{DOMAIN}": "550 5.1.1 no such user"})
    server = await relay_factory(
        domain=[{"name": DOMAIN, "primary": [f"127.0.0.2:{primary.port}"], "verify": "callout"}]
    )
    replies = await rcpt_replies(server, f"real@{DOMAIN}", f"nobody@{DOMAIN}")
    assert replies == ["250 2.1.5 Ok", UNKNOWN.format(f"nobody@{DOMAIN}")]
    callouts = list(primary.transactions)
    assert [(t.mail_from, [r for r, _ in t.rcpts], t.data) for t in callouts] == [
        ("", [f"real@{DOMAIN}"], None),
        ("", [f"nobody@{DOMAIN}"], None),
    ]
    # Asked once: both answers are remembered (and written to the queue database).
    replies = await rcpt_replies(server, f"real@{DOMAIN}", f"nobody@{DOMAIN}")
    assert replies == ["250 2.1.5 Ok", UNKNOWN.format(f"nobody@{DOMAIN}")]
    assert len(primary.transactions) == 2

    def remembered() -> dict[str, bool]:
        with open_store(server.config.queue.path) as store:
            return {address: ok for address, ok, _ in store.verdicts()}

    await eventually(lambda: len(remembered()) == 2, "the answers in the queue database")
    assert remembered() == {f"real@{DOMAIN}": True, f"nobody@{DOMAIN}": False}


async def test_a_negative_answer_is_asked_again_after_its_ttl(
    fake_primary: StartPrimary, tmp_path: Path
) -> None:
    primary = await fake_primary(replies={f"new@{DOMAIN}": "550 5.1.1 no such user"})
    later = [0.0]
    server = Relay(
        make_config(
            tmp_path,
            domain=[
                {"name": DOMAIN, "primary": [f"127.0.0.2:{primary.port}"], "verify": "callout"}
            ],
        ),
        clock=lambda: time.time() + later[0],
    )
    await server.start()
    try:
        assert await rcpt_replies(server, f"new@{DOMAIN}") == [UNKNOWN.format(f"new@{DOMAIN}")]
        primary.replies.clear()  # the mailbox is created at the primary
        later[0] = 3599.0  # verify_negative_ttl is 1h by default
        assert await rcpt_replies(server, f"new@{DOMAIN}") == [UNKNOWN.format(f"new@{DOMAIN}")]
        later[0] = 3601.0
        assert await rcpt_replies(server, f"new@{DOMAIN}") == ["250 2.1.5 Ok"]
        later[0] = 3601.0 + 6 * 86400  # verify_positive_ttl is 7d: still trusted
        assert await rcpt_replies(server, f"new@{DOMAIN}") == ["250 2.1.5 Ok"]
        assert len(primary.transactions) == 2
    finally:
        await server.stop()


async def test_a_temporary_answer_from_the_primary_is_no_verdict_and_is_not_remembered(
    relay_factory: RelayFactory, fake_primary: StartPrimary
) -> None:
    primary = await fake_primary(replies={f"grey@{DOMAIN}": "450 4.2.1 greylisted, try later"})
    server = await relay_factory(
        domain=[{"name": DOMAIN, "primary": [f"127.0.0.2:{primary.port}"], "verify": "callout"}]
    )
    for _ in range(2):
        assert await rcpt_replies(server, f"grey@{DOMAIN}") == [UNVERIFIED.format(f"grey@{DOMAIN}")]
    assert len(primary.transactions) == 2  # asked again: a 4xx is not an answer
    primary.mail_reply = "550 5.7.1 no null sender here"  # says nothing about the address
    assert await rcpt_replies(server, f"other@{DOMAIN}") == [UNVERIFIED.format(f"other@{DOMAIN}")]
    assert server.policy.cache.entries == {}


async def test_while_the_primary_is_down_known_mailboxes_are_accepted_and_others_get_450(
    relay_factory: RelayFactory, fake_primary: StartPrimary
) -> None:
    primary = await fake_primary()
    server = await relay_factory(
        delivery={"probe_interval": "0.1s"},
        domain=[{"name": DOMAIN, "primary": [f"127.0.0.2:{primary.port}"], "verify": "callout"}],
    )
    assert await rcpt_replies(server, f"known@{DOMAIN}") == ["250 2.1.5 Ok"]
    await primary.stop()
    before = rejected("unverified")
    replies = await rcpt_replies(server, f"stranger@{DOMAIN}", f"known@{DOMAIN}")
    assert replies == [UNVERIFIED.format(f"stranger@{DOMAIN}"), "250 2.1.5 Ok"]
    assert rejected("unverified") == before + 1
    assert server.health.is_down(DOMAIN)
    # While it stays down, no RCPT waits for a callout: the relay knows it is down.
    assert await rcpt_replies(server, f"other@{DOMAIN}") == [UNVERIFIED.format(f"other@{DOMAIN}")]


async def test_verify_unknown_while_down_accept_takes_unverified_mail(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(
        domain=domain(verify="callout", verify_unknown_while_down="accept")
    )
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        await talk.command("MAIL FROM:<sender@client.test>")
        assert (await talk.command(f"RCPT TO:<stranger@{DOMAIN}>")).code == 250


async def test_recipients_delivered_while_the_primary_is_up_are_known_in_the_next_outage(
    relay_factory: RelayFactory, fake_primary: StartPrimary, tmp_path: Path
) -> None:
    primary = await fake_primary()
    settings = {"name": DOMAIN, "primary": [f"127.0.0.2:{primary.port}"], "verify": "callout"}
    # Mail for bob was queued before (say, in the last outage): its delivery teaches the relay.
    queue = tmp_path / "queue" / "queue.db"
    queue.parent.mkdir(mode=0o700)
    with open_store(queue) as store:
        store.put(
            NewMessage(
                id=new_queue_id(),
                sender="sender@client.test",
                recipients=(NewRecipient(f"bob@{DOMAIN}"),),
                body=b"Subject: queued\r\n\r\nhi\r\n",
                received_at=time.time(),
            )
        )
    server = await relay_factory(delivery={"probe_interval": "0.1s"}, domain=[settings])
    await eventually(lambda: primary.delivered, "the queued message delivered")
    await eventually(lambda: server.policy.cache.entries, "bob learned")
    await server.stop()
    await primary.stop()

    # A restart during the next outage: bob is still known, a stranger is not.
    restarted = await relay_factory(delivery={"probe_interval": "0.1s"}, domain=[settings])
    replies = await rcpt_replies(restarted, f"bob@{DOMAIN}", f"stranger@{DOMAIN}")
    assert replies == ["250 2.1.5 Ok", UNVERIFIED.format(f"stranger@{DOMAIN}")]
    # The primary saw the delivery and no callout: bob was learned, not asked about.
    assert [t.mail_from for t in primary.transactions] == ["sender@client.test"]


async def test_a_known_mailbox_stays_known_through_an_outage_longer_than_its_ttl(
    fake_primary: StartPrimary, tmp_path: Path
) -> None:
    """Day 8 of an outage, and again after a restart on day 9: a mailbox the primary confirmed
    on day 0 is still accepted. Its 7-day TTL counts only time the primary could be asked."""
    primary = await fake_primary()
    later = [0.0]
    config = make_config(
        tmp_path,
        delivery={"probe_interval": "0.1s"},
        domain=[{"name": DOMAIN, "primary": [f"127.0.0.2:{primary.port}"], "verify": "callout"}],
    )

    def clock() -> float:
        return time.time() + later[0]

    server = Relay(config, clock=clock)
    await server.start()
    try:
        assert await rcpt_replies(server, f"known@{DOMAIN}") == ["250 2.1.5 Ok"]
        await primary.stop()
        # Mail for the known mailbox arrives; its delivery finds the primary down.
        await asyncio.to_thread(send_mail, smtp_address(server), [f"known@{DOMAIN}"])
        await eventually(lambda: server.health.down_since(DOMAIN), "the outage noticed")
        later[0] = 8 * 86400.0
        replies = await rcpt_replies(server, f"known@{DOMAIN}", f"stranger@{DOMAIN}")
        assert replies == ["250 2.1.5 Ok", UNVERIFIED.format(f"stranger@{DOMAIN}")]
    finally:
        await server.stop()

    later[0] = 9 * 86400.0
    restarted = Relay(config, clock=clock)
    await restarted.start()
    try:
        assert await rcpt_replies(restarted, f"known@{DOMAIN}") == ["250 2.1.5 Ok"]
    finally:
        await restarted.stop()


async def test_recipients_import_list_and_forget_reach_a_running_relay(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    """Installed during an outage: a callout relay knows nobody and tempfails everyone, until
    the operator imports the mailboxes, which the running server takes up within seconds."""
    server = await relay_factory(domain=domain(verify="callout"))
    cli_config = write_config(tmp_path, "cli.toml", domain=domain(verify="callout"))
    alice, bob = f"alice@{DOMAIN}", "Bob@EXAMPLE.test"
    assert await rcpt_replies(server, alice) == [UNVERIFIED.format(alice)]

    def cli(*args: str, stdin: str = "") -> tuple[int, str, str]:
        done = subprocess.run(
            relay_command("recipients", *args, "--config", str(cli_config)),
            input=stdin,
            capture_output=True,
            text=True,
            env=relay_env(),
            timeout=30,
        )
        return done.returncode, done.stdout, done.stderr

    lines = "\n".join(
        [
            "# exported from the primary",
            alice,
            f"<{bob}>  # a comment",
            "not an address",
            "x@other.test",
            "",
        ]
    )
    code, out, err = await asyncio.to_thread(cli, "import", "-", stdin=lines)
    assert (code, out) == (1, "imported 2 addresses\n")
    assert err.splitlines() == [
        "relay: line 4: 'not an address' is not an address (local@domain)",
        "relay: line 5: x@other.test: other.test is not a configured domain",
    ]

    async def replies_become(expected: list[str]) -> None:
        deadline = time.monotonic() + 5
        while (got := await rcpt_replies(server, alice, f"Bob@{DOMAIN}")) != expected:
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.05)

    await replies_become(["250 2.1.5 Ok", "250 2.1.5 Ok"])
    code, out, _ = await asyncio.to_thread(cli, "list")
    assert code == 0
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["Bob@example.test", "exists"],
        ["alice@example.test", "exists"],
        ["--", "2"],
    ]
    assert await asyncio.to_thread(cli, "forget", alice, f"nobody@{DOMAIN}") == (
        1,
        f"{alice}: forgotten\n",
        f"relay: nobody@{DOMAIN}: not remembered\n",
    )
    await replies_become([UNVERIFIED.format(alice), "250 2.1.5 Ok"])


def test_import_refuses_domains_that_do_not_use_callout(tmp_path: Path) -> None:
    config = write_config(tmp_path, domain=domain(recipients=["alice"]))
    Store(str(tmp_path / "queue" / "queue.db")).close()
    done = subprocess.run(
        relay_command("recipients", "import", "-", "--config", str(config)),
        input=f"alice@{DOMAIN}\n",
        capture_output=True,
        text=True,
        env=relay_env(),
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (1, "imported 0 addresses\n")
    assert 'does not use verify = "callout"' in done.stderr


# -- accept = "when_primary_down" -------------------------------------------------------------


async def test_accept_when_primary_down_turns_mail_away_while_the_primary_is_up(
    relay_factory: RelayFactory, fake_primary: StartPrimary
) -> None:
    primary = await fake_primary()
    server = await relay_factory(
        delivery={"probe_interval": "0.05s"},
        domain=[
            {
                "name": DOMAIN,
                "primary": [f"127.0.0.2:{primary.port}"],
                "accept": "when_primary_down",
            }
        ],
    )
    before = rejected("primary_up")
    assert await rcpt_replies(server, f"anyone@{DOMAIN}") == [
        f"450 4.7.0 <anyone@{DOMAIN}>: this backup MX takes mail only while the primary is"
        " down; deliver to the primary MX"
    ]
    assert rejected("primary_up") == before + 1
    assert not primary.transactions  # probes only: nothing was sent to the primary

    await primary.stop()
    await eventually(lambda: server.health.is_down(DOMAIN), "the outage noticed")
    assert await rcpt_replies(server, f"anyone@{DOMAIN}") == ["250 2.1.5 Ok"]


@pytest.mark.parametrize("verify", ["none", "callout"])
async def test_a_refused_recipient_never_reaches_the_queue(
    relay_factory: RelayFactory, fake_primary: StartPrimary, verify: str
) -> None:
    primary = await fake_primary(replies={f"ghost@{DOMAIN}": "550 5.1.1 no such user"})
    server = await relay_factory(
        domain=[
            {
                "name": DOMAIN,
                "primary": [f"127.0.0.2:{primary.port}"],
                "verify": verify,
                "recipients": ["alice"] if verify == "none" else [],
            }
        ]
    )
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        await talk.command("MAIL FROM:<sender@client.test>")
        assert (await talk.command(f"RCPT TO:<ghost@{DOMAIN}>")).code == 550
        assert (await talk.command("DATA")).code == 503
    with open_store(server.config.queue.path) as store:
        assert store.list_messages() == []


# -- the postmaster ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alias", ["postmaster", "POSTMASTER", "postmaster@relay.test", "Abuse@RELAY.test"]
)
async def test_postmaster_and_abuse_at_our_host_name_reach_the_configured_postmaster(
    relay_factory: RelayFactory, tmp_path: Path, alias: str
) -> None:
    """RFC 5321 4.5.1: mail to <postmaster> must be accepted, from anyone, with or without a
    domain; it is queued for the `postmaster` address, the original kept as ORCPT."""
    server = await relay_factory(
        postmaster="hostmaster@elsewhere.test", domain=domain(recipients=["bob"])
    )
    queue_id = await asyncio.to_thread(send_mail, smtp_address(server), [alias], source="127.0.0.9")
    with open_store(tmp_path / "queue" / "queue.db") as store:
        row = store.get(queue_id)
    assert row is not None
    [recipient] = row.recipients
    assert (recipient.address, recipient.orcpt) == ("hostmaster@elsewhere.test", f"rfc822;{alias}")


async def test_without_a_postmaster_the_aliases_are_ordinary_addresses(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory()
    replies = await rcpt_replies(server, "postmaster", "postmaster@relay.test")
    assert replies[0].startswith("501 5.1.3")
    assert replies[1] == "550 5.7.1 <postmaster@relay.test>: Relay access denied"
