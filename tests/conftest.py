"""What every test needs to talk to a real relay: configs, an in-process server, the real command.

Everything runs over real sockets on loopback with ephemeral ports, and every wait is on a
condition with a deadline, never a blind sleep. The helpers are plain functions and classes
that tests import (`from tests.conftest import make_config`); the fixtures own start-up and
clean-up.

- `make_config(tmp_path, **overrides)` / `write_config(...)`: a valid config (queue under
  tmp_path, SMTP and metrics on 127.0.0.1:0, domain example.test whose primary is never reached).
- `relay_factory` / `relay_server`: a `relay.service.Relay` started in-process, stopped after.
- `Conversation`: a raw SMTP client for byte-exact exchanges; `send_mail` wraps smtplib.
- `run_relay(...)` and `relay_process`: the real `relay` command (`python -m relay`, with the
  interpreter and source tree of the code under test) in a subprocess.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

import relay
from relay.config import Config, from_mapping
from relay.service import Relay
from relay.store import Store
from tests.dnsserver import DnsServer

_FIGURES: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collects the figures crash and fault tests record (`record_property("figures", …)`)."""
    if report.when == "call":
        _FIGURES.extend(str(value) for name, value in report.user_properties if name == "figures")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Prints those figures once, after the run, instead of in the middle of `-q` dots."""
    if _FIGURES:
        terminalreporter.section("figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Every async test runs on uvloop, the event loop `relay serve` runs on (relay.service)."""
    return {"uvloop": uvloop.new_event_loop}


PROJECT_ROOT = Path(relay.__file__).resolve().parent.parent
DOMAIN = "example.test"
HOSTNAME = "relay.test"
# Nothing listens on port 1: a delivery attempt is refused at once and the mail stays queued.
NEVER_REACHED_PRIMARY = "127.0.0.1:1"
DEADLINE = 15.0
_QUEUED_AS = re.compile(r"queued as (\S+)")
# CI and the dev container run the suite as root, and `relay serve` refuses root unless told
# (relay.ops.cli.root_refused). Set for the whole session so that every `relay serve` started by a
# test, through relay_env or not, inherits it; a test of the refusal passes RELAY_ALLOW_ROOT="".
os.environ.setdefault("RELAY_ALLOW_ROOT", "1")
# Tests never ask the machine's resolver (it is not on loopback): every relay under test
# resolves through this local authoritative server, which answers NXDOMAIN for any name a test
# has not given it. Bounces to senders' domains therefore fail fast and locally.
LOCAL_DNS = DnsServer().start()
atexit.register(LOCAL_DNS.stop)


# -- configuration ----------------------------------------------------------------------------


def config_mapping(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """The parsed-TOML shape of a valid test config.

    An override that is a dict is merged into that section (`smtp={"max_hops": 3}`); any other
    value replaces the key (`domain=[...]`); None removes it.
    """
    data: dict[str, Any] = {
        "hostname": HOSTNAME,
        "smtp": {"listen": ["127.0.0.1:0"]},
        "queue": {"path": str(tmp_path / "queue" / "queue.db")},
        "metrics": {"listen": "127.0.0.1:0"},
        "dns": {"nameservers": [LOCAL_DNS.address]},
        "domain": [{"name": DOMAIN, "primary": [NEVER_REACHED_PRIMARY]}],
    }
    for key, value in overrides.items():
        if value is None:
            data.pop(key, None)
        elif isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    """A validated Config (through `relay.config.from_mapping`, as a file would be)."""
    return from_mapping(config_mapping(tmp_path, **overrides), source=str(tmp_path / "relay.toml"))


def toml_text(data: Mapping[str, Any]) -> str:
    """Just enough TOML writing for our configs: scalars, string lists, tables, [[arrays]]."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            arrays += [(key, item) for item in value]
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables:
        lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    for key, table in arrays:
        lines += ["", f"[[{key}]]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(tmp_path: Path, name: str = "relay.toml", **overrides: Any) -> Path:
    """A config file for the real command; same defaults and overrides as `make_config`."""
    path = tmp_path / name
    path.write_text(toml_text(config_mapping(tmp_path, **overrides)))
    return path


@contextlib.contextmanager
def open_store(path: str | os.PathLike[str]) -> Iterator[Store]:
    """The queue as the CLI sees it: its own connection, closed afterwards."""
    store = Store(str(path))
    try:
        yield store
    finally:
        store.close()


# -- waiting --------------------------------------------------------------------------------


def wait_for(condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    """Polls `condition` until it returns something true; fails the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


# -- an in-process relay ----------------------------------------------------------------------


def smtp_address(server: Relay) -> tuple[str, int]:
    return server.smtp_addresses[0]


def metrics_url(server: Relay, path: str = "/metrics") -> str:
    assert server.http_server is not None, "metrics are disabled in this config"
    host, port = server.http_server.sockets[0].getsockname()[:2]
    return f"http://{host}:{port}{path}"


@pytest.fixture
async def relay_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Relay]]]:
    """`await relay_factory(**config overrides)` → a started Relay, stopped at teardown.

    One at a time: a Relay registers its queue gauges in the process-wide metrics registry.
    """
    started: list[Relay] = []

    async def start(**overrides: Any) -> Relay:
        server = Relay(make_config(tmp_path, **overrides))
        started.append(server)
        await server.start()
        return server

    yield start
    for server in reversed(started):
        await server.stop(grace=5)


