"""The processes a benchmark runs: the relay, a private Postfix, smtp-sink and smtp-source.

Every process started here is registered with a `Reaper` and ended by its own id when the run
ends, fails or is interrupted: benchmarks must never leave a listener or a Postfix master behind.
Postfix runs as a private instance (its own config, queue and data directories under the run's
work directory, listening on a high loopback port); the system instance is never touched.
All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The private Postfix harness is the interop suite's (tests/postfix.py); bench/ runs as a
# script, so the repository root goes on the import path first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.postfix import SERVICES, PostfixControl, base_settings, smtpd_service

LOOPBACK = "127.0.0.1"
# "host:port" of the run's name server (tests/dnsserver.py, no records): the sender checks
# and the DNS lists of every relay in the run ask it. A closed port instead would make each
# message wait out spam.auth_timeout.
NAMESERVER = ""
SBIN = Path("/usr/sbin")
ALLOW_ROOT = "RELAY_ALLOW_ROOT"
SINK_USER = "nobody"  # smtp-sink refuses to run as root without dropping privileges
POSTFIX_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
# Postfix's durability is not configurable (cleanup fsyncs every queue file before 250); the
# relay's is `PRAGMA synchronous=FULL` in WAL mode (relay/store/). Both are left as shipped.


class BenchError(Exception):
    """A benchmark could not run or produced an inconsistent result; the message says why."""


def tool(name: str) -> str:
    """The path of a Postfix tool, from /usr/sbin or PATH."""
    candidate = SBIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name} not found: install the postfix package")
    return found


def free_port() -> int:
    """An ephemeral loopback port nobody listens on right now (never 25: it is ephemeral)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, check: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
    """Polls `check` until true; returns the seconds it took, raises BenchError on timeout."""
    started = time.monotonic()
    deadline = started + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)
    return time.monotonic() - started


def smtp_ready(port: int) -> bool:
    """True once something on the port sends a 220 greeting (a bound socket is not enough)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=2) as sock:
            sock.settimeout(2)
            greeting = sock.recv(512)
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
            return greeting.startswith(b"220")
    except OSError:
        return False


# -- process bookkeeping ----------------------------------------------------------------------


@dataclass
class Reaper:
    """Ends everything the run started, newest first, each by its own process id."""

    stoppers: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    def add(self, name: str, stop: Callable[[], None]) -> None:
        self.stoppers.append((name, stop))

    def discard(self, name: str) -> None:
        self.stoppers = [(n, s) for n, s in self.stoppers if n != name]

    def note(self, argv: Sequence[str]) -> None:
        """Keeps the command line for docs/performance.md."""
        line = shlex.join(argv)
        if line not in self.commands:
            self.commands.append(line)

    def reap(self) -> None:
        while self.stoppers:
            name, stop = self.stoppers.pop()
            try:
                stop()
            except Exception as exc:  # cleanup must go on with the next process
                print(f"bench: cleanup of {name} failed: {exc}", file=sys.stderr)


def end_process(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `grace`; the process group is the child's own (new session)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of one process in KiB: its resident memory now and at its peak."""
    values = {"VmRSS": 0, "VmHWM": 0}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages divided among their users, so a sum over processes
    (Postfix is a dozen of them, sharing libraries) does not count them twice."""
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def descendants(root: int) -> list[int]:
    """The process and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) used so far by `root` and everything below it: each live
    process's own time, plus what the ones that already exited left in their parents'
    cumulative fields (Postfix's smtpd and cleanup come and go; their time is not lost)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile: its time is in its parent's cumulative fields now
        # utime, stime, cutime, cstime: fields 14-17 of stat(5), 12-15 after the name.
        total += sum(int(value) for value in fields[11:15])
    return total / ticks


def cpu_busy_fraction(window: float = 0.5) -> float:
    """Machine-wide CPU use over `window` seconds, from /proc/stat."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    total1, idle1 = sample()
    time.sleep(window)
    total2, idle2 = sample()
    total = max(1, total2 - total1)
    return 1.0 - (idle2 - idle1) / total


def settle(timeout: float = 10.0, threshold: float = 0.15) -> None:
    """Waits until the machine is quiet, so work left over from one trial (deferring what was
    just accepted) is not billed to the next one. Gives up silently after `timeout`."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline and quiet < 2:
        quiet = quiet + 1 if cpu_busy_fraction() < threshold else 0


# -- smtp-source and smtp-sink ----------------------------------------------------------------


@dataclass(frozen=True)
class SendResult:
    messages: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


def smtp_source(
    reaper: Reaper,
    port: int,
    *,
    messages: int,
    size: int,
    sessions: int = 20,
    timeout: float = 600.0,
    sender: str = "sender@bench.test",
) -> SendResult:
    """Sends `messages` of `size` payload bytes over `sessions` parallel sessions, one message
    per session as a backup MX sees it. smtp-source exits non-zero on any reply other than the
    expected one, so a 4xx or 5xx fails the benchmark instead of inflating its rate."""
    argv = [
        tool("smtp-source"),
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        sender,
        "-t",
        "bob@example.test",
        f"{LOOPBACK}:{port}",
    ]
    reaper.note(argv)
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"smtp-source to port {port} took over {timeout:g}s") from exc
    seconds = time.monotonic() - started
    if done.returncode != 0:
        error = (done.stderr or done.stdout).decode(errors="replace").strip()
        raise BenchError(f"smtp-source to port {port} failed: {error}")
    return SendResult(messages, seconds)


