"""A crash at any instant loses no message that got its 250.

The real `relay serve` runs in a subprocess; several client threads send mail over real sockets
as fast as it takes it, recording the queue id of every 250 after DATA. The server is SIGKILLed in
the middle of that stream (no shutdown code runs), restarted on the same queue, and every
acknowledged message must be there with its recipients and exactly the bytes that were sent.
Done several times over the same queue, so later rounds also prove recovery from earlier kills.
"""

from __future__ import annotations

import functools
import re
import smtplib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import (
    DOMAIN,
    RelayProcess,
    open_store,
    run_relay,
    sample,
    scrape,
    send_mail,
    wait_for,
    write_config,
)

ROUNDS = 5
SENDERS = 6
PER_ROUND = 200  # acknowledged messages to reach before each kill


@dataclass
class Ledger:
    """What the clients were told: queue id → (recipients, content) for every 250."""

    acked: dict[str, tuple[list[str], bytes]] = field(default_factory=dict)
    refusals: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, queue_id: str, recipients: list[str], content: bytes) -> None:
        with self.lock:
            assert queue_id not in self.acked, f"queue id {queue_id} given out twice"
            self.acked[queue_id] = (recipients, content)

    def __len__(self) -> int:
        with self.lock:
            return len(self.acked)

    def reached(self, count: int) -> bool:
        return len(self) >= count

    def refused(self, code: int, reply: bytes) -> None:
        """A refusal that is not the crash's doing: the test fails on it afterwards."""
        with self.lock:
            self.refusals.append((time.monotonic(), f"{code} {reply.decode(errors='replace')}"))

    def refused_before(self, instant: float, *, temporary_after: bool = False) -> list[str]:
        """The refusals a test fails on: every one before `instant` (the kill) and, after it,
        every one but a 4xx when `temporary_after`."""
        with self.lock:
            return [
                reply
                for when, reply in self.refusals
                if when < instant or not (temporary_after and reply.startswith("4"))
            ]


def content_for(sender: int, serial: int) -> bytes:
    """A distinct message, CRLF lines and no leading dots, so what is stored is what was sent."""
    padding = b"".join(
        b"line %d of message %d/%d\r\n" % (i, sender, serial) for i in range(serial % 40)
    )
    return (
        b"From: <client%d@client.test>\r\nSubject: crash test %d/%d\r\n\r\n"
        % (sender, sender, serial)
        + padding
        + b"\xc3\xa9nd\r\n"
    )


def keep_sending(
    address: tuple[str, int], sender: int, ledger: Ledger, stop: threading.Event
) -> None:
    """One client: messages back to back on one connection, reconnecting after any failure."""
    serial = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP(*address, local_hostname=f"client{sender}.test", timeout=10) as smtp:
                smtp.ehlo()
                while not stop.is_set():
                    serial += 1
                    recipients = [f"s{sender}n{serial}@{DOMAIN}"] + (
                        [f"cc{sender}n{serial}@{DOMAIN}"] if serial % 3 == 0 else []
                    )
                    content = content_for(sender, serial)
                    code, reply = smtp.mail(f"client{sender}@client.test", ["BODY=8BITMIME"])
                    if code != 250:
                        ledger.refused(code, reply)
                        break
                    refused = [r for r in map(smtp.rcpt, recipients) if r[0] != 250]
                    if refused:
                        ledger.refused(*refused[0])
                        break
                    code, reply = smtp.data(content)
                    if code == 250:
                        queue_id = reply.decode().rpartition("queued as ")[2]
                        ledger.record(queue_id, recipients, content)
        except (OSError, smtplib.SMTPException):
            stop.wait(0.01)  # the server is gone or restarting: try again unless told to stop


def check_queue(queue: Path, ledger: Ledger) -> None:
    with open_store(queue) as store:
        assert store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for queue_id, (recipients, content) in ledger.acked.items():
            row = store.get(queue_id, attempts=False)
            assert row is not None, f"{queue_id} got a 250 and is not in the queue"
            assert [r.address for r in row.recipients] == recipients
            body = store.body(queue_id)
            assert body is not None and body.startswith(b"Received: ")
            assert body.endswith(b"\r\n" + content), queue_id
            assert row.size == len(body)