@pytest.fixture
async def relay_server(relay_factory: Callable[..., Awaitable[Relay]]) -> Relay:
    """A relay with the default test config: example.test, queue under tmp_path."""
    return await relay_factory()


# -- SMTP clients -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One (possibly multi-line) SMTP reply, as the server sent it."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The reply with its code, lines joined: "250 2.0.0 Ok: queued as …"."""
        return "\n".join(self.lines)

    @property
    def queue_id(self) -> str:
        match = _QUEUED_AS.search(self.text)
        assert match, f"no queue id in {self.text!r}"
        return match.group(1)


class Conversation:
    """A raw SMTP client on asyncio streams: exactly the bytes given go out, whole replies in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.banner: Reply | None = None

    @classmethod
    async def open(cls, address: tuple[str, int], source: str = "127.0.0.1") -> Conversation:
        reader, writer = await asyncio.open_connection(*address, local_addr=(source, 0))
        conversation = cls(reader, writer)
        conversation.banner = await conversation.reply()
        assert conversation.banner.code == 220, conversation.banner
        return conversation

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> Reply:
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), DEADLINE)
            if not raw:
                raise ConnectionError(f"connection closed after {lines!r}")
            line = raw.decode("utf-8").rstrip("\r\n")
            lines.append(line)
            if line[3:4] != "-":
                return Reply(int(line[:3]), tuple(lines))

    async def replies(self, count: int) -> list[Reply]:
        return [await self.reply() for _ in range(count)]

    async def command(self, line: str | bytes) -> Reply:
        data = line.encode("utf-8") if isinstance(line, str) else line
        await self.send(data + b"\r\n")
        return await self.reply()

    async def ehlo(self, name: str = "client.test") -> Reply:
        reply = await self.command(f"EHLO {name}")
        assert reply.code == 250, reply
        return reply

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def conversation(
    address: tuple[str, int], source: str = "127.0.0.1"
) -> AsyncIterator[Conversation]:
    talk = await Conversation.open(address, source)
    try:
        yield talk
    finally:
        await talk.close()


def dot_stuff(content: bytes) -> bytes:
    """RFC 5321 4.5.2: what a client sends for `content` (ending in CRLF), terminator included."""
    assert content.endswith(b"\r\n") or not content
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def send_mail(
    address: tuple[str, int],
    recipients: Sequence[str],
    body: bytes = b"Subject: test\r\n\r\nhello\r\n",
    *,
    sender: str = "sender@client.test",
    source: str = "127.0.0.1",
    helo: str = "client.test",
    mail_options: Sequence[str] = (),
    rcpt_options: Sequence[str] = (),
) -> str:
    """Sends one message with smtplib (blocking: call via asyncio.to_thread); the queue id."""
    with smtplib.SMTP(*address, local_hostname=helo, source_address=(source, 0)) as client:
        client.ehlo()
        code, text = client.mail(sender, list(mail_options))
        assert code == 250, (code, text)
        for recipient in recipients:
            code, text = client.rcpt(recipient, list(rcpt_options))
            assert code == 250, (recipient, code, text)
        code, text = client.data(body)
        assert code == 250, (code, text)
        return Reply(code, (f"{code} {text.decode()}",)).queue_id


# -- what intake stores -----------------------------------------------------------------------

# Our trace on top of every stored message: the Received header, then (sender checks on, the
# default) our Authentication-Results; each a first line and its tab-indented continuations.
# Exact, not "every tab-indented line": a message may itself start with a continuation line.
_RECEIVED = rb"Received: [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*?\t[^\r\n]*; [^\r\n]*[+-]\d{4}\r\n"
_OUR_RESULTS = rb"Authentication-Results: [^\r\n]*;\r\n(?:\t[^\r\n]*;\r\n)*\tarc=[a-z]+\r\n"
_TRACE = re.compile(rb"\A(" + _RECEIVED + rb")(" + _OUR_RESULTS + rb")?")


def split_trace(body: bytes) -> tuple[bytes, bytes, bytes]:
    """(our Received header, our Authentication-Results or b"", the message as it came)."""
    match = _TRACE.match(body)
    assert match, body[:300]
    return match.group(1), match.group(2) or b"", body[match.end() :]


# -- metrics ----------------------------------------------------------------------------------


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus endpoint: {(name, labels): value}."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=DEADLINE) as response:
        text = response.read().decode("utf-8")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(
    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """One sample's value; 0 when absent (a labelled counter appears at its first increment)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