_MESG = re.compile(rb"mesg=(\d+)")


class Sink:
    """smtp-sink as the primary, counting messages as their final dot arrives.

    smtp-sink is Postfix's own C test server: it answers 250 to everything, fast enough not to
    be what a drain measures. `-c` makes it print a counter line per event on stdout; a thread
    reads them and records when the first message and the n-th arrived.
    """

    def __init__(self, reaper: Reaper, port: int, name: str = "smtp-sink") -> None:
        self.port = port
        self.count = 0
        self.first_at: float | None = None
        self.started_at = 0.0
        self._arrivals: dict[int, float] = {}
        self._wanted: set[int] = set()
        self._lock = threading.Condition()
        argv = [tool("smtp-sink"), "-c", "-u", SINK_USER, f"{LOOPBACK}:{port}", "1024"]
        reaper.note(argv)
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.name = f"{name}:{port}"
        reaper.add(self.name, self.stop)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(f"smtp-sink on port {port}", lambda: smtp_ready(port), 10)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        pending = b""
        while chunk := os.read(fd, 65536):
            now = time.monotonic()
            pending += chunk
            *lines, pending = re.split(rb"[\r\n]", pending)
            counts = [int(m.group(1)) for line in lines if (m := _MESG.search(line))]
            if not counts:
                continue
            with self._lock:
                self.count = max(self.count, *counts)
                if self.count and self.first_at is None:
                    self.first_at = now
                for wanted in list(self._wanted):
                    if self.count >= wanted:
                        self._arrivals[wanted] = now
                        self._wanted.discard(wanted)
                self._lock.notify_all()

    def watch(self, count: int) -> None:
        """Remember the moment the count reaches `count` (call before the mail starts to flow)."""
        with self._lock:
            if self.count >= count:
                self._arrivals[count] = time.monotonic()
            else:
                self._wanted.add(count)

    def wait(self, count: int, timeout: float, stall: float | None = None) -> float:
        """Blocks until `count` messages arrived; returns the monotonic time the last one did.

        `stall`: give up early when no message arrived for that long (a hung session would
        otherwise hold a benchmark for its whole timeout)."""
        self.watch(count)
        deadline = time.monotonic() + timeout
        with self._lock:
            seen, moved = self.count, time.monotonic()
            while count not in self._arrivals:
                now = time.monotonic()
                if self.count != seen:
                    seen, moved = self.count, now
                stalled = stall is not None and now - moved > stall
                if now > deadline or stalled or self.proc.poll() is not None:
                    why = f"nothing new for {stall:g}s" if stalled else f"after {timeout:g}s"
                    raise BenchError(f"{self.name}: {self.count} of {count} messages, {why}")
                self._lock.wait(min(deadline - now, 1.0))
            return self._arrivals[count]

    def wait_first(self, timeout: float) -> float:
        self.wait(1, timeout)
        assert self.first_at is not None
        return self.first_at

    def stop(self) -> None:
        end_process(self.proc, grace=5)


# -- the relay --------------------------------------------------------------------------------


