"""Which domain is ours: ASCII case-insensitive, internationalized names as their A-labels.

`str.lower()` folds more than ASCII: the Kelvin sign U+212A becomes "k", so `BAN\\u212a.TEST`
was taken for `bank.test` and its non-ASCII bytes passed on. Names are compared in A-labels
(IDNA 2008, the `idna` package); a name that is not valid IDNA 2008 is refused at RCPT.
Over real SMTP, against a relay serving an ASCII, an A-label and a U-label domain.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from relay.config import ConfigError
from relay.envelope import address_problem, domain_key
from relay.service import Relay
from tests.conftest import (
    NEVER_REACHED_PRIMARY,
    conversation,
    dot_stuff,
    make_config,
    open_store,
    smtp_address,
)

RelayFactory = Callable[..., Awaitable[Relay]]
IDNA_REFUSAL = "domain is not a valid internationalized name (IDNA 2008)"
DOMAINS = ["bank.test", "xn--mller-kva.test", "bücher.test", "faß.test"]


@pytest.fixture
async def idn_relay(relay_factory: RelayFactory) -> Relay:
    return await relay_factory(
        domain=[{"name": name, "primary": [NEVER_REACHED_PRIMARY]} for name in DOMAINS]
    )


async def rcpt_replies(
    server: Relay, recipients: list[str], sender: str = "s@client.test"
) -> list[str]:
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        assert (await talk.command(f"MAIL FROM:<{sender}> SMTPUTF8")).code == 250
        return [(await talk.command(f"RCPT TO:<{rcpt}>")).text for rcpt in recipients]


async def test_the_kelvin_sign_does_not_make_a_domain_ours(idn_relay: Relay) -> None:
    replies = await rcpt_replies(
        idn_relay, ["user@BAN\u212a.TEST", "user@ban\u212a.test", "user@BANK.TEST"]
    )
    assert replies == [
        f"501 5.1.3 Bad recipient address syntax: {IDNA_REFUSAL}",
        f"501 5.1.3 Bad recipient address syntax: {IDNA_REFUSAL}",
        "250 2.1.5 Ok",  # ASCII letters still compare case-insensitively
    ]


async def test_a_sender_domain_that_is_not_valid_idna_is_refused_at_mail(idn_relay: Relay) -> None:
    async with conversation(smtp_address(idn_relay)) as talk:
        await talk.ehlo()
        reply = await talk.command("MAIL FROM:<user@ban\u212a.test> SMTPUTF8")
    assert reply.text == f"501 5.1.7 Bad sender address syntax: {IDNA_REFUSAL}"


async def test_a_u_label_matches_its_configured_a_label_and_is_queued_as_sent(
    idn_relay: Relay,
) -> None:
    recipients = ["bob@müller.test", "ann@XN--BCHER-KVA.test", "eve@xn--fa-hia.test"]
    async with conversation(smtp_address(idn_relay)) as talk:
        await talk.ehlo()
        assert (await talk.command("MAIL FROM:<s@client.test> SMTPUTF8")).code == 250
        for rcpt in recipients:
            reply = await talk.command(f"RCPT TO:<{rcpt}>")
            assert reply.text == "250 2.1.5 Ok", (rcpt, reply)
        assert (await talk.command("DATA")).code == 354
        await talk.send(dot_stuff(b"Subject: idn\r\n\r\nhi\r\n"))
        queued = await talk.reply()
    assert queued.code == 250, queued
    with open_store(idn_relay.config.queue.path) as store:
        row = store.get(queued.queue_id)
    assert row is not None
    assert [r.address for r in row.recipients] == recipients  # passed on as the sender wrote


async def test_idna_2008_not_2003_and_no_unicode_case_folding(idn_relay: Relay) -> None:
    replies = await rcpt_replies(
        idn_relay, ["eve@fass.test", "bob@MÜLLER.test", "bob@m\u0075\u0308ller.test"]
    )
    assert replies == [
        # IDNA 2003 mapped ß to "ss"; IDNA 2008 keeps it (faß.test is xn--fa-hia.test).
        "550 5.7.1 <eve@fass.test>: Relay access denied",
        # Upper case outside ASCII and a decomposed ü are not valid U-labels.
        f"501 5.1.3 Bad recipient address syntax: {IDNA_REFUSAL}",
        f"501 5.1.3 Bad recipient address syntax: {IDNA_REFUSAL}",
    ]


@pytest.mark.parametrize(
    ("domain", "key"),
    [
        ("Example.TEST.", "example.test"),
        ("müller.test", "xn--mller-kva.test"),
        ("Müller.TEST", "xn--mller-kva.test"),  # ASCII letters fold; the ü is already lower
        ("XN--MLLER-KVA.test", "xn--mller-kva.test"),
        ("faß.test", "xn--fa-hia.test"),
        ("ban\u212a.test", "ban\u212a.test"),  # invalid: kept, so it equals no A-label
        ("[192.0.2.1]", "[192.0.2.1]"),
    ],
)
def test_domain_keys_are_a_labels_with_ascii_letters_folded(domain: str, key: str) -> None:
    assert domain_key(domain) == key
    assert (address_problem(f"u@{domain}") == IDNA_REFUSAL) == (key == "ban\u212a.test")


def test_a_configured_domain_must_be_valid_idna_2008_and_is_one_name_in_both_forms(
    tmp_path: Path,
) -> None:
    names = ["BAN\u212a.test", "bücher.test", "XN--BCHER-KVA.test"]
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, domain=[{"name": name} for name in names])
    assert caught.value.problems == [
        f"{tmp_path}/relay.toml: domain[0].name: bad domain name 'BAN\u212a.test'",
        f"{tmp_path}/relay.toml: domain[2].name: xn--bcher-kva.test is listed twice",
    ]
