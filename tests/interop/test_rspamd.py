"""The real rspamd (Debian's package) as the relay's content filter: GTUBE refused, clean mail kept.

rspamd runs as a private instance: Debian's stock rules (/etc/rspamd) under a top-level config
of our own that starts only its normal worker, on a loopback high port, with a `local.d` in the
test's directory. No Redis is needed. Modules that would reach the network (fuzzy hashes, DNS
lists, SPF/DKIM/DMARC lookups, map downloads, update checks) are switched off, and rspamd's
resolver is the suite's local DNS server (tests/dnsserver.py, NXDOMAIN for every name), so no
lookup and no connection can leave the machine (its DKIM and ARC modules stay on: the relay's
ARC seal is verified against a key published on that server). Its `milter_headers` module is
told to add `X-Spamd-Result` to every message, so the clean message shows that rspamd's own
headers reach the queue. The relay is the real `relay serve`.
"""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LOCAL_DNS, RelayProcess, wait_for

from relay.smtp import arc as arc_keys
from tests.interop.mtas import Server, free_port, wait_until, workspace
from tests.interop.support import (
    DEADLINE,
    RELAY_ADDRESS,
    queue_empty,
    relay_config,
    stored_bodies,
    submit,
)

pytestmark = pytest.mark.interop

RSPAMD_ADDRESS = "127.0.0.1"
# rspamd compiles its Hyperscan databases and the public suffix list at start: tens of seconds.
RSPAMD_START = 120.0
# Modules that would ask the network (DNS lists, fuzzy storage, maps by HTTPS, rspamd.com's
# update feed) or need Redis; the rest of the stock rules (regexp, chartable, mime, headers) run.
NETWORK_MODULES = (
    "fuzzy_check",
    "rbl",
    "whitelist",
    "phishing",
    "multimap",
    "mime_types",
    "rspamd_update",
    "mid",
    "spf",
    "dmarc",
    "asn",
    "hfilter",
    "emails",
    "dkim_signing",
    "greylist",
    "ratelimit",
    "neural",
    "reputation",
    "url_redirector",
    "replies",
    "history_redis",
)
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
CLEAN = (
    b"From: Alice <alice@client.test>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Subject: minutes of Tuesday's meeting\r\n"
    b"Message-ID: <minutes-1@client.test>\r\n"
    b"Date: Sat, 05 Dec 2026 12:00:00 +0000\r\n"
    b"\r\n"
    b"Hello Bob,\r\n\r\nthe minutes are below. See you next week.\r\n"
)
SPAM = CLEAN.replace(b"the minutes are below.", GTUBE)


class Rspamd(Server):
    """rspamd's main process (-f: in the foreground) and one normal worker on `port`."""

    name = "rspamd"

    def prepare(self) -> None:
        local = workspace(self.workdir / "local.d")
        for directory in ("db", "run", "log"):
            workspace(self.workdir / directory)
        (self.workdir / "rspamd.conf").write_text(
            '.include "$CONFDIR/common.conf"\n'
            "options {\n"
            '    pidfile = "$RUNDIR/rspamd.pid";\n'
            '    .include "$CONFDIR/options.inc"\n'
            "    .include(try=true; priority=1,duplicate=merge)"
            ' "$LOCAL_CONFDIR/local.d/options.inc"\n'
            "}\n"
            'logging { type = "file"; filename = "$LOGDIR/rspamd.log"; level = "info"; }\n'
            'worker "normal" {\n'
            f'    bind_socket = "{self.hostport}";\n'
            '    .include "$CONFDIR/worker-normal.inc"\n'
            "    count = 1;\n"
            "}\n"
        )
        (local / "options.inc").write_text(
            # GTUBE is a test pattern: off in production rspamd, on here.
            "enable_test_patterns = true;\n"
            # The relay's clients are on loopback: they must be scanned like strangers.
            "local_addrs = [];\n"
            f'dns {{ nameserver = ["{LOCAL_DNS.address}"]; timeout = 0.5s; retransmits = 1; }}\n'
        )
        for module in NETWORK_MODULES:
            (local / f"{module}.conf").write_text("enabled = false;\n")
        (local / "milter_headers.conf").write_text(
            'use = ["x-spamd-result"];\nskip_local = false;\nskip_authenticated = false;\n'
        )

    def command(self) -> list[str]:
        variables = {
            "LOCAL_CONFDIR": self.workdir,
            "DBDIR": self.workdir / "db",
            "RUNDIR": self.workdir / "run",
            "LOGDIR": self.workdir / "log",
        }
        return [
            "rspamd",
            "--no-fork",
            "--insecure",  # root in the test container: rspamd otherwise refuses
            "-u",
            "root",
            "-g",
            "root",
            "-c",
            str(self.workdir / "rspamd.conf"),
            *(f"--var={name}={value}" for name, value in variables.items()),
        ]

    @property
    def url(self) -> str:
        return f"http://{self.hostport}"

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"rspamd exited at start:\n{self.log()}\n{self.task_log()}")
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            try:
                with opener.open(f"{self.url}/ping", timeout=1) as answer:
                    return bool(answer.read().strip() == b"pong")
            except OSError:
                return False

        wait_until(ready, f"rspamd on {self.hostport}", RSPAMD_START)

    def task_log(self) -> str:
        path = self.workdir / "log" / "rspamd.log"
        return path.read_text("utf-8", "replace") if path.exists() else ""


