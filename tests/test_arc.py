"""The ARC seal (issue 15 part 2): keygen, the seal on what the primary receives, a chain
carried on, the doctor's key check, and a seal that fails costing nothing.

The primary's side of the check is dkimpy's own ARC verifier, looking our key up on a real
authoritative DNS server on loopback (tests/dnsserver.py); tests/interop/test_rspamd.py checks
the same seal with rspamd's.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dkim
import dns.resolver
import pytest
from fakeprimary import FakePrimary, fake_primary
from hostile import eventually

from relay import config as config_module
from relay.ops import metrics
from relay.ops.doctor import diagnose
from relay.service import Relay
from relay.smtp import arc as arc_keys
from tests.conftest import DOMAIN, HOSTNAME, conversation, relay_cli, smtp_address, write_config
from tests.dnsserver import DnsServer, dns_server

__all__ = ["dns_server", "fake_primary"]

RelayFactory = Callable[..., Awaitable[Relay]]
StartPrimary = Callable[..., Awaitable[FakePrimary]]
SEAL_DOMAIN = "relay.example"
MESSAGE = (
    b"From: Alice <alice@sender.test>\r\nTo: bob@example.test\r\nSubject: the numbers\r\n"
    b"Date: Sat, 05 Dec 2026 12:00:00 +0000\r\nMessage-ID: <n1@sender.test>\r\n\r\n"
    b"Hello Bob,\r\nthe numbers are attached.\r\n"
)


def publish(dns: DnsServer, selector: str, domain: str, key: bytes) -> None:
    value = arc_keys.txt_strings(arc_keys.public_record(key))
    dns.set(f"{selector}._domainkey.{domain}.", [("TXT", value)])


def lookup(server: DnsServer) -> Callable[..., bytes | None]:
    """dkimpy's dnsfunc, answered by the test's DNS server: the primary's view."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port

    def txt(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(text, "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(next(iter(answer)).strings)  # type: ignore[attr-defined]

    return txt


async def start(
    factory: RelayFactory,
    dns: DnsServer,
    tmp_path: Path,
    primary: FakePrimary | None = None,
    **arc: Any,
) -> Relay:
    hop = [f"{primary.address}:{primary.port}"] if primary else ["127.0.0.1:9"]
    return await factory(
        dns={"nameservers": [dns.address]},
        arc=arc,
        domain=[{"name": DOMAIN, "primary": hop, "tls": "none"}],
    )


async def send(server: Relay, content: bytes = MESSAGE) -> str:
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo("client.sender.test")
        assert (await talk.command("MAIL FROM:<alice@sender.test>")).code == 250
        assert (await talk.command(f"RCPT TO:<bob@{DOMAIN}>")).code == 250
        assert (await talk.command("DATA")).code == 354
        await talk.send(content.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        return (await talk.reply()).text


def sealed_key(tmp_path: Path, dns: DnsServer, selector: str = "s1") -> str:
    path = str(tmp_path / "arc.key")
    publish(dns, selector, SEAL_DOMAIN, arc_keys.generate_key(path))
    return path


async def delivered(primary: FakePrimary) -> bytes:
    done = await eventually(lambda: [t for t in primary.transactions if t.data], "a delivery")
    return done[0].data or b""


# -- the seal -----------------------------------------------------------------------------------


async def test_the_primary_receives_a_seal_that_verifies(
    relay_factory: RelayFactory,
    dns_server: DnsServer,
    fake_primary: StartPrimary,
    tmp_path: Path,
) -> None:
    primary = await fake_primary()
    key = sealed_key(tmp_path, dns_server)
    server = await start(
        relay_factory, dns_server, tmp_path, primary, key=key, selector="s1", domain=SEAL_DOMAIN
    )
    before = metrics.REGISTRY.get_sample_value("relay_arc_seals_total", {"result": "sealed"})
    assert (await send(server)).startswith("250 ")
    data = await delivered(primary)
    assert data.startswith(b"Received: ")  # our trace stays on top (RFC 5321 4.4)
    assert b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=relay.example; s=s1;" in data
    assert f"ARC-Authentication-Results: i=1; {HOSTNAME};".encode() in data
    verdict, results, reason = dkim.arc_verify(data, dnsfunc=lookup(dns_server))
    assert verdict == dkim.CV_Pass, reason
    assert [r["instance"] for r in results] == [1]
    after = metrics.REGISTRY.get_sample_value("relay_arc_seals_total", {"result": "sealed"})
    assert (after or 0) == (before or 0) + 1


async def test_a_chain_the_message_came_with_is_carried_on(
    relay_factory: RelayFactory,
    dns_server: DnsServer,
    fake_primary: StartPrimary,
    tmp_path: Path,
) -> None:
    # A mailing list sealed it first (i=1), with its own key; we add i=2 with cv=pass.
    list_key = arc_keys.generate_key(str(tmp_path / "list.key"))
    publish(dns_server, "l1", "lists.test", list_key)
    first = b"Authentication-Results: lists.test; spf=pass smtp.mailfrom=sender.test\r\n" + MESSAGE
    lines = dkim.arc_sign(first, b"l1", b"lists.test", list_key, b"lists.test")
    incoming = b"".join(lines) + first
    primary = await fake_primary()
    key = sealed_key(tmp_path, dns_server)
    server = await start(
        relay_factory, dns_server, tmp_path, primary, key=key, selector="s1", domain=SEAL_DOMAIN
    )
    assert (await send(server, incoming)).startswith("250 ")
    data = await delivered(primary)
    assert b"arc=pass" in data  # what our results say of the chain
    assert b"ARC-Seal: i=2; cv=pass; a=rsa-sha256; d=relay.example;" in data
    verdict, results, reason = dkim.arc_verify(data, dnsfunc=lookup(dns_server))
    assert verdict == dkim.CV_Pass, reason
    assert sorted(r["instance"] for r in results) == [1, 2]


async def test_a_message_that_cannot_be_sealed_is_stored_unsealed(
    relay_factory: RelayFactory, dns_server: DnsServer, fake_primary: StartPrimary, tmp_path: Path
) -> None:
    primary = await fake_primary()
    key = sealed_key(tmp_path, dns_server)
    server = await start(
        relay_factory, dns_server, tmp_path, primary, key=key, selector="s1", domain=SEAL_DOMAIN
    )
    before = metrics.REGISTRY.get_sample_value("relay_arc_seals_total", {"result": "failed"})
    no_from = b"Subject: no From header at all\r\n\r\nbody\r\n"  # RFC 8617 signs From: none here
    assert (await send(server, no_from)).startswith("250 ")
    data = await delivered(primary)
    assert b"ARC-Seal" not in data and data.endswith(no_from)
    after = metrics.REGISTRY.get_sample_value("relay_arc_seals_total", {"result": "failed"})
    assert (after or 0) == (before or 0) + 1


# -- keygen ---------------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_and_prints_the_record(tmp_path: Path) -> None:
    arc = {"key": str(tmp_path / "arc.key"), "selector": "s2027", "domain": SEAL_DOMAIN}
    config = write_config(tmp_path, arc=arc)
    code, out, err = relay_cli(config, "arc", "keygen", "--selector", "s2027")
    assert code == 0, err
    path = tmp_path / "arc.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    record = arc_keys.public_record(path.read_bytes())
    assert out.startswith(f"s2027._domainkey.{SEAL_DOMAIN}. IN TXT ( ")
    assert "".join(re.findall(r'"([^"]*)"', out)) == record
    assert f"wrote {path}" in err
    # The relay now loads that config, key and all.
    config_module.load(config)


def test_keygen_never_overwrites_a_key_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "arc.key"
    config = write_config(tmp_path, arc={"key": str(path), "domain": SEAL_DOMAIN})
    assert relay_cli(config, "arc", "keygen", "--selector", "s1")[0] == 0
    first = path.read_bytes()
    code, _, err = relay_cli(config, "arc", "keygen", "--selector", "s1")
    assert code == 1 and "exists: add --force" in err
    assert path.read_bytes() == first
    assert relay_cli(config, "arc", "keygen", "--selector", "s1", "--force")[0] == 0
    assert path.read_bytes() != first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--selector", "s1"), "no signing domain"),
        (("--selector", "bad selector", "--domain", SEAL_DOMAIN), "is not a DNS label"),
    ],
)
def test_keygen_says_what_is_missing(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    config = write_config(tmp_path, arc={"key": str(tmp_path / "arc.key")})
    code, _, err = relay_cli(config, "arc", "keygen", *args)
    assert code == 2 and message in err
    assert not (tmp_path / "arc.key").exists()


def test_a_bad_arc_config_is_refused_precisely(tmp_path: Path) -> None:
    (tmp_path / "garbage.key").write_text("not a key\n")
    for arc, problem in (
        (
            {"key": str(tmp_path / "missing.key"), "selector": "s1", "domain": "d.test"},
            "cannot read",
        ),
        ({"key": str(tmp_path / "garbage.key"), "selector": "s1", "domain": "d.test"}, "not a PEM"),
    ):
        with pytest.raises(config_module.ConfigError) as caught:
            config_module.load(write_config(tmp_path, arc=arc))
        assert any("arc.key: " in p and problem in p for p in caught.value.problems), caught.value
    arc_keys.generate_key(str(tmp_path / "good.key"))
    with pytest.raises(config_module.ConfigError) as caught:
        config_module.load(write_config(tmp_path, arc={"key": str(tmp_path / "good.key")}))
    assert {p.split(": ")[1] for p in caught.value.problems} == {"arc.selector", "arc.domain"}


# -- the doctor -----------------------------------------------------------------------------------


async def test_the_doctor_checks_the_published_key(tmp_path: Path, dns_server: DnsServer) -> None:
    key = str(tmp_path / "arc.key")
    pem = arc_keys.generate_key(key)
    arc = {"key": key, "selector": "s1", "domain": SEAL_DOMAIN}
    cfg = config_module.load(
        write_config(tmp_path, arc=arc, dns={"nameservers": [dns_server.address]})
    )

    async def findings() -> list[Any]:
        return [f for f in await diagnose(cfg) if f.check == "arc"]

    [missing] = await findings()
    assert missing.status == "problem" and "no key record" in missing.message
    publish(dns_server, "s1", SEAL_DOMAIN, arc_keys.generate_key(str(tmp_path / "other.key")))
    [wrong] = await findings()
    assert wrong.status == "problem" and "is not the one in" in wrong.message
    publish(dns_server, "s1", SEAL_DOMAIN, pem)
    [right] = await findings()
    assert right.status == "ok"
