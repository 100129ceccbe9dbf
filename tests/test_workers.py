"""smtp.workers > 1: acceptor processes take the mail, the relay process owns the queue.

Real processes throughout: the relay under test starts `python -m relay.workers` children on
its listening sockets, clients talk to them over real sockets, and what the owner commits and
delivers is checked in the queue, at a fake primary and on /metrics. A worker is SIGKILLed in
the middle of a stream of mail: nothing acknowledged may be lost, and a new one takes its place.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from relay import config as config_module
from relay.service import Relay
from relay.smtp.limits import share
from tests.conftest import (
    DOMAIN,
    Conversation,
    Reply,
    conversation,
    metrics_url,
    sample,
    scrape,
    send_mail,
    smtp_address,
    write_config,
)
from tests.fakeprimary import FakePrimary, fake_primary, unused_port
from tests.test_crash import Ledger, check_queue, keep_sending
from tests.test_recovery import PRIMARY_ADDRESS, primary_domain, seen_down, wait_until

__all__ = ["fake_primary"]

StartRelay = Callable[..., Awaitable[Relay]]
StartPrimary = Callable[..., Awaitable[FakePrimary]]
WORKERS = {"workers": 2, "rate_per_ip": 0}


def alive(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has: it only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def accepted(server: Relay) -> float:
    samples = await asyncio.to_thread(scrape, metrics_url(server))
    return sample(samples, "relay_messages_accepted_total", domain=DOMAIN)


async def test_workers_take_the_mail_and_the_owner_delivers_it(
    relay_factory: StartRelay, fake_primary: StartPrimary
) -> None:
    primary = await fake_primary(address=PRIMARY_ADDRESS)
    server = await relay_factory(smtp=WORKERS, domain=primary_domain(primary.port))
    # This process's counters carry what earlier tests counted in it: compare differences.
    before = await asyncio.to_thread(scrape, metrics_url(server))
    assert server.acceptors is not None
    pids = server.acceptors.pids
    assert len(pids) == 2 and all(map(alive, pids)) and os.getpid() not in pids
    assert not server.smtp_servers  # the owner serves no session itself
    bodies = [b"Subject: %d\r\n\r\nmessage %d\r\n" % (n, n) for n in range(12)]
    for body in bodies:
        await asyncio.to_thread(send_mail, smtp_address(server), [f"bob@{DOMAIN}"], body)
    await wait_until(lambda: len(primary.delivered) == 12, "every message at the primary")
    texts = sorted((t.data or b"").rpartition(b"\r\n\r\n")[2] for t in primary.delivered)
    assert texts == sorted(b"message %d\r\n" % n for n in range(12))
    after = await asyncio.to_thread(scrape, metrics_url(server))

    def counted(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert counted("relay_messages_accepted_total", domain=DOMAIN) == 12
    assert counted("relay_smtp_connections_total") == 12
    assert counted("relay_deliveries_total", domain=DOMAIN, result="delivered") == 12
    health = await asyncio.to_thread(scrape_text, metrics_url(server, "/healthz"))
    assert health == "ok\n"


def scrape_text(url: str) -> str:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return str(response.read().decode())


async def test_recipient_checks_and_their_count_are_the_owners(relay_factory: StartRelay) -> None:
    """The recipient list lives in the owner; the session's unknown-recipient count survives
    the round trip, so the limit closes the session as it does without workers."""
    domain = [{"name": DOMAIN, "primary": ["127.0.0.1:1"], "recipients": ["alice"]}]
    server = await relay_factory(smtp={**WORKERS, "max_unknown_recipients": 2}, domain=domain)
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        assert (await talk.command("MAIL FROM:<sender@client.test>")).code == 250
        assert (await talk.command(f"RCPT TO:<alice@{DOMAIN}>")).code == 250
        first = await talk.command(f"RCPT TO:<nobody@{DOMAIN}>")
        second = await talk.command(f"RCPT TO:<nobody2@{DOMAIN}>")
        third = await talk.command(f"RCPT TO:<nobody3@{DOMAIN}>")
        outside = None
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        await talk.command("MAIL FROM:<sender@client.test>")
        outside = await talk.command("RCPT TO:<bob@elsewhere.test>")
    assert (first.code, second.code) == (550, 550), (first, second)
    assert third.code == 421 and "too many unknown recipients" in third.text
    assert outside.code == 550 and "Relay access denied" in outside.text


async def test_etrn_through_a_worker_flushes_the_owners_queue(
    relay_factory: StartRelay, fake_primary: StartPrimary
) -> None:
    port = unused_port(PRIMARY_ADDRESS)
    server = await relay_factory(
        domain=primary_domain(port),
        retry={"min": "1h", "max": "4h"},
        delivery={"probe_interval": "1h"},  # only ETRN can bring this mail back now
        smtp={**WORKERS, "etrn_clients": ["127.0.0.0/8"]},
    )
    await asyncio.to_thread(send_mail, smtp_address(server), [f"bob@{DOMAIN}"])
    await wait_until(lambda: seen_down(server), "the relay to find the primary down")
    primary = await fake_primary(address=PRIMARY_ADDRESS, port=port)
    async with conversation(smtp_address(server)) as talk:
        assert "ETRN" in (await talk.ehlo()).text
        reply = await talk.command(f"ETRN {DOMAIN}")
    assert reply.code == 250, reply
    await wait_until(lambda: len(primary.delivered) == 1, "delivery after ETRN")


async def test_a_reload_reaches_every_worker(tmp_path: Path, relay_factory: StartRelay) -> None:
    server = await relay_factory(smtp=WORKERS)
    path = write_config(tmp_path, "reloaded.toml", smtp={**WORKERS, "max_recipients": 1})
    server.reload(str(path))

    async def limited() -> bool:
        # Several connections: the kernel may hand each to either worker.
        for _ in range(4):
            async with conversation(smtp_address(server)) as talk:
                await talk.ehlo()
                await talk.command("MAIL FROM:<sender@client.test>")
                await talk.command(f"RCPT TO:<a@{DOMAIN}>")
                if (await talk.command(f"RCPT TO:<b@{DOMAIN}>")).code != 452:
                    return False
        return True

    await wait_until(limited, "every worker to refuse a second recipient")


async def test_a_killed_worker_loses_no_acknowledged_mail_and_is_replaced(
    tmp_path: Path, relay_factory: StartRelay
) -> None:
    server = await relay_factory(smtp={**WORKERS, "max_messages_per_session": 100_000})
    assert server.acceptors is not None
    ledger = Ledger()
    stop = threading.Event()
    address = smtp_address(server)
    clients = [
        threading.Thread(target=keep_sending, args=(address, n, ledger, stop)) for n in range(4)
    ]
    for client in clients:
        client.start()
    try:
        await wait_until(functools.partial(ledger.reached, 100), "100 acknowledged messages")
        before = await accepted(server)
        victim = server.acceptors.pids[0]
        os.kill(victim, signal.SIGKILL)
        await wait_until(
            lambda: victim not in server.acceptors.pids and server.acceptors.serving(),  # type: ignore[union-attr]
            "a new worker in place of the killed one",
        )
        target = len(ledger) + 100
        await wait_until(functools.partial(ledger.reached, target), "100 more after the kill")
        after = await accepted(server)
    finally:
        stop.set()
        for client in clients:
            await asyncio.to_thread(client.join, 30)
    assert not ledger.refusals, ledger.refusals[:5]  # a dropped session is no refusal
    assert after >= before + 100, (before, after)  # the dead worker's count is kept
    check_queue(Path(server.config.queue.path), ledger)


def test_workers_setting() -> None:
    base = {"hostname": "relay.test", "domain": [{"name": DOMAIN, "primary": ["127.0.0.1:1"]}]}
    base["smtp"] = {"listen": ["127.0.0.1:2525"]}

    def load(value: object) -> config_module.Config:
        data = {**base, "smtp": {**base["smtp"], "workers": value}}  # type: ignore[dict-item]
        return config_module.from_mapping(data, "relay.toml")

    assert load(3).smtp.workers == 3
    assert load("auto").smtp.workers == len(os.sched_getaffinity(0))
    for bad, says in [(0, "from 1 to 64"), (65, "from 1 to 64"), ("two", "whole number")]:
        with pytest.raises(config_module.ConfigError) as error:
            load(bad)
        assert "smtp.workers" in str(error.value.problems) and says in str(error.value.problems)


def test_each_worker_keeps_only_its_part_of_the_data_buffer() -> None:
    smtp = config_module.SmtpConfig(
        workers=3,
        max_connections=100,
        max_connections_per_ip=10,
        rate_per_ip=20,
        max_inflight_bytes=300 * 1024**2,
        max_message_size=50 * 1024**2,
    )
    part = share(smtp)
    assert part.max_inflight_bytes == 100 * 1024**2
    # The client limits are the relay process's to count, with the values configured.
    assert (part.max_connections, part.max_connections_per_ip, part.rate_per_ip) == (100, 10, 20)
    small = share(replace(smtp, max_inflight_bytes=90 * 1024**2))
    assert small.max_inflight_bytes == 50 * 1024**2  # never below one largest message
    assert share(replace(smtp, workers=1)) == replace(smtp, workers=1)


async def greeting(address: tuple[str, int]) -> tuple[Reply, Conversation]:
    """A new connection's first reply, and the connection (the caller closes it)."""
    reader, writer = await asyncio.open_connection(*address)
    talk = Conversation(reader, writer)
    return await talk.reply(), talk


