"""`relay domain reroute / pause / resume` (issue 16 section 3), against a running relay.

The operator's commands run as the real CLI in a subprocess beside the server, as they would on
a live machine; the server takes them up within 2 seconds, and a restart keeps them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from conftest import (
    DOMAIN,
    HOSTNAME,
    metrics_url,
    open_store,
    relay_cli,
    scrape,
    send_mail,
    smtp_address,
    write_config,
)
from hostile import eventually

from relay import config as config_module
from relay.service import Relay
from tests.fakeprimary import FakePrimary, fake_primary

__all__ = ["fake_primary"]

RelayFactory = Callable[..., Awaitable[Relay]]
Start = Callable[..., Awaitable[FakePrimary]]


def domains(primary: FakePrimary) -> list[dict[str, Any]]:
    return [{"name": DOMAIN, "primary": [f"{primary.address}:{primary.port}"]}]


def delivered_to(fake: FakePrimary) -> list[str]:
    return [rcpt for t in fake.transactions if t.data is not None for rcpt, _ in t.rcpts]


async def state_series(server: Relay) -> dict[str, float]:
    samples = await asyncio.to_thread(scrape, metrics_url(server))
    return {
        dict(labels)["state"]: value
        for (name, labels), value in samples.items()
        if name == "relay_domain_state" and dict(labels).get("domain") == DOMAIN
    }


async def test_reroute_sends_queued_and_new_mail_elsewhere_until_cleared(
    relay_factory: RelayFactory, fake_primary: Start, tmp_path: Path
) -> None:
    primary = await fake_primary()
    elsewhere = await fake_primary(address="127.0.0.3")
    await primary.stop()  # the primary is gone for days
    server = await relay_factory(domain=domains(primary))
    config = write_config(tmp_path, "cli.toml", domain=domains(primary))
    address = smtp_address(server)
    await asyncio.to_thread(send_mail, address, [f"early@{DOMAIN}"])
    await eventually(lambda: server.health.is_down(DOMAIN), "the outage noticed")

    code, out, err = await asyncio.to_thread(
        relay_cli,
        config,
        "domain",
        "reroute",
        DOMAIN,
        "--to",
        f"{elsewhere.address}:{elsewhere.port}",
    )
    assert code == 0, err
    assert out.strip() == f"{DOMAIN}: mail goes to {elsewhere.address}:{elsewhere.port}"
    scheduler = server.scheduler
    assert scheduler is not None
    await eventually(lambda: scheduler.steering.rerouted(DOMAIN), "the reroute taken up", within=2)
    await asyncio.to_thread(send_mail, address, [f"later@{DOMAIN}"])
    await eventually(
        lambda: sorted(delivered_to(elsewhere)) == [f"early@{DOMAIN}", f"later@{DOMAIN}"],
        "queued and new mail at the reroute target",
    )
    assert server.health.is_down(DOMAIN)  # the primary's state is its own, still down
    assert await state_series(server) == {"normal": 0.0, "paused": 0.0, "rerouted": 1.0}
    _, status, _ = await asyncio.to_thread(relay_cli, config, "status")
    assert f"rerouted to {elsewhere.address}:{elsewhere.port} since " in status

    code, out, _ = await asyncio.to_thread(
        relay_cli, config, "domain", "reroute", DOMAIN, "--clear"
    )
    assert (code, out.strip()) == (0, f"{DOMAIN}: mail goes to its primary")
    await eventually(
        lambda: not scheduler.steering.rerouted(DOMAIN), "the reroute cleared", within=2
    )
    assert await state_series(server) == {}  # nobody steers it now: no series, as for any domain
    await asyncio.to_thread(send_mail, address, [f"after@{DOMAIN}"])
    await eventually(lambda: scheduler.ticks > 3, "a few scheduler passes")
    with open_store(server.config.queue.path) as store:
        waiting = [r.address for m in store.list_messages() for r in m.recipients]
    assert waiting == [f"after@{DOMAIN}"]  # back to the (down) primary: waits for it
    assert f"after@{DOMAIN}" not in delivered_to(elsewhere)


async def test_pause_keeps_mail_queued_and_resume_sends_it(
    relay_factory: RelayFactory, fake_primary: Start, tmp_path: Path
) -> None:
    primary = await fake_primary()
    server = await relay_factory(domain=domains(primary))
    config = write_config(tmp_path, "cli.toml", domain=domains(primary))
    code, out, _ = await asyncio.to_thread(relay_cli, config, "domain", "pause", DOMAIN)
    assert (code, out.strip()) == (0, f"{DOMAIN}: delivery paused")
    scheduler = server.scheduler
    assert scheduler is not None
    await eventually(lambda: scheduler.steering.paused(DOMAIN), "the pause taken up", within=2)

    await asyncio.to_thread(send_mail, smtp_address(server), [f"bob@{DOMAIN}"])
    passes = scheduler.ticks
    await eventually(lambda: scheduler.ticks >= passes + 3, "three scheduler passes")
    assert primary.transactions == []  # up, but paused: nothing sent
    with open_store(server.config.queue.path) as store:
        [message] = store.list_messages()
        [recipient] = message.recipients
    assert (message.state, recipient.attempts) == ("queued", 0)  # queued, not held, not tried
    assert (await state_series(server))["paused"] == 1.0
    _, status, _ = await asyncio.to_thread(relay_cli, config, "status")
    assert "delivery paused since " in status

    code, out, _ = await asyncio.to_thread(relay_cli, config, "domain", "resume", DOMAIN)
    assert (code, out.strip()) == (0, f"{DOMAIN}: delivery resumed")
    await eventually(lambda: delivered_to(primary) == [f"bob@{DOMAIN}"], "delivery after resume")


async def test_a_pause_survives_a_restart_and_is_logged(
    fake_primary: Start, tmp_path: Path, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    primary = await fake_primary()
    config = write_config(tmp_path, "relay.toml", domain=domains(primary))
    first = Relay(config_module.load(str(config)))
    await first.start()
    try:
        code, _, err = await asyncio.to_thread(relay_cli, config, "domain", "pause", DOMAIN)
        assert code == 0, err
        await eventually(lambda: "ran pause at" in caplog.text, "the audit line")
        assert f"on 1 domain: {DOMAIN}" in caplog.text
        await asyncio.to_thread(send_mail, smtp_address(first), [f"bob@{DOMAIN}"])
    finally:
        await first.stop()

    second = Relay(config_module.load(str(config)))
    await second.start()
    try:
        scheduler = second.scheduler
        assert scheduler is not None and scheduler.steering.paused(DOMAIN)
        passes = scheduler.ticks
        await eventually(lambda: scheduler.ticks >= passes + 2, "two scheduler passes")
        assert primary.transactions == []
        await asyncio.to_thread(relay_cli, config, "domain", "resume", DOMAIN)
        await eventually(lambda: delivered_to(primary) == [f"bob@{DOMAIN}"], "delivered")
    finally:
        await second.stop()


def test_bad_domain_commands_are_refused_with_a_precise_message(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    code, _, err = relay_cli(config, "domain", "pause", "other.test")
    assert code == 2 and "other.test is not a configured domain" in err
    code, _, err = relay_cli(config, "domain", "reroute", DOMAIN)
    assert code == 2 and "give either --to HOST[:PORT] or --clear" in err
    code, _, err = relay_cli(config, "domain", "reroute", DOMAIN, "--to", "x.test:2", "--clear")
    assert code == 2
    code, _, err = relay_cli(config, "domain", "reroute", DOMAIN, "--to", f"{HOSTNAME}:25")
    assert code == 2 and "is this relay itself" in err
    code, _, err = relay_cli(config, "domain", "reroute", DOMAIN, "--to", "x.test:99999")
    assert code == 2 and "bad port" in err
    code, _, err = relay_cli(
        config, "domain", "reroute", DOMAIN, "--to", "x.test", "--tls", "maybe"
    )
    assert code == 2 and "maybe" in err