# -- the real command ------------------------------------------------------------------------


def relay_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "relay", *args]


def relay_env(**extra: str) -> dict[str, str]:
    """The environment for the real command: the source tree under test first on the path."""
    env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_relay(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Runs `relay ARGS…` to completion; stdout and stderr as bytes."""
    return subprocess.run(
        relay_command(*args),
        env=relay_env(**(env or {})),
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def relay_cli(config: Path, *args: str) -> tuple[int, str, str]:
    """`relay ARGS… --config CONFIG` as an operator types it: (exit code, stdout, stderr)."""
    done = run_relay(*args, "--config", str(config), timeout=30)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


_LISTENING = re.compile(r"listening for SMTP on (\S+):(\d+)")


class RelayProcess:
    """`relay serve --config PATH` in a subprocess, its log in a file next to the config."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.address: tuple[str, int] | None = None
        self._offset = 0  # where the latest start's lines begin in the log file

    def start(self) -> tuple[str, int]:
        """Starts the server and returns its SMTP address once it accepts connections."""
        offset = self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                relay_command("serve", "--config", str(self.config_path)),
                env=relay_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

        def listening() -> tuple[str, int] | None:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"relay serve exited with {self.process.returncode}:\n{self.log()}")
            with self.log_path.open("rb") as log:
                log.seek(offset)
                match = _LISTENING.search(log.read().decode("utf-8", "replace"))
            return (match.group(1), int(match.group(2))) if match else None

        address = wait_for(listening, "relay serve to listen")
        wait_for(lambda: _accepts(address), f"{address} to accept connections")
        # Its last start line: every listener (metrics too) is open and logged by then.
        wait_for(lambda: "relay started: " in self._latest_log(), "relay serve to finish starting")
        self.address = address
        return address

    def _latest_log(self) -> str:
        with self.log_path.open("rb") as log:
            log.seek(self._offset)
            return log.read().decode("utf-8", "replace")

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def metrics_base(self) -> str | None:
        """`http://host:port` of the metrics listener the latest start logged, if any."""
        found = re.findall(r"metrics on (http://\S+?)/metrics", self._latest_log())
        return found[-1] if found else None

    def kill(self) -> None:
        """SIGKILL: the crash no shutdown code gets to see."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(DEADLINE)

    def stop(self) -> int:
        """SIGTERM and wait: the orderly shutdown; returns the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(DEADLINE)


def _accepts(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def relay_process(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """`relay_process(config_path)` → a started `relay serve`; killed at teardown if still up."""
    started: list[RelayProcess] = []

    def start(config_path: Path) -> RelayProcess:
        server = RelayProcess(config_path, tmp_path / f"relay-{len(started)}.log")
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.kill()