async def test_connections_per_client_are_counted_for_all_workers_together(
    relay_factory: StartRelay,
) -> None:
    """Three connections a client: the fourth is refused whichever worker the kernel gave it
    to, and a connection given back is free again."""
    server = await relay_factory(smtp={**WORKERS, "max_connections_per_ip": 3})
    address = smtp_address(server)
    talks = []
    try:
        for _ in range(3):
            banner, talk = await greeting(address)
            talks.append(talk)
            assert banner.code == 220, banner
        refused, talk = await greeting(address)
        talks.append(talk)
        assert refused.code == 421 and "too many connections" in refused.text, refused
        await talks[0].close()

        async def admitted() -> bool:
            banner, talk = await greeting(address)
            talks.append(talk)
            return banner.code == 220

        await wait_until(admitted, "the slot given back to the client")
    finally:
        for talk in talks:
            await talk.close()
    samples = await asyncio.to_thread(scrape, metrics_url(server))
    assert sample(samples, "relay_messages_rejected_total", reason="max_connections_per_ip") >= 1


async def test_messages_a_minute_are_counted_for_all_workers_together(
    relay_factory: StartRelay,
) -> None:
    server = await relay_factory(smtp={**WORKERS, "rate_per_ip": 3})
    replies = []
    for _ in range(4):
        async with conversation(smtp_address(server)) as talk:
            await talk.ehlo()
            replies.append(await talk.command("MAIL FROM:<sender@client.test>"))
    assert [r.code for r in replies] == [250, 250, 250, 421], replies
