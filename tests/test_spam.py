"""Checks at the door (issue 15 section 1): DNS lists weighted like postscreen, and pregreet.

The lists are answered by a real authoritative DNS server on loopback (tests/dnsserver.py);
clients connect from loopback addresses, whose reversed names the tests list or not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import DOMAIN, Conversation, config_mapping, conversation, smtp_address
from hostile import closes, deliver, rejected

from relay import config as config_module
from relay.service import Relay
from tests.dnsserver import DnsServer, dns_server

__all__ = ["dns_server"]

RelayFactory = Callable[..., Awaitable[Relay]]


def listed(server: DnsServer, zone: str, client: str, answer: str = "127.0.0.2") -> str:
    name = ".".join(reversed(client.split("."))) + f".{zone}."
    server.set(name, [("A", answer)])
    return name


async def start(factory: RelayFactory, dns: DnsServer, **spam: Any) -> Relay:
    return await factory(dns={"nameservers": [dns.address]}, spam=spam)


async def rcpt_reply(server: Relay, client: str) -> str:
    async with conversation(smtp_address(server), source=client) as talk:
        await talk.ehlo()
        assert (await talk.command("MAIL FROM:<sender@client.test>")).code == 250
        return (await talk.command(f"RCPT TO:<bob@{DOMAIN}>")).text


async def test_a_client_over_the_threshold_is_refused_at_rcpt_naming_the_lists(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    listed(dns_server, "zen.test", "127.0.0.31")
    listed(dns_server, "spamcop.test", "127.0.0.31")
    listed(dns_server, "zen.test", "127.0.0.32")  # 3: at the threshold
    listed(dns_server, "spamcop.test", "127.0.0.33")  # 2: under it
    server = await start(
        relay_factory, dns_server, dnsbl=["zen.test*3", "spamcop.test*2"], dnsbl_threshold=3
    )
    before = rejected("dnsbl")
    assert await rcpt_reply(server, "127.0.0.31") == (
        "550 5.7.1 Service unavailable; client [127.0.0.31] blocked using zen.test, spamcop.test"
    )
    assert (await rcpt_reply(server, "127.0.0.32")).startswith("550 5.7.1 ")
    assert await rcpt_reply(server, "127.0.0.33") == "250 2.1.5 Ok"
    assert await rcpt_reply(server, "127.0.0.34") == "250 2.1.5 Ok"  # listed nowhere
    assert rejected("dnsbl") == before + 2


async def test_an_allowlist_weighs_against_and_a_reply_filter_chooses_what_counts(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    listed(dns_server, "zen.test", "127.0.0.41")
    listed(dns_server, "dnswl.test", "127.0.0.41", "127.0.5.2")  # a trusted sender, listed
    listed(dns_server, "zen.test", "127.0.0.42", "127.255.255.254")  # the list's "query refused"
    server = await start(
        relay_factory,
        dns_server,
        dnsbl=["zen.test=127.0.0.[2..11]*3", "dnswl.test=127.0.[0..255].[1..3]*-5"],
    )
    assert await rcpt_reply(server, "127.0.0.41") == "250 2.1.5 Ok"
    assert await rcpt_reply(server, "127.0.0.42") == "250 2.1.5 Ok"


async def test_a_list_that_does_not_answer_never_blocks_mail(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    name = listed(dns_server, "slow.test", "127.0.0.51")
    dns_server.drop(name)
    dns_server.servfail(listed(dns_server, "broken.test", "127.0.0.51"))
    server = await start(
        relay_factory, dns_server, dnsbl=["slow.test*3", "broken.test*3"], dnsbl_timeout="0.5s"
    )
    started = time.monotonic()
    assert await rcpt_reply(server, "127.0.0.51") == "250 2.1.5 Ok"
    assert time.monotonic() - started < 0.5 + 2  # one deadline for all lists


async def test_answers_are_cached_per_client(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    name = listed(dns_server, "zen.test", "127.0.0.61")
    server = await start(relay_factory, dns_server, dnsbl=["zen.test*3"])
    for _ in range(3):
        assert (await rcpt_reply(server, "127.0.0.61")).startswith("550 5.7.1 ")
    assert dns_server.asked(name) == ["A"]


async def test_at_the_banner_a_listed_client_gets_554_instead_of_220(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    listed(dns_server, "zen.test", "127.0.0.71")
    server = await start(relay_factory, dns_server, dnsbl=["zen.test*3"], dnsbl_action="banner")
    reader, writer = await asyncio.open_connection(
        *smtp_address(server), local_addr=("127.0.0.71", 0)
    )
    try:
        line = (await asyncio.wait_for(reader.readline(), 10)).decode().strip()
        assert line == "554 5.7.1 Service unavailable; client [127.0.0.71] blocked using zen.test"
        assert await closes(reader)
    finally:
        writer.close()
    async with conversation(smtp_address(server), source="127.0.0.72") as talk:
        await talk.ehlo()
        await deliver(talk)


async def test_a_client_that_talks_before_the_greeting_is_refused(
    relay_factory: RelayFactory, dns_server: DnsServer
) -> None:
    server = await start(relay_factory, dns_server, greet_delay="0.3s")
    before = rejected("pregreet")
    reader, writer = await asyncio.open_connection(*smtp_address(server))
    try:
        writer.write(b"EHLO hasty.test\r\n")  # a spambot that does not wait for 220
        await writer.drain()
        line = (await asyncio.wait_for(reader.readline(), 10)).decode().strip()
        assert line == "550 5.5.1 Protocol error: talking before the greeting"
        assert await closes(reader)
    finally:
        writer.close()
    assert rejected("pregreet") == before + 1
    talk = await Conversation.open(smtp_address(server))  # waits for the banner: served
    try:
        await talk.ehlo()
        await deliver(talk)
    finally:
        await talk.close()


@pytest.mark.parametrize(
    ("spam", "problem"),
    [
        ({"dnsbl": ["zen"]}, "spam.dnsbl: bad DNS list 'zen'"),
        ({"dnsbl": ["zen.test=127.0.0.[9..2]"]}, "bad reply filter"),
        ({"dnsbl_action": "later"}, "spam.dnsbl_action"),
    ],
)
def test_bad_spam_settings_are_refused_precisely(
    spam: dict[str, Any], problem: str, tmp_path: Any
) -> None:
    with pytest.raises(config_module.ConfigError) as raised:
        config_module.from_mapping(config_mapping(tmp_path, spam=spam))
    assert any(problem in line for line in raised.value.problems), raised.value.problems