def relay_command() -> list[str]:
    """`relay` from the interpreter's own environment (make bench runs .venv/bin/python)."""
    script = Path(sys.executable).parent / "relay"
    if script.exists():
        return [str(script)]
    found = shutil.which("relay")
    if found is None:
        raise BenchError("the relay command is not installed: run `make bench` (it installs it)")
    return [found]


def relay_environment() -> dict[str, str]:
    """The bench runs as root for Postfix's sake; the relay refuses root unless told it is
    meant (relay/ops/cli.py). Its figures do not depend on the user it runs as."""
    return {**os.environ, ALLOW_ROOT: "1"}


# The [smtp] keys every benchmark relay sets (see Relay).
RELAY_SMTP: dict[str, Any] = {"rate_per_ip": 0, "max_connections_per_ip": 200}


@dataclass
class RelaySettings:
    """What a benchmark relay differs in from the shipped defaults, and why (see the doc)."""

    primary_port: int
    delivery: dict[str, str | int] = field(default_factory=dict)
    retry: dict[str, str | int] = field(default_factory=dict)
    # Whole sections more (spam, arc, dns: the sender-checks benchmark); "dns" replaces the
    # closed port below with a local name server.
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    # More [smtp] keys (smtp.workers, the idle-sessions limits), written into its one table.
    smtp: dict[str, Any] = field(default_factory=dict)
    # CPUs the relay may run on (taskset -c), e.g. "0"; None: all of them.
    cpus: str | None = None


class Relay:
    """`relay serve` on its own queue and ports, with the shipped defaults except:

    * smtp.rate_per_ip = 0 and max_connections_per_ip raised: every benchmark client is
      127.0.0.1, which the per-IP limits exist to throttle;
    * dns.nameservers points at the run's own name server on loopback (`NAMESERVER`, which
      answers "no such name" to everything), so no lookup leaves the machine and each is
      answered at once, as a caching resolver next to the relay would answer.
    """

    def __init__(self, reaper: Reaper, workdir: Path, settings: RelaySettings, name: str) -> None:
        self.reaper = reaper
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port()
        self.queue_path = self.dir / "queue.db"
        self.config_path = self.dir / "relay.toml"
        self.config_path.write_text(self._config(settings))
        self.cpus = settings.cpus
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "relay.log"

    def _config(self, settings: RelaySettings) -> str:
        lines = [
            'hostname = "relay-bench.localhost"',
            "",
            "[smtp]",
            f'listen = ["{LOOPBACK}:{self.port}"]',
            *(f"{k} = {_toml(v)}" for k, v in {**RELAY_SMTP, **settings.smtp}.items()),
            "",
            "[queue]",
            f'path = "{self.queue_path}"',
            "",
            "[metrics]",
            f'listen = "{LOOPBACK}:{self.metrics_port}"',
        ]
        if "dns" not in settings.sections:
            if not NAMESERVER:
                raise BenchError("no name server for the relay: start one (run.py does)")
            lines += ["", "[dns]", f'nameservers = ["{NAMESERVER}"]']
        extra = [("delivery", settings.delivery), ("retry", settings.retry)]
        for section, values in [*extra, *settings.sections.items()]:
            if values:
                lines += ["", f"[{section}]"]
                lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        lines += [
            "",
            "[[domain]]",
            'name = "example.test"',
            f'primary = ["{LOOPBACK}:{settings.primary_port}"]',
        ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 120.0) -> float:
        """Starts `relay serve`; returns seconds until it greeted (opening a big queue counts)."""
        argv = [*relay_command(), "serve", "--config", str(self.config_path)]
        if self.cpus is not None:
            argv = ["taskset", "-c", self.cpus, *argv]
        self.reaper.note([f"{ALLOW_ROOT}=1", Path(argv[0]).name, *argv[1:]])
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        self.proc = subprocess.Popen(
            argv,
            env=relay_environment(),
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.reaper.add(self.name, self.stop)
        try:
            return wait_for(f"{self.name} to greet", self._ready, timeout, step=0.02)
        except BenchError as exc:
            raise BenchError(f"{exc}\n{self.log_tail()}") from exc

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.proc.returncode}\n{self.log_tail()}")
        return smtp_ready(self.port)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  {line}" for line in text[-lines:])

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc)
            self.reaper.discard(self.name)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        """The relay process and its SMTP workers (smtp.workers), if any."""
        return descendants(self.pid)

    def scrape(self) -> float:
        """GET /metrics; returns the seconds it took (it reads the queue gauges from SQLite)."""
        started = time.monotonic()
        url = f"http://{LOOPBACK}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=120) as response:
            response.read()
        return time.monotonic() - started

    def cli(self, *args: str, timeout: float = 300.0) -> float:
        """Runs `relay ARGS --config ...` with output discarded; returns its wall time."""
        argv = [*relay_command(), *args, "--config", str(self.config_path)]
        self.reaper.note([f"{ALLOW_ROOT}=1", Path(argv[0]).name, *argv[1:]])
        started = time.monotonic()
        done = subprocess.run(
            argv,
            env=relay_environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"relay {' '.join(args)} failed: {done.stderr.decode().strip()}")
        return time.monotonic() - started

    @contextlib.contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        """A read-only look at the queue (the server keeps writing; WAL readers never block it)."""
        conn = sqlite3.connect(f"file:{self.queue_path}?mode=ro", uri=True, timeout=30)
        try:
            yield conn
        finally:
            conn.close()

    def queued(self) -> int:
        """Messages in the queue, in any state."""
        if not self.queue_path.exists():
            return 0
        with self.db() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def never_tried(self) -> int:
        """Queued recipients without a delivery attempt yet."""
        with self.db() as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM recipients WHERE state = 'queued' AND attempts = 0"
            ).fetchone()
            return int(row[0])


