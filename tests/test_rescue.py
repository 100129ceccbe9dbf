"""Rescue mailboxes (issue 16 section 1), against a running relay: copies appear for the people
the relay knows exist once the primary has been down for rescue_after, byte for byte as queued,
and go rescue_keep after the original was delivered. IMAP itself is Dovecot's: the interop suite
reads these Maildirs through a real Dovecot (tests/interop/test_rescue_imap.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import bcrypt
from conftest import (
    DOMAIN,
    metrics_url,
    open_store,
    relay_cli,
    sample,
    scrape,
    send_mail,
    smtp_address,
    write_config,
)
from hostile import eventually

from relay.service import Relay
from tests.fakeprimary import FakePrimary, fake_primary, unused_port

__all__ = ["fake_primary"]

RelayFactory = Callable[..., Awaitable[Relay]]
Start = Callable[..., Awaitable[FakePrimary]]
PRIMARY = "127.0.0.5"
OPEN_DOMAIN = "open.test"


def domains(port: int, **rescue: Any) -> list[dict[str, Any]]:
    primary = [f"{PRIMARY}:{port}"]
    return [
        {"name": DOMAIN, "primary": primary, "tls": "none", "recipients": ["bob"], **rescue},
        {"name": OPEN_DOMAIN, "primary": primary, "tls": "none", **rescue},  # a catch-all
    ]


def copies(root: Path, address: str) -> list[Path]:
    local, _, domain = address.lower().partition("@")
    found: list[Path] = []
    for sub in ("new", "cur"):
        folder = root / domain / local / sub
        found += sorted(folder.iterdir()) if folder.exists() else []
    return found


async def test_held_mail_is_copied_for_known_people_and_removed_after_delivery(
    relay_factory: RelayFactory, fake_primary: Start, tmp_path: Path
) -> None:
    port = unused_port(PRIMARY)
    server = await relay_factory(
        domain=domains(port, rescue=True, rescue_after="0s", rescue_keep="1s"),
        delivery={"probe_interval": "0.2s"},
    )
    root = Path(server.config.rescue.path)
    assert root == tmp_path / "queue" / "rescue"  # next to the queue by default
    address = smtp_address(server)
    body = b"Subject: the contract\r\n\r\nSigned copy attached.\r\n"
    queue_id = await asyncio.to_thread(send_mail, address, [f"Bob@{DOMAIN}"], body)
    await asyncio.to_thread(send_mail, address, [f"anyone@{OPEN_DOMAIN}"], body)

    [copy] = await eventually(lambda: copies(root, f"bob@{DOMAIN}"), "bob's rescue copy")
    assert copy.parent.name == "new" and oct(copy.stat().st_mode & 0o777) == "0o600"
    with open_store(server.config.queue.path) as store:
        assert copy.read_bytes() == store.body(queue_id)  # byte for byte, our Received included
    rescuer = server.rescuer
    passes = rescuer.passes
    await eventually(lambda: rescuer.passes >= passes + 2, "two more rescue passes")
    assert copies(root, f"bob@{DOMAIN}") == [copy]  # one copy, not one per pass
    assert not (root / OPEN_DOMAIN).exists()  # a catch-all names nobody: no copy
    samples = await asyncio.to_thread(scrape, metrics_url(server))
    assert sample(samples, "relay_rescue_active", domain=DOMAIN) == 1
    assert sample(samples, "relay_rescue_messages", domain=DOMAIN) == 1

    # Bob reads it (his IMAP client moves it to cur/ with the Seen flag), then the primary
    # comes back: the original is delivered, and the copy goes rescue_keep later.
    read = copy.parent.parent / "cur" / (copy.name + ":2,S")
    copy.rename(read)
    primary = await fake_primary(address=PRIMARY, port=port)
    await eventually(lambda: len(primary.transactions) == 2, "both originals delivered")
    await eventually(lambda: not read.exists(), "the copy removed after rescue_keep")
    await eventually(lambda: rescuer.passes >= passes + 6, "the gauges updated")
    samples = await asyncio.to_thread(scrape, metrics_url(server))
    assert sample(samples, "relay_rescue_active", domain=DOMAIN) == 0
    assert sample(samples, "relay_rescue_messages", domain=DOMAIN) == 0


async def test_rescue_waits_for_rescue_after_and_can_be_turned_on_and_off_by_hand(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    port = unused_port(PRIMARY)
    settings = domains(port, rescue=True, rescue_after="1h")
    server = await relay_factory(domain=settings, delivery={"probe_interval": "0.2s"})
    config = write_config(tmp_path, "cli.toml", domain=settings)
    root = Path(server.config.rescue.path)
    await asyncio.to_thread(send_mail, smtp_address(server), [f"bob@{DOMAIN}"])
    await eventually(lambda: server.health.is_down(DOMAIN), "the outage noticed")
    passes = server.rescuer.passes
    await eventually(lambda: server.rescuer.passes >= passes + 2, "two rescue passes")
    assert copies(root, f"bob@{DOMAIN}") == []  # down for less than rescue_after

    code, out, _ = await asyncio.to_thread(relay_cli, config, "rescue", "on", DOMAIN)
    assert (code, out.strip()) == (0, f"{DOMAIN}: rescue mailboxes on, by hand")
    await eventually(lambda: copies(root, f"bob@{DOMAIN}"), "the copy after relay rescue on")
    _, status, _ = await asyncio.to_thread(relay_cli, config, "status")
    assert "rescue mailboxes active" in status

    code, out, _ = await asyncio.to_thread(relay_cli, config, "rescue", "off", DOMAIN)
    assert (code, out.strip()) == (0, f"{DOMAIN}: rescue mailboxes off, by hand")
    await eventually(lambda: not server.rescuer.is_active(server.config.domains[0], 0), "off")
    await asyncio.to_thread(send_mail, smtp_address(server), [f"bob@{DOMAIN}"])
    passes = server.rescuer.passes
    await eventually(lambda: server.rescuer.passes >= passes + 2, "two rescue passes")
    assert len(copies(root, f"bob@{DOMAIN}")) == 1  # the second message got none


def test_grant_revoke_and_list_manage_dovecot_s_passwd_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, domain=[{"name": DOMAIN, "primary": ["127.0.0.1:1"]}])
    code, out, err = relay_cli(config, "rescue", "grant", f"Bob@{DOMAIN}")
    assert code == 0, err
    assert out.splitlines()[0] == f"bob@{DOMAIN}: access granted"
    password = out.splitlines()[1].removeprefix("password: ")
    assert "rescue is off" in err  # granted, but nothing will be copied until it is on
    passwd = tmp_path / "queue" / "rescue" / "passwd"
    user, scheme_hash = passwd.read_text().splitlines()[0].split(":")[:2]
    assert user == f"bob@{DOMAIN}" and scheme_hash.startswith("{BLF-CRYPT}$2b$")
    assert bcrypt.checkpw(password.encode(), scheme_hash.removeprefix("{BLF-CRYPT}").encode())
    assert oct(os.stat(passwd).st_mode & 0o777) == "0o640"

    code, out, _ = relay_cli(config, "rescue", "grant", f"bob@{DOMAIN}")
    assert out.splitlines()[0] == f"bob@{DOMAIN}: password reset"
    assert out.splitlines()[1] != f"password: {password}"
    code, out, _ = relay_cli(config, "rescue", "list")
    assert out.splitlines() == [f"bob@{DOMAIN}  0 messages", "-- 1 person with access"]
    log = tmp_path / "dovecot.log"
    log.write_text(
        f"Dec 05 12:08:55 imap-login: Info: Login: user=<bob@{DOMAIN}>, method=PLAIN\n"
        f"Dec 05 12:09:30 imap-login: Info: Disconnected (auth failed): user=<bob@{DOMAIN}>\n"
        f"Dec  5 13:01:02 mx2 dovecot: imap-login: Login: user=<Bob@{DOMAIN}>, method=PLAIN\n"
    )
    code, out, _ = relay_cli(config, "rescue", "list", "--dovecot-log", str(log))
    assert out.splitlines()[0] == f"bob@{DOMAIN}  0 messages  last login Dec  5 13:01:02"

    assert relay_cli(config, "rescue", "revoke", f"bob@{DOMAIN}")[:2] == (
        0,
        f"bob@{DOMAIN}: access revoked\n",
    )
    code, _, err = relay_cli(config, "rescue", "revoke", f"bob@{DOMAIN}")
    assert code == 1 and "has no access" in err
    code, _, err = relay_cli(config, "rescue", "grant", "bob@elsewhere.test")
    assert code == 2 and "not an address of a configured domain" in err
    code, _, err = relay_cli(config, "rescue", "grant", f"../../etc@{DOMAIN}")
    assert code == 2 and "cannot have a rescue mailbox" in err
