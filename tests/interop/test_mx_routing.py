"""MX routing through a real DNS server: dnsmasq on a high port, the relay's `dns.nameservers`
pointing at it, no configured primary for example.test.

    example.test.  MX 10 mx1.example.test.   127.0.0.10  the primary (smtp-sink)
                   MX 20 mx2.example.test.   127.0.0.20  the relay itself
                   MX 30 mx3.example.test.   127.0.0.30  a host that must never be used

Every host listens on the same port (`delivery.mx_port`). The relay finds itself at preference 20
by address and port, so it must drop that level and the one below (RFC 5321 5.1): while the
primary is down the mail waits, never going to mx3 and never looping back to the relay; when
the primary returns, the mail goes there, and so does new mail.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import RelayProcess, open_store, wait_for

from tests.interop.mtas import Dnsmasq, SmtpSink, free_port, running
from tests.interop.support import RELAY_ADDRESS, relay_config, stored_bodies, submit
from tests.interop.support import wait_queue_empty as wait_empty

pytestmark = pytest.mark.interop

PRIMARY = "127.0.0.10"
NEVER = "127.0.0.30"
CONTENT = b"Subject: routed by MX\r\nMessage-ID: <{n}@client.test>\r\n\r\nvia dnsmasq\r\n"


class Listener:
    """A TCP port that counts whoever connects to it, and answers nothing."""

    def __init__(self, address: str, port: int) -> None:
        self.sock = socket.create_server((address, port))
        self.sock.settimeout(0.2)
        self.connections: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            self.connections.append(peer)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def never_used() -> Iterator[Callable[[int], Listener]]:
    listeners: list[Listener] = []

    def start(port: int) -> Listener:
        listeners.append(Listener(NEVER, port))
        return listeners[-1]

    yield start
    for listener in listeners:
        listener.close()


def message(n: int) -> bytes:
    return CONTENT.replace(b"{n}", str(n).encode())


def test_mail_goes_to_the_preferred_mx_never_to_ourselves_or_a_less_preferred_one(
    workdir: Path,
    tmp_path: Path,
    relay_process: Callable[[Path], RelayProcess],
    never_used: Callable[[int], Listener],
) -> None:
    port = free_port(PRIMARY, RELAY_ADDRESS, NEVER)
    dns_port = free_port("127.0.0.1")
    dns = Dnsmasq(
        workdir / "dns",
        dns_port,
        mx=[
            ("example.test", "mx1.example.test", 10),
            ("example.test", "mx2.example.test", 20),
            ("example.test", "mx3.example.test", 30),
        ],
        hosts={"mx1.example.test": PRIMARY, "mx2.example.test": RELAY_ADDRESS},
        local="example.test",
    )
    dns.hosts["mx3.example.test"] = NEVER
    primary = SmtpSink(workdir / "primary", PRIMARY, port)
    third = never_used(port)
    config = relay_config(
        tmp_path,
        port,
        {"example.test": ""},
        dns={"nameservers": [f"127.0.0.1:{dns_port}"]},
        delivery={"probe_interval": "1s", "mx_port": port},
    )
    queue = tmp_path / "queue" / "queue.db"

    with running(dns):
        relay = relay_process(config)
        assert relay.address == (RELAY_ADDRESS, port)
        first = submit(relay.address, "alice@sender.test", ["bob@example.test"], message(1))

        def refused_by_the_primary() -> bool:
            with open_store(queue) as store:
                row = store.get(first)
            assert row is not None
            reply = row.recipients[0].last_reply or ""
            return f"refused by mx1.example.test[{PRIMARY}]:{port}" in reply

        wait_for(refused_by_the_primary, "a delivery attempt to mx1")

        # Several probes, each with a fresh MX lookup, while the primary stays down.
        def mx_queries() -> int:
            return sum("query[MX] example.test" in q for q in dns.queries())

        seen = mx_queries()
        wait_for(lambda: mx_queries() >= seen + 3, "three more MX lookups by the probe")
        with open_store(queue) as store:
            assert [m.id for m in store.list_messages()] == [first]  # no loop back to us
        assert third.connections == []
        body = stored_bodies(queue, [first])[first]

        with running(primary):
            wait_empty(queue, "delivery to mx1 once it answers")
            submit(relay.address, "alice@sender.test", ["carol@example.test"], message(2))
            wait_empty(queue, "new mail to go straight to mx1")
            wait_for(lambda: len(primary.captures()) >= 2, "mx1 to dump both messages")
            captures = primary.captures()

    assert len(captures) == 2
    by_rcpt = {c.rcpt_args[0].split()[0]: c for c in captures}
    assert set(by_rcpt) == {"<bob@example.test>", "<carol@example.test>"}
    queued = by_rcpt["<bob@example.test>"]
    assert queued.delivered == queued.expected(body)
    assert by_rcpt["<carol@example.test>"].delivered.endswith(
        by_rcpt["<carol@example.test>"].expected(message(2))
    )
    assert third.connections == [], f"mx3 (preference 30) was contacted: {third.connections}"
    assert any("query[A] mx1.example.test" in q for q in dns.queries())
    assert not any("mx3.example.test" in q for q in dns.queries()), "mx3 was even looked up"