def _toml(value: Any) -> str:
    """A TOML value: booleans, numbers, strings and lists of strings are all a config needs."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return f'"{value}"'


# -- Postfix ----------------------------------------------------------------------------------


class Postfix:
    """A private Postfix (tests/postfix.py, the harness the interop suite uses too).

    It relays example.test to [127.0.0.1]:primary_port (the relay's primary, i.e. the sink's
    port) and nothing else: `mydestination` is empty, no DNS (smtp_dns_support_level =
    disabled, smtpd_peername_lookup = no), logging to a file through postlogd. Everything else,
    durability included, is Postfix's default unless `extra` says otherwise.
    """

    def __init__(
        self,
        reaper: Reaper,
        workdir: Path,
        primary_port: int,
        name: str,
        extra: dict[str, str] | None = None,
        *,
        services: str | None = None,
        resolv_conf: Path | None = None,
    ) -> None:
        """`services` replaces the smtpd line of master.cf (postscreen); with `resolv_conf`, the
        instance runs in a mount namespace of its own that sees that file as /etc/resolv.conf,
        so its DNS lookups go to a local server while the machine's resolver is untouched."""
        if os.geteuid() != 0:
            raise BenchError("a private Postfix instance needs root (its daemons run as postfix)")
        self.reaper = reaper
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)  # the daemons run as the postfix user and must reach the queue
        self.control = PostfixControl(self.dir, note=reaper.note)
        self.queue_dir = self.control.queue_dir
        self.maillog = self.control.maillog
        self.port = free_port()
        self.settings = self._main_cf(primary_port) | (extra or {})
        listener = services if services is not None else smtpd_service(LOOPBACK, self.port)
        self.control.write(self.settings, SERVICES + listener.replace("PORT", str(self.port)))
        self.resolv_conf = resolv_conf
        self.running = False

    def _main_cf(self, primary_port: int) -> dict[str, str]:
        return {
            **base_settings(self.dir, "postfix-bench.localhost"),
            "mydomain": "localhost",
            "myorigin": "$myhostname",
            "relay_domains": "example.test",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[{LOOPBACK}]:{primary_port}",
            "smtp_fallback_relay": "",
            "smtpd_peername_lookup": "no",
            "local_recipient_maps": "",
        }

    def _postfix(self, *args: str, timeout: float = 60.0) -> None:
        done = self.control.run(tool("postfix"), *args, timeout=timeout)
        if done.returncode != 0:
            output = (done.stderr + done.stdout).strip()
            raise BenchError(f"postfix {' '.join(args)} failed: {output}\n{self.log_tail()}")

    def start(self) -> None:
        self.reaper.add(self.name, self.stop)
        if self.resolv_conf is None:
            self._postfix("start")
        else:
            self._start_with_own_resolver(self.resolv_conf)
        self.running = True
        wait_for(f"{self.name} smtpd on port {self.port}", lambda: smtp_ready(self.port), 30)

    def _start_with_own_resolver(self, resolv_conf: Path) -> None:
        script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        argv = [
            *("unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script),
            *(str(resolv_conf), tool("postfix"), "-c", str(self.control.config_dir), "start"),
        ]
        self.reaper.note(argv)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            output = (done.stderr + done.stdout).strip()
            raise BenchError(f"postfix start (own resolver) failed: {output}\n{self.log_tail()}")

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        self.control.stop()

    def master_pid(self) -> int | None:
        return self.control.master_pid()

    def pids(self) -> list[int]:
        pid = self.master_pid()
        return descendants(pid) if pid is not None else []

    def pin(self, cpus: set[int]) -> None:
        """Keeps the master and every daemon it has or will start on `cpus` (taskset's
        effect, set after start: the daemons it forks later inherit the master's)."""
        for pid in self.pids():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, cpus)

    def flush(self) -> None:
        """`postqueue -f`: every deferred message is tried now (as an operator would)."""
        done = self.control.run(tool("postqueue"), "-f")
        if done.returncode != 0:
            raise BenchError(f"postqueue -f failed: {done.stderr.strip()}")

    def list_queue(self, timeout: float = 600.0) -> float:
        """`postqueue -p` (its output read and dropped); returns its wall time."""
        started = time.monotonic()
        done = self.control.run(tool("postqueue"), "-p", timeout=timeout)
        if done.returncode != 0:
            raise BenchError(f"postqueue -p failed: {done.stderr.strip()}")
        return time.monotonic() - started

    def count(self, queues: Sequence[str] = POSTFIX_QUEUES) -> int:
        """Queue files in the named queues (deferred is hashed into subdirectories)."""
        total = 0
        for name in queues:
            for _root, _dirs, files in os.walk(self.queue_dir / name):
                total += len(files)
        return total

    def log_tail(self, lines: int = 10) -> str:
        try:
            text = self.maillog.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  {line}" for line in text[-lines:])