def worker_pids(server: RelayProcess) -> list[int]:
    """The SMTP workers (smtp.workers > 1) the latest start of `server` logged."""
    return [int(pid) for pid in _WORKER.findall(server._latest_log())]


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def all_gone(pids: list[int]) -> bool:
    return all(gone(pid) for pid in pids)


_WORKER = re.compile(r"SMTP worker \d+ \(pid (\d+)\) serving")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_mid_stream_loses_no_acknowledged_message(
    tmp_path: Path, relay_process: Callable[[Path], RelayProcess], workers: int
) -> None:
    """With smtp.workers = 2 the SIGKILL hits the process that owns the queue while its two
    SMTP workers hold sessions in the middle of DATA: they must answer no 250 for what the
    owner did not commit, and end by themselves."""
    # Six clients on one address, sending as fast as they can: no per-client throttling.
    config = write_config(
        tmp_path,
        metrics={"listen": ""},
        smtp={"rate_per_ip": 0, "max_messages_per_session": 100_000, "workers": workers},
    )
    queue = tmp_path / "queue" / "queue.db"
    ledger = Ledger()
    server = relay_process(config)
    for round_number in range(ROUNDS):
        if round_number:
            server.start()
        assert server.address is not None
        ledger.refusals.clear()  # the last round's were checked: they follow its kill
        stop = threading.Event()
        clients = [
            threading.Thread(target=keep_sending, args=(server.address, n, ledger, stop))
            for n in range(SENDERS)
        ]
        for client in clients:
            client.start()
        target = len(ledger) + PER_ROUND
        children = worker_pids(server)
        assert len(children) == (workers if workers > 1 else 0), server.log()
        try:
            wait_for(functools.partial(ledger.reached, target), f"{target} acknowledged messages")
        finally:
            killed = time.monotonic()
            server.kill()
            stop.set()
            for client in clients:
                client.join(30)
        assert not any(client.is_alive() for client in clients)
        wait_for(functools.partial(all_gone, children), "the workers to end with their owner")
        # A worker whose owner died in the middle of a transaction says 451 (queue unavailable):
        # the crash's doing, and what the client retries.
        refused = ledger.refused_before(killed, temporary_after=workers > 1)
        assert not refused, refused[:5]
        check_queue(queue, ledger)

    # After all that, the queue still serves a clean start and an orderly stop.
    server.start()
    check_queue(queue, ledger)
    assert server.stop() == 0
    assert len(ledger) >= ROUNDS * PER_ROUND


def _metrics_address(server: RelayProcess) -> str:
    """The metrics URL the real server logged (the test config binds port 0)."""
    match = re.search(r"metrics on (http://\S+?)/metrics", server.log())
    assert match, f"no metrics address in the log:\n{server.log()}"
    return match.group(1)


def test_scrape_and_cli_read_keep_the_server_on_its_own_wal(
    tmp_path: Path, relay_process: Callable[[Path], RelayProcess]
) -> None:
    """Issue 12's reproduction: a scrape, then `relay queue`, then SIGKILL loses nothing.

    The scrape opens a second queue connection inside the server. Opening and closing a
    descriptor of the queue file outside SQLite there dropped the server's POSIX locks, so the
    CLI's close believed it was the last connection, checkpointed and unlinked the WAL the
    server kept writing to: what was acknowledged afterwards vanished at restart.
    """
    config = write_config(tmp_path)
    queue = tmp_path / "queue" / "queue.db"
    server = relay_process(config)
    assert server.address is not None
    ids = [send_mail(server.address, [f"first@{DOMAIN}"])]
    samples = scrape(_metrics_address(server) + "/metrics")
    assert sample(samples, "relay_queue_messages", state="queued") == 1
    listing = run_relay("queue", "--config", str(config))
    assert listing.returncode == 0 and ids[0] in listing.stdout.decode(), listing
    ids += [send_mail(server.address, [f"later{n}@{DOMAIN}"]) for n in range(2)]
    wal = Path(str(queue) + "-wal")
    assert wal.exists(), "the server's WAL was unlinked under it"
    server.kill()
    server.start()
    with open_store(queue) as store:
        missing = [queue_id for queue_id in ids if store.get(queue_id, attempts=False) is None]
    assert not missing, f"acknowledged and lost: {missing}"