@pytest.fixture(scope="module")
def rspamd() -> Iterator[Rspamd]:
    """One rspamd for the module: its start-up compiles for tens of seconds."""
    directory = Path(tempfile.mkdtemp(prefix="relay-interop-rspamd-"))
    directory.chmod(0o755)
    server = Rspamd(directory / "rspamd", RSPAMD_ADDRESS, free_port(RSPAMD_ADDRESS))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def relay(
    rspamd: Rspamd, tmp_path: Path, relay_process: Callable[[Path], RelayProcess]
) -> RelayProcess:
    port = free_port(RELAY_ADDRESS)
    config = relay_config(
        tmp_path, port, {"example.test": "127.0.0.1:1"}, spam={"rspamd": rspamd.url}
    )
    return relay_process(config)


def task_line(rspamd: Rspamd, queue_id: str) -> str:
    """rspamd's log line for the task the relay sent with this Queue-Id: rspamd's verdict."""

    def lines() -> list[str]:
        return [
            line
            for line in rspamd.task_log().splitlines()
            if "rspamd_task_write_log" in line and f"qid: <{queue_id}>" in line
        ]

    found: list[str] = wait_for(lines, f"rspamd's log line for {queue_id}")
    assert len(found) == 1, found
    return found[0]


def test_gtube_is_refused_550_and_nothing_is_queued(rspamd: Rspamd, relay: RelayProcess) -> None:
    assert relay.address is not None
    with smtplib.SMTP(*relay.address, local_hostname="client.test", timeout=DEADLINE) as client:
        client.ehlo()
        assert client.mail("alice@client.test")[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250
        code, text = client.data(SPAM)
    assert (code, text) == (550, b"5.7.1 Spam message rejected")
    assert queue_empty(relay.config_path.parent / "queue" / "queue.db")
    # The relay's log and rspamd's join on the queue id the relay sent as Queue-Id.
    # The relay writes its log from a thread of its own: wait for the line.
    pattern = re.compile(r"(\S+): reject DATA from \[([\d.]+)\]: rspamd action=reject")
    found = wait_for(lambda: pattern.search(relay.log()), "the relay's reject line")
    line = task_line(rspamd, found.group(1))
    assert "(reject): [15.00/15.00] [GTUBE(" in line, line
    assert f"ip: {found.group(2)}, from: <alice@client.test>," in line, line
    assert "rcpts: <bob@example.test>" in line, line


def test_a_clean_message_is_queued_with_rspamds_headers(
    rspamd: Rspamd, relay: RelayProcess
) -> None:
    assert relay.address is not None
    queue = relay.config_path.parent / "queue" / "queue.db"
    queue_id = submit(relay.address, "alice@client.test", ["bob@example.test"], CLEAN)
    body = stored_bodies(queue, [queue_id])[queue_id]
    received, _, rest = body.partition(b"\r\nX-Spam-Score: ")
    assert received.startswith(b"Received: from client.test"), body[:300]
    score, _, rest = rest.partition(b"\r\n")
    assert re.fullmatch(rb"-?\d+\.\d\d / 15\.00", score), score
    assert rest.startswith(b"X-Spamd-Result: default: False ["), rest[:300]
    assert b"X-Spam: Yes" not in body
    assert rest.endswith(CLEAN)  # the message itself is untouched
    line = task_line(rspamd, queue_id)
    assert "(no action): [" in line and "from: <alice@client.test>," in line, line
    assert "rcpts: <bob@example.test>" in line, line


def checked_by_rspamd(rspamd: Rspamd, message: bytes) -> dict[str, Any]:
    """rspamd's verdict (`POST /checkv2`) on a message as the primary would receive it."""
    request = urllib.request.Request(
        f"{rspamd.url}/checkv2",
        data=message,
        headers={"IP": "127.0.0.1", "From": "alice@client.test", "Rcpt": "bob@example.test"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=DEADLINE) as answer:
        verdict: dict[str, Any] = json.loads(answer.read())
    return verdict


def test_rspamds_arc_check_accepts_the_relays_seal(
    rspamd: Rspamd, tmp_path: Path, relay_process: Callable[[Path], RelayProcess]
) -> None:
    """Issue 15: the seal verified by a real ARC verifier, rspamd's, with our key in the DNS."""
    key = str(tmp_path / "arc.key")
    pem = arc_keys.generate_key(key)
    strings = arc_keys.txt_strings(arc_keys.public_record(pem))
    LOCAL_DNS.set("interop._domainkey.relay.example.", [("TXT", strings)])
    port = free_port(RELAY_ADDRESS)
    arc = {"key": key, "selector": "interop", "domain": "relay.example"}
    config = relay_config(tmp_path, port, {"example.test": "127.0.0.1:1"}, arc=arc)
    relay = relay_process(config)
    assert relay.address is not None
    queue_id = submit(relay.address, "alice@client.test", ["bob@example.test"], CLEAN)
    sealed = stored_bodies(config.parent / "queue" / "queue.db", [queue_id])[queue_id]
    assert b"ARC-Seal: i=1; cv=none;" in sealed
    symbols = checked_by_rspamd(rspamd, sealed)["symbols"]
    assert "ARC_ALLOW" in symbols, sorted(symbols)
    # And a seal whose message was changed on the way is caught by the same check.
    tampered = sealed.replace(b"the minutes are below", b"the minutes are NOT below")
    symbols = checked_by_rspamd(rspamd, tampered)["symbols"]
    assert "ARC_REJECT" in symbols, sorted(symbols)