def postconf_defaults(*names: str) -> dict[str, str]:
    """Postfix's compiled-in defaults (`postconf -d`), not this machine's main.cf."""
    done = subprocess.run(
        [tool("postconf"), "-d", *names], capture_output=True, text=True, check=True
    )
    values = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" = ")
        values[key.strip()] = value.strip()
    return values


def seconds(value: str) -> float:
    """A Postfix time value ("300s", "1h", "4000") in seconds."""
    match = re.fullmatch(r"(\d+)([smhdw]?)", value.strip())
    if match is None:
        raise BenchError(f"cannot read Postfix time value {value!r}")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(match.group(1)) * unit


class FsyncCount:
    """`argv` run under strace, which counts the fsync and fdatasync calls of it and of every
    process it starts until the last of them exits. `-f --seccomp-bpf`: only those two calls
    stop a traced process; every other one runs at full speed."""

    def __init__(
        self, reaper: Reaper, workdir: Path, name: str, argv: Sequence[str], env: dict[str, str]
    ) -> None:
        self.name = name
        self.out = workdir / f"{name}.strace"
        command = [
            *("strace", "-f", "--seccomp-bpf", "-qq", "-c"),
            *("-e", "trace=fsync,fdatasync", "-o", str(self.out)),
            *argv,
        ]
        reaper.note(command)
        self.proc = subprocess.Popen(
            command,
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        reaper.add(name, lambda: end_process(self.proc))

    def traced(self) -> list[int]:
        """The processes strace started (its children), first started first."""
        return [pid for pid in descendants(self.proc.pid) if _parent(pid) == self.proc.pid]

    def calls(self, timeout: float = 120.0) -> int:
        """Waits for strace to end (every traced process gone); the calls it counted."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{self.name}: traced processes still running") from exc
        total = 0
        for line in self.out.read_text().splitlines():
            fields = line.split()
            if fields and fields[-1] in ("fsync", "fdatasync"):
                total += int(fields[3])
        return total


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rpartition(")")[2].split()[1])
    except OSError:
        return 0
