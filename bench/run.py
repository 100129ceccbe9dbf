"""Benchmarks of the relay against Postfix on the same machine (issue 7): `make bench`.

Each benchmark runs the relay and a private Postfix instance in one run, with the same
durability (both fsync before they answer 250, as shipped), drives both with Postfix's
smtp-source and receives with smtp-sink, and prints a Markdown table with both figures and their
ratio. The results go to bench/results.json and docs/performance.md.

    .venv/bin/python bench/run.py                 # all four
    .venv/bin/python bench/run.py accept drain    # some of them
    .venv/bin/python bench/run.py --quick         # smaller counts, one trial: a smoke run

Every process is ended by its own id on exit, failure or Ctrl-C, and each benchmark has a time
budget (SIGALRM). Needs root (Postfix daemons run as the postfix user) and the postfix and strace
packages (`make interop` installs both: tests/interop/install.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import peers
from peers import (
    BenchError,
    FsyncCount,
    Postfix,
    Reaper,
    Relay,
    RelaySettings,
    Sink,
    cpu_busy_fraction,
    free_port,
    postconf_defaults,
    pss_kib,
    relay_command,
    relay_environment,
    rss_kib,
    seconds,
    settle,
    smtp_ready,
    smtp_source,
    tool,
    tree_cpu_seconds,
    wait_for,
)
from report import (
    Row,
    Section,
    load,
    machine,
    median_spread,
    now_text,
    save,
    table,
    write_document,
)

from tests.postfix import PATH

KB = 1024
SENDERS = 20
CLI_RUNS = 3  # runs of each queue command, of which the median is shown
PREAMBLE = """\
How to read this: each benchmark starts the relay (`relay serve`, shipped defaults unless listed)
and a private Postfix instance (own config, queue and data directories under a temporary
directory, smtpd on a high loopback port, example.test relayed to the same dead or live primary
port as the relay's) in the same run, one after the other so they never compete for the CPU
(except in the recovery benchmark, where both wait out the same outage side by side).
Load comes from Postfix's `smtp-source` with 20 parallel sessions, one message per session (as a
backup MX sees it: many senders, few messages each); the primary is Postfix's `smtp-sink`.
Durability is the same on both sides and as shipped: Postfix's cleanup fsyncs each queue file
before the 250, the relay commits with `PRAGMA synchronous=FULL` in WAL mode (relay/store/),
several messages per commit (section 1 counts the fsync and fdatasync calls per message on
both sides, with strace). smtp-source fails the run on any reply other than 2xx/3xx, so a
rate is never inflated by rejected mail; counts are checked in both queues and at the sink.
The bench runs as root (Postfix's daemons need it), so the relay is started with
RELAY_ALLOW_ROOT=1. All traffic stays on 127.0.0.1.

Where the relay's time goes: one Python process runs its SMTP sessions on one core, so with the
default smtp.workers = 1 intake is bound by one core (Postfix spreads smtpd and cleanup over
all). With smtp.workers = "auto" (relay.workers) the relay process keeps the queue and runs one
SMTP worker per core; each worker hands the message to it over a socket pair and says 250 once
the relay process's group commit is durable. Issue 17 measured the ways to use both cores
before building one: two full relays on one port (SO_REUSEPORT) sharing the WAL queue took
1.33-1.45 times the messages of one, three no more than two, because their SQLite writers
waited on each other's BEGIN IMMEDIATE (py-spy: the writer thread 31 % in SQLite's busy
handler, 26 % in COMMIT); an flock around each commit helped little, and
sys.setswitchinterval nothing. One writer fed by the workers took as much (1.3-1.4 times) with
one group commit for all, the recipient policy, ETRN and the client limits kept in one place.
A worker's time then goes to the sender checks (SPF, DKIM, DMARC: about a quarter), the
session code, the send calls and its log lines; the relay process is mostly idle (its writer
waits on fsync). On this 2-core machine the two workers, the relay process, smtp-source and
the kernel share two cores: the machine is saturated, and more messages a second need less CPU
per message, not more processes. The price of the split is CPU and latency per message: two
local round trips (the connection's count, the commit), so messages per CPU-second are lower
with workers than with one process, and one sender alone, which waits for each reply before
the next command, is slower with them than without (the "one sender" rows). One sender is
bound by latency, not by the machine: each of its messages waits for all of the relay's CPU
work on it in turn (the messages per CPU-second rows: about a millisecond a message) and for a
commit of its own, whose fsync no other message shares (a quarter of a millisecond here),
where Postfix's smtpd and cleanup are C.

What scales with cores (the one-core row against the 2-core rows, and what it implies for 4
cores or more): the session work (parsing, sender checks, logging, the send calls) is spread
over the workers, one per core, so intake grows with cores until the one relay process that
commits every message is the limit; the relay process costs a fraction of what a worker costs
per message (it frames, commits with group commit and fsyncs once per batch), so on 4 cores
the workers, not it, should still bound intake. What does not scale: delivery (one process,
one loop: draining the queue is the same on 1 or 64 cores), a single sender (latency, not CPU),
and fsync, which batches more messages per commit as load grows rather than running in
parallel. Memory grows with every worker: each is a Python process of its own (about 50 MiB
RSS, the "relay memory with smtp.workers = auto" row), which is why the default stays 1. The
more CPU a message costs, the more workers give: with the sender checks of section 5 (an RSA
signature per message for the ARC seal) compare its rows with and without them.

Profiles (py-spy) led to what is in place: uvloop
for the socket work; a command loop and a DATA reader of our own instead of aiosmtpd's (which
re-scanned the protocol class per connection and read DATA line by line); one write per reply;
group commit in the queue's writer thread; log lines formatted and written by a thread of their
own (formatting moved off the loop: 2-5 % more messages per CPU-second); the free-space check
once per commit batch; deferral of new mail for a dead primary batched per poll. What is left
on the loop is mostly the send system call per reply and the per-connection setup, and, since
issue 15, the sender checks (SPF, DKIM, DMARC, on by default): two lookups and a parse per
message, their answers kept for their TTL by the relay itself (dnspython's own cache rebuilt
every answer, "no such name" raised anew: a tenth of a worker's time), and the parsed client
addresses kept too (section 5 measures the checks). Tried and reverted:
running the checks in threads (each DNS answer handed back through the loop cost a GIL
hand-off: no faster), and dkimpy's own RSA for the ARC seal (pure Python, 17 ms a seal;
OpenSSL's is used instead).

Delivery runs in the relay process alone (workers only take mail): draining 10,000 messages
it used 0.74 of a core (measured outside this script, CPU from /proc and py-spy: its loop
idle 46 % of the time, the writer thread busy half of it, fsync a third of that). Each
delivery waits on the writer twice, for its body (read in the writer's batch) and for its
outcomes' commit before the session takes the next message; two ways to wait less were tried
and reverted, both slower (the same drain of 10,000, timed from the first to the last delivery
in the relay's log, two runs each): reading bodies through a connection of their own in a
second thread, 6.8 s against 5.0 s to empty the queue, with half again as much CPU (the
hand-offs between three threads cost more than the waits saved); and committing a message's
outcomes while the session sends the next one, 2,370-2,460 msgs/s against 2,610-2,650.
Delivery runs 20 sessions per destination, as
Postfix does, and pipelines MAIL, the RCPTs and DATA when the primary offers PIPELINING (RFC
2920): two round trips a message instead of one per command. Measured with `bash
bench/pipelining.sh` (400 queued messages of 3 recipients, 20 sessions, smtp-sink behind a proxy
adding 5 ms each way): drained in 5.6 s with PIPELINING, 14.2 s without it (two runs each,
within 0.1 s), 2.5 times faster. On loopback alone the round trips cost little; the farther
the primary, the more it saves."""


@dataclass
class Context:
    reaper: Reaper
    workdir: Path
    quick: bool
    outage: float
    machine: dict[str, str]

    @property
    def trials(self) -> int:
        return 1 if self.quick else 3


class Timeout(BenchError):
    pass


@contextmanager
def budget(name: str, limit: float) -> Iterator[None]:
    """Bounds a whole benchmark: SIGALRM raises in the main thread, cleanup then runs."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise Timeout(f"{name}: over its time budget of {limit:g}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def progress(text: str) -> None:
    print(f"bench:   {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def commands(ctx: Context) -> list[str]:
    """The command lines this benchmark ran, with per-run ports and paths made generic."""
    seen: list[str] = []
    for line in ctx.reaper.commands:
        line = line.replace(str(ctx.workdir), "$WORK")
        line = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:$PORT", line)
        if line not in seen:
            seen.append(line)
    return seen


def section(ctx: Context, name: str) -> Section:
    return Section(name=name, date=now_text(), machine=ctx.machine)


def at_least(ratio: float | None, floor: float) -> bool | None:
    return None if ratio is None else ratio >= floor


def mib(kib: float) -> float:
    return kib / 1024


# -- 1. accept --------------------------------------------------------------------------------


def accept_trials(
    ctx: Context,
    systems: dict[str, Relay | Postfix],
    size: int,
    messages: int,
    *,
    sessions: int = SENDERS,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Alternates the systems trial by trial (ABBA), so drift on the machine hits both alike.
    Returns each trial's messages per second and messages per CPU-second: the CPU time of the
    system's whole process tree (the relay; Postfix's master and every daemon below it)."""
    rates: dict[str, list[float]] = {name: [] for name in systems}
    per_cpu: dict[str, list[float]] = {name: [] for name in systems}
    names = list(systems)
    for trial in range(ctx.trials):
        order = names if trial % 2 == 0 else names[::-1]
        for name in order:
            settle()
            root = _root_pid(systems[name])
            before = tree_cpu_seconds(root)
            port = systems[name].port
            result = smtp_source(ctx.reaper, port, messages=messages, size=size, sessions=sessions)
            used = tree_cpu_seconds(root) - before
            rates[name].append(result.rate)
            per_cpu[name].append(messages / used if used > 0 else 0.0)
    return rates, per_cpu


def _root_pid(system: Relay | Postfix) -> int:
    if isinstance(system, Relay):
        return system.pid
    pid = system.master_pid()
    if pid is None:
        raise BenchError(f"{system.name} is not running")
    return pid


def harness_ceiling(ctx: Context, size: int, messages: int) -> float:
    """smtp-source straight into smtp-sink: what this load generator can do at most."""
    sink = Sink(ctx.reaper, free_port(), name="calibration-sink")
    try:
        settle()
        return smtp_source(ctx.reaper, sink.port, messages=messages, size=size).rate
    finally:
        sink.stop()
        ctx.reaper.discard(sink.name)


# Issue 17's targets for intake, relay ÷ Postfix in one run.
ACCEPT_FLOORS = {4: 2.0, 100: 1.5}
ONE_SENDER_FLOOR = 1.5
IDLE_SESSIONS = 1000
IDLE_HOLD = 10.0  # seconds the idle sessions are watched
# The idle-sessions measure needs room for them: more slots than the defaults, and no stress
# mode (80 % of a worker's part of max_connections) to cut them short.
ROOMY = {"max_connections": 4000, "max_connections_per_ip": 4000}


def accept_row(name: str, measure: str, rates: dict[str, list[float]], floor: float | None) -> Row:
    relay_rate, relay_spread = median_spread(rates[name])
    postfix_rate, postfix_spread = median_spread(rates["postfix"])
    row = Row(
        measure=measure,
        unit="msgs/s",
        relay=relay_rate,
        postfix=postfix_rate,
        target=f"≥ {floor:g}× Postfix" if floor is not None else "",
        detail=f"median; relay {relay_spread}, Postfix {postfix_spread}",
    )
    row.met = at_least(row.ratio, floor) if floor is not None else None
    return row


def per_cpu_row(name: str, measure: str, per_cpu: dict[str, list[float]]) -> Row:
    relay_cpu, relay_cpu_spread = median_spread(per_cpu[name])
    postfix_cpu, postfix_cpu_spread = median_spread(per_cpu["postfix"])
    return Row(
        measure=measure,
        unit="msgs/CPU-s",
        relay=relay_cpu,
        postfix=postfix_cpu,
        detail=f"median; relay {relay_cpu_spread}, Postfix {postfix_cpu_spread}",
    )


def memory_mib(pids: list[int]) -> tuple[float, float, int]:
    """(RSS sum, PSS sum) in MiB over the processes, and how many were read: one that exits
    while being read (Postfix's daemons come and go) is left out rather than failing the run."""
    rss = pss = count = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            rss, pss, count = rss + rss_kib(pid)[0], pss + pss_kib(pid), count + 1
    return mib(rss), mib(pss), count


def idle_sessions(ctx: Context, primary: int) -> tuple[float, float, float]:
    """(share of one core while idle, the same with IDLE_SESSIONS sessions open after EHLO,
    MiB more RSS over all the relay's processes with them) for a fresh relay with
    smtp.workers = auto and an empty queue: what the sessions cost, not the queue's work."""
    relay = Relay(
        ctx.reaper, ctx.workdir, RelaySettings(primary, smtp={"workers": "auto", **ROOMY}), "idle"
    )
    relay.start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * IDLE_SESSIONS)), hard))
    settle()
    before, _, _ = memory_mib(relay.pids())
    quiet = cpu_share(relay, IDLE_HOLD)
    clients: list[socket.socket] = []
    try:
        for _ in range(IDLE_SESSIONS):
            client = socket.create_connection((peers.LOOPBACK, relay.port), timeout=30)
            clients.append(client)
            reader = client.makefile("rb")
            if not reader.readline().startswith(b"220"):
                raise BenchError("an idle session was refused its greeting")
            client.sendall(b"EHLO idle.bench.test\r\n")
            while (line := reader.readline())[3:4] == b"-":
                pass
            if not line.startswith(b"250"):
                raise BenchError(f"EHLO of an idle session: {line!r}")
        time.sleep(1.0)  # the last replies written, the loop idle again
        busy = cpu_share(relay, IDLE_HOLD)
        after, _, _ = memory_mib(relay.pids())
        return quiet, busy, after - before
    finally:
        for client in clients:
            client.close()
        relay.stop()


def cpu_share(relay: Relay, seconds: float) -> float:
    """Cores the relay's processes used over the next `seconds`."""
    start = tree_cpu_seconds(relay.pid)
    time.sleep(seconds)
    return (tree_cpu_seconds(relay.pid) - start) / seconds


def fsyncs_per_message(ctx: Context, primary: int, messages: int) -> dict[str, float]:
    """fsync and fdatasync calls per message on each side, from start to stop under strace,
    less the same for a start and stop with no mail: each side takes `messages` over SMTP and
    defers every one of them (the primary is down) before it is stopped."""
    counts: dict[str, list[int]] = {"relay": [], "postfix": []}
    for sent in (0, messages):
        relay = Relay(
            ctx.reaper,
            ctx.workdir,
            RelaySettings(primary, smtp={"workers": "auto"}),
            f"relay-fsync-{sent}",
        )
        argv = [*relay_command(), "serve", "--config", str(relay.config_path)]
        traced = FsyncCount(ctx.reaper, relay.dir, f"relay-fsync-{sent}", argv, relay_environment())
        wait_for("the traced relay to greet", lambda r=relay: smtp_ready(r.port), 60)
        if sent:
            smtp_source(ctx.reaper, relay.port, messages=sent, size=4 * KB)
        wait_for("the relay to defer every message", lambda r=relay: r.never_tried() == 0, 120)
        os.kill(traced.traced()[0], signal.SIGTERM)
        counts["relay"].append(traced.calls())
        ctx.reaper.discard(traced.name)

        postfix = Postfix(ctx.reaper, ctx.workdir, primary, f"postfix-fsync-{sent}")
        argv = [tool("postfix"), "-c", str(postfix.control.config_dir), "start"]
        traced = FsyncCount(
            ctx.reaper, postfix.dir, f"postfix-fsync-{sent}", argv, {**os.environ, "PATH": PATH}
        )
        postfix.running = True
        wait_for("the traced Postfix to greet", lambda p=postfix: smtp_ready(p.port), 60)
        if sent:
            smtp_source(ctx.reaper, postfix.port, messages=sent, size=4 * KB)
        wait_for(
            "Postfix to defer every message",
            lambda p=postfix, n=sent: p.count(("incoming", "active")) == 0 and p.count() == n,
            120,
        )
        postfix.stop()
        counts["postfix"].append(traced.calls())
        ctx.reaper.discard(traced.name)
    return {side: (full - empty) / messages for side, (empty, full) in counts.items()}


def one_core(ctx: Context, dead_primary: int, messages: int) -> dict[str, list[float]]:
    """Accept 4 KB on one core: the relay started under `taskset -c 0` (so "auto" means one
    process), Postfix's master and daemons kept on CPU 0 as well."""
    relay = Relay(
        ctx.reaper,
        ctx.workdir,
        RelaySettings(dead_primary, smtp={"workers": "auto"}, cpus="0"),
        "relay-one-core",
    )
    postfix = Postfix(ctx.reaper, ctx.workdir, dead_primary, "postfix-one-core")
    relay.start()
    postfix.start()
    postfix.pin({0})
    for port in (relay.port, postfix.port):
        smtp_source(ctx.reaper, port, messages=200, size=4 * KB)
    rates, _ = accept_trials(ctx, {"relay": relay, "postfix": postfix}, 4 * KB, messages)
    relay.stop()
    postfix.stop()
    return rates


def bench_accept(ctx: Context) -> Section:
    out = section(ctx, "accept")
    dead_primary = free_port()  # nothing listens there: the primary is down throughout
    workers = {"workers": "auto", **ROOMY}
    relay = Relay(
        ctx.reaper, ctx.workdir, RelaySettings(dead_primary, smtp=workers), "relay-accept"
    )
    single = Relay(ctx.reaper, ctx.workdir, RelaySettings(dead_primary), "relay-accept-single")
    postfix = Postfix(ctx.reaper, ctx.workdir, dead_primary, "postfix-accept")
    systems: dict[str, Relay | Postfix] = {"relay": relay, "single": single, "postfix": postfix}
    for system in systems.values():
        system.start()
    warmup = 200
    sent = warmup
    for system in systems.values():
        smtp_source(ctx.reaper, system.port, messages=warmup, size=4 * KB)
    cores = len(os.sched_getaffinity(0))
    # Long enough that start-up and tail effects vanish (issue 17: at least 20,000 at 4 KB).
    plan = [(4, 1000 if ctx.quick else 20000), (100, 500 if ctx.quick else 3000)]
    for size_kb, messages in plan:
        progress(f"{size_kb} KB: {ctx.trials} trial(s) of {messages:,} messages each system")
        ceiling = harness_ceiling(ctx, size_kb * KB, messages)
        rates, per_cpu = accept_trials(ctx, systems, size_kb * KB, messages)
        sent += messages * ctx.trials
        what = f"accept {size_kb} KB messages, {SENDERS} senders, primary down"
        out.rows.append(
            accept_row("relay", f"{what}: smtp.workers = auto", rates, ACCEPT_FLOORS[size_kb])
        )
        out.rows.append(accept_row("single", f"{what}: smtp.workers = 1", rates, None))
        for name, label in (("relay", "auto"), ("single", "1")):
            measure = (
                f"accept {size_kb} KB, smtp.workers = {label}: messages per CPU-second"
                " (all the side's processes)"
            )
            out.rows.append(per_cpu_row(name, measure, per_cpu))
        out.notes.append(
            f"{size_kb} KB: smtp-source straight into smtp-sink (the load generator's own"
            f" ceiling on this machine): {ceiling:,.0f} msgs/s."
        )
    alone = 300 if ctx.quick else 2000
    progress(f"one sender: {ctx.trials} trial(s) of {alone:,} messages each system")
    rates, _ = accept_trials(ctx, systems, 4 * KB, alone, sessions=1)
    sent += alone * ctx.trials
    one = "accept 4 KB messages, one sender, primary down"
    out.rows.append(accept_row("relay", f"{one}: smtp.workers = auto", rates, ONE_SENDER_FLOOR))
    out.rows.append(accept_row("single", f"{one}: smtp.workers = 1", rates, None))

    for system, name in ((relay, "relay-accept"), (single, "relay-accept-single")):
        wait_for(
            f"every accepted message in {name}'s queue", lambda s=system: s.queued() == sent, 60
        )
    wait_for("every accepted message in Postfix's queue", lambda: postfix.count() == sent, 60)
    rss, pss, _ = memory_mib(relay.pids())
    biggest = max(rss_kib(pid)[0] for pid in relay.pids())
    out.rows.append(
        Row(
            measure=f"relay memory with smtp.workers = auto, {sent:,} queued",
            unit="MiB",
            relay=rss,
            postfix=None,
            better="lower",
            target="≤ 100 MB per process and in total",
            met=rss <= 100 * 1000**2 / 1024**2,
            detail=f"VmRSS summed over its {len(relay.pids())} processes (largest"
            f" {mib(biggest):.1f}; PSS sum {pss:.1f}); with smtp.workers = 1: section 4",
        )
    )
    for system in systems.values():
        system.stop()
    progress(f"{IDLE_SESSIONS:,} idle sessions for {IDLE_HOLD:g} s, on a fresh relay")
    quiet, busy, grown = idle_sessions(ctx, dead_primary)
    out.rows.append(
        Row(
            measure=f"{IDLE_SESSIONS:,} idle sessions after EHLO: CPU, smtp.workers = auto",
            unit="% of a core",
            relay=100 * max(0.0, busy - quiet),
            postfix=None,
            better="lower",
            target="< 1 %",
            met=busy - quiet < 0.01,
            detail=f"CPU time of all the relay's processes over {IDLE_HOLD:g} s with the"
            f" sessions open ({100 * busy:.2f} %) less the same without them"
            f" ({100 * quiet:.2f} %), fresh relay, empty queue; Postfix runs one smtpd process"
            " per session (at most 100 by default): no like figure",
        )
    )
    out.rows.append(
        Row(
            measure=f"{IDLE_SESSIONS:,} idle sessions after EHLO: memory, smtp.workers = auto",
            unit="MiB",
            relay=grown,
            postfix=None,
            better="lower",
            target="< 10 MiB",
            met=grown < 10,
            detail="RSS summed over the relay's processes, with the sessions open minus before",
        )
    )
    counted = 500 if ctx.quick else 5000
    progress(f"fsyncs: {counted:,} messages each side under strace")
    fsyncs = fsyncs_per_message(ctx, dead_primary, counted)
    out.rows.append(
        Row(
            measure="fsync and fdatasync calls per accepted 4 KB message, 20 senders",
            unit="calls",
            relay=fsyncs["relay"],
            postfix=fsyncs["postfix"],
            better="lower",
            detail=f"strace -f -c over {counted:,} messages taken and deferred (primary down),"
            " start to stop, less a start and stop with no mail; relay with smtp.workers = auto",
        )
    )
    pinned = 1000 if ctx.quick else 10000
    progress(f"one core: {ctx.trials} trial(s) of {pinned:,} messages each side")
    rates = one_core(ctx, dead_primary, pinned)
    out.rows.append(
        accept_row(
            "relay",
            "accept 4 KB, 20 senders, on one core (taskset -c 0; the relay's auto = 1 process)",
            rates,
            None,
        )
    )
    out.notes.append(
        f"Counted after the run: {sent:,} messages in each queue of this section's first three"
        f" systems, as many as smtp-source sent ({warmup} of them a warm-up before the"
        " measured trials)."
    )
    out.notes.append(
        f"{ctx.trials} trial(s) per size and system, rotating which system goes first; the"
        " machine is left to go quiet between trials. Each trial is one smtp-source run of"
        f" -m messages over -s 20 sessions (-s 1 for one sender), timed from start to exit."
        f" This machine has {cores} cores: smtp.workers = auto runs {cores} SMTP workers."
    )
    out.settings = {
        "relay smtp.rate_per_ip": "0 (every client here is 127.0.0.1)",
        "relay smtp.max_connections_per_ip": "200 (same reason)",
        "relay smtp.workers": '"auto" (one SMTP worker per core) and 1 (the default), side by side',
        "relay smtp.max_connections, max_connections_per_ip (workers = auto)": (
            "4000: room for the idle sessions without stress mode (the relay measured with"
            " workers = auto, and the fresh one the idle sessions go to)"
        ),
        "relay dns.nameservers": "a name server of the run on loopback (answers no such name)",
        "Postfix relayhost": "[127.0.0.1]:<the relay's primary port> (nothing listens)",
    }
    out.commands = commands(ctx)
    return out


# -- 2. drain ---------------------------------------------------------------------------------


@dataclass
class Drain:
    fill_rate: float
    first: float  # seconds from the trigger to the first message at the sink
    last: float  # ... to the last one
    rate: float  # messages / (last - first)
    duplicates: int


def drain_relay(ctx: Context, count: int) -> Drain:
    primary = free_port()
    relay = Relay(ctx.reaper, ctx.workdir, RelaySettings(primary), "relay-drain")
    relay.start()
    progress(f"relay: queueing {count:,} messages with the primary down")
    fill = smtp_source(ctx.reaper, relay.port, messages=count, size=4 * KB)
    wait_for("the relay to defer every message", lambda: relay.never_tried() == 0, 300, 0.5)
    settle()
    progress("relay: primary back, draining")
    sink = Sink(ctx.reaper, primary, name="relay-primary")
    sink.watch(count)
    # The trigger is the primary coming back: the relay notices by its probe.
    trigger = sink.started_at
    first = sink.wait_first(120)
    last = sink.wait(count, 900, stall=60)
    wait_for("the relay's queue to empty", lambda: relay.queued() == 0, 120, 0.2)
    time.sleep(1)
    duplicates = sink.count - count
    sink.stop()
    relay.stop()
    return Drain(fill.rate, first - trigger, last - trigger, count / (last - first), duplicates)


def drain_postfix(ctx: Context, count: int) -> Drain:
    primary = free_port()
    postfix = Postfix(ctx.reaper, ctx.workdir, primary, "postfix-drain")
    postfix.start()
    progress(f"Postfix: queueing {count:,} messages with the primary down")
    fill = smtp_source(ctx.reaper, postfix.port, messages=count, size=4 * KB)
    wait_for(
        "Postfix to defer every message",
        lambda: postfix.count(("incoming", "active")) == 0 and postfix.count() == count,
        300,
        0.5,
    )
    settle()
    progress("Postfix: primary back, postqueue -f, draining")
    sink = Sink(ctx.reaper, primary, name="postfix-primary")
    sink.watch(count)
    trigger = time.monotonic()
    postfix.flush()
    first = sink.wait_first(120)
    last = sink.wait(count, 900, stall=60)
    wait_for("Postfix's queue to empty", lambda: postfix.count() == 0, 120, 0.2)
    time.sleep(1)
    duplicates = sink.count - count
    sink.stop()
    postfix.stop()
    return Drain(fill.rate, first - trigger, last - trigger, count / (last - first), duplicates)


def bench_drain(ctx: Context) -> Section:
    out = section(ctx, "drain")
    count = 2000 if ctx.quick else 10000
    relay = drain_relay(ctx, count)
    postfix = drain_postfix(ctx, count)
    rate = Row(
        measure=f"drain {count:,} queued 4 KB messages",
        unit="msgs/s",
        relay=relay.rate,
        postfix=postfix.rate,
        target="≥ 1.5× Postfix",
        detail="count ÷ (last − first arrival at the sink)",
    )
    rate.met = at_least(rate.ratio, 1.5)
    out.rows.append(rate)
    out.rows.append(
        Row(
            measure=f"primary back → all {count:,} delivered",
            unit="s",
            relay=relay.last,
            postfix=postfix.last,
            better="lower",
            detail=(
                f"relay: from the sink's start, probe included (first message after"
                f" {relay.first:.2f} s); Postfix: from `postqueue -f` (first after"
                f" {postfix.first:.2f} s)"
            ),
        )
    )
    out.notes.append(
        f"The queue was filled over SMTP with the primary down (relay {relay.fill_rate:,.0f},"
        f" Postfix {postfix.fill_rate:,.0f} msgs/s), and each system had deferred every"
        " message before the primary came back."
    )
    out.notes.append(
        "Postfix is told with `postqueue -f`, as an operator would; the relay needs no"
        " operator: it probes the primary every delivery.probe_interval (5 s) and then makes"
        " all its mail due. Both run their default delivery concurrency: 20 sessions per"
        " destination (Postfix's default_destination_concurrency_limit, the relay's"
        " delivery.per_host_concurrency)."
    )
    out.notes.append(
        f"Messages counted at the sink beyond {count:,} (duplicates): relay"
        f" {relay.duplicates}, Postfix {postfix.duplicates}; both queues were empty after."
    )
    out.commands = commands(ctx)
    return out


# -- 3. recovery ------------------------------------------------------------------------------

PROBE_INTERVAL = 5.0  # the relay's delivery.probe_interval default
SHORTEN = 30  # Postfix's retry timers divided by this to measure them in minutes, not hours


def clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def postfix_worst_wait(outage: float, minimal: float, maximal: float, run_delay: float) -> float:
    """Postfix retries a deferred message after its age clamped to [minimal, maximal]
    (qmgr_active.c), and finds it due at the next deferred-queue scan (queue_run_delay): after
    an outage of `outage` seconds the last failed try may have been just before the primary
    came back, so the next one can be up to clamp(outage) + queue_run_delay away."""
    return clamp(outage, minimal, maximal) + run_delay


@dataclass
class Recovery:
    """Seconds from the primary's return to the first delivery and to the last, per round."""

    first: list[float]
    last: list[float]
    extra: int  # messages at the sink beyond those sent (duplicates)


def recovery_round(
    ctx: Context,
    relay: Relay,
    postfix: Postfix,
    ports: tuple[int, int],
    count: int,
    postfix_bound: float,
    results: tuple[Recovery, Recovery],
) -> None:
    """One outage seen by both at once: mail arrives while the primary is down, the primary
    stays down `outage` seconds (plus up to one probe interval, so the return does not fall in
    step with the relay's probes), then both primaries come back at the same moment."""
    outage_start = time.monotonic()
    smtp_source(ctx.reaper, relay.port, messages=count, size=4 * KB)
    smtp_source(ctx.reaper, postfix.port, messages=count, size=4 * KB)
    wait_for("the relay to defer every message", lambda: relay.never_tried() == 0, 120, 0.2)
    wait_for("Postfix to defer", lambda: postfix.count(("incoming", "active")) == 0, 120, 0.2)
    length = ctx.outage + random.uniform(0, PROBE_INTERVAL)
    time.sleep(max(0.0, outage_start + length - time.monotonic()))
    sinks = (
        Sink(ctx.reaper, ports[0], name="relay-primary"),
        Sink(ctx.reaper, ports[1], name="postfix-primary"),
    )
    back = sum(sink.started_at for sink in sinks) / 2
    # The relay's last delivery may wait out a retry backoff (retry.max, 600 s by default) if
    # its recovery misses a message: measured, not cut short, so the figure shows it.
    limits = ((120.0, 720.0), (postfix_bound + 120, postfix_bound + 300))
    try:
        for sink, result, (first_limit, last_limit) in zip(sinks, results, limits, strict=True):
            result.first.append(sink.wait_first(first_limit) - back)
            result.last.append(sink.wait(count, last_limit) - back)
        wait_for("the relay's queue to empty", lambda: relay.queued() == 0, 60, 0.2)
        wait_for("Postfix's queue to empty", lambda: postfix.count() == 0, 60, 0.2)
        time.sleep(1)
        for sink, result in zip(sinks, results, strict=True):
            result.extra += sink.count - count
    finally:
        for sink in sinks:
            sink.stop()
            ctx.reaper.discard(sink.name)


def bench_recovery(ctx: Context) -> Section:
    out = section(ctx, "recovery")
    count = 100 if ctx.quick else 200
    rounds = 1 if ctx.quick else 3
    names = ("minimal_backoff_time", "maximal_backoff_time", "queue_run_delay")
    defaults = postconf_defaults(*names)
    minimal, maximal, run_delay = (seconds(defaults[k]) for k in names)
    short = {k: f"{seconds(defaults[k]) / SHORTEN:.0f}s" for k in names}
    ports = (free_port(), free_port())
    relay = Relay(ctx.reaper, ctx.workdir, RelaySettings(ports[0]), "relay-recovery")
    postfix = Postfix(ctx.reaper, ctx.workdir, ports[1], "postfix-recovery", extra=short)
    relay.start()
    postfix.start()
    short_bound = postfix_worst_wait(
        ctx.outage + PROBE_INTERVAL, *(seconds(short[k]) for k in names)
    )
    results = (Recovery([], [], 0), Recovery([], [], 0))
    for number in range(rounds):
        progress(f"outage {number + 1} of {rounds}: about {ctx.outage:g} s")
        recovery_round(ctx, relay, postfix, ports, count, short_bound, results)
    relay.stop()
    postfix.stop()
    r, p = results
    shortened = ", ".join(f"{k} = {v}" for k, v in short.items())
    first_relay, first_relay_spread = median_spread(r.first)
    first_postfix, first_postfix_spread = median_spread(p.first)
    last_relay, last_relay_spread = median_spread(r.last)
    last_postfix, last_postfix_spread = median_spread(p.last)
    outage = f"{ctx.outage:g}–{ctx.outage + PROBE_INTERVAL:g} s outage"
    out.rows += [
        Row(
            measure=f"primary back after a {outage} → first delivery",
            unit="s",
            relay=first_relay,
            postfix=first_postfix,
            better="lower",
            target="relay ≤ 2 s (median)",
            met=first_relay <= 2,
            detail=(
                f"median, relay {first_relay_spread}, Postfix {first_postfix_spread}; Postfix"
                f" with retry timers ÷{SHORTEN} ({shortened}), computed worst case with those"
                f" {short_bound:.0f} s"
            ),
        ),
        Row(
            measure=f"primary back after a {outage} → queue empty ({count} msgs)",
            unit="s",
            relay=last_relay,
            postfix=last_postfix,
            better="lower",
            detail=(
                f"median, relay {last_relay_spread}, Postfix {last_postfix_spread}; Postfix"
                f" with retry timers ÷{SHORTEN}"
            ),
        ),
        Row(
            measure=f"Postfix defaults, {outage} → first delivery, worst case",
            unit="s",
            relay=None,
            postfix=postfix_worst_wait(ctx.outage + PROBE_INTERVAL, minimal, maximal, run_delay),
            better="lower",
            detail="*computed*, not measured: clamp(outage, minimal, maximal) + queue_run_delay",
        ),
        Row(
            measure=f"Postfix defaults, outage ≥ {maximal:.0f} s → first delivery, worst case",
            unit="s",
            relay=None,
            postfix=postfix_worst_wait(maximal, minimal, maximal, run_delay),
            better="lower",
            detail="*computed*, not measured: maximal_backoff_time + queue_run_delay",
        ),
    ]
    out.notes.append(
        f"{rounds} outage(s), both systems side by side: {count} messages of 4 KB sent to each"
        " while the primary was down; both primaries (one smtp-sink each) came back at the same"
        f" moment, {ctx.outage:g} s plus a random 0–{PROBE_INTERVAL:g} s after the first"
        " message (so the return does not fall in step with the relay's probe). No operator"
        " action: the relay's probe (delivery.probe_interval, default 5 s) and Postfix's own"
        " retry schedule. A round starts with the primary down again."
    )
    out.notes.append(
        "Postfix defaults from `postconf -d`: "
        + ", ".join(f"{k} = {defaults[k]}" for k in names)
        + ". Postfix retries a deferred message after its age in the queue clamped to"
        " [minimal_backoff_time, maximal_backoff_time] (qmgr_active.c), at the next deferred"
        " queue scan (every queue_run_delay): its wait grows with the outage up to that cap,"
        " the relay's does not depend on it."
    )
    out.notes.append(
        f"Messages at the sinks beyond those sent (duplicates): relay {r.extra}, Postfix"
        f" {p.extra}; both queues were empty after each round."
    )
    out.settings = {f"Postfix {k}": f"{v} (default {defaults[k]})" for k, v in short.items()}
    out.commands = commands(ctx)
    return out


# -- 4. footprint -----------------------------------------------------------------------------


def relay_footprint(ctx: Context, count: int, messages: int) -> dict[str, Any]:
    primary = free_port()
    relay = Relay(ctx.reaper, ctx.workdir, RelaySettings(primary), "relay-footprint")
    relay.start()
    progress(f"relay: queueing {count:,} messages over SMTP with the primary down")
    figures: dict[str, Any] = {
        "fill_rate": smtp_source(ctx.reaper, relay.port, messages=count, size=4 * KB).rate
    }
    wait_for("the relay to defer every message", lambda: relay.never_tried() == 0, 600, 1.0)
    if relay.queued() != count:
        raise BenchError(f"relay queue holds {relay.queued()} messages, wanted {count}")
    figures["db_mib"] = relay.queue_path.stat().st_size / 1024**2
    # Started again on the full queue: what a restart in the middle of an outage costs.
    relay.stop()
    figures["start"] = relay.start()
    time.sleep(3)
    figures["rss_start"] = mib(rss_kib(relay.pid)[0])
    figures["scrape"] = relay.scrape()
    figures["rss_scrape"] = mib(rss_kib(relay.pid)[0])
    progress("relay: memory, /metrics, relay queue, relay status, accept trials")
    # Median of three: one run alone lands wherever the server's own work (deferring the due
    # part of its queue) happens to be; runs of one session ranged 1.1 s to 1.9 s.
    figures["queue_cli"], figures["queue_cli_spread"] = median_spread(
        [relay.cli("queue") for _ in range(CLI_RUNS)]
    )
    figures["status_cli"], figures["status_cli_spread"] = median_spread(
        [relay.cli("status") for _ in range(CLI_RUNS)]
    )
    rates = accept_trials(ctx, {"relay": relay}, 4 * KB, messages)[0]["relay"]
    figures["accept_full"], _ = median_spread(rates)
    figures["rss_peak"] = mib(rss_kib(relay.pid)[1])
    relay.stop()

    progress("relay: accept trials with an empty queue")
    empty = Relay(ctx.reaper, ctx.workdir, RelaySettings(primary), "relay-empty")
    empty.start()
    time.sleep(3)
    figures["rss_empty"] = mib(rss_kib(empty.pid)[0])
    rates = accept_trials(ctx, {"relay": empty}, 4 * KB, messages)[0]["relay"]
    figures["accept_empty"], _ = median_spread(rates)
    empty.stop()
    return figures


def postfix_memory(postfix: Postfix) -> tuple[float, float, int]:
    """(PSS sum, RSS sum, process count) over the master and everything below it (an idle
    smtpd exits after max_idle: one gone while being read is left out)."""
    rss, pss, count = memory_mib(postfix.pids())
    return pss, rss, count


def postfix_footprint(ctx: Context, count: int, messages: int) -> dict[str, Any]:
    primary = free_port()
    postfix = Postfix(ctx.reaper, ctx.workdir, primary, "postfix-footprint")
    postfix.start()
    progress(f"Postfix: queueing {count:,} messages over SMTP with the primary down")
    figures: dict[str, Any] = {
        "fill_rate": smtp_source(ctx.reaper, postfix.port, messages=count, size=4 * KB).rate
    }
    wait_for(
        "Postfix to defer every message",
        lambda: postfix.count(("incoming", "active")) == 0 and postfix.count() == count,
        600,
        1.0,
    )
    settle()
    progress("Postfix: memory, postqueue -p, accept trials")
    figures["pss"], figures["rss"], figures["procs"] = postfix_memory(postfix)
    figures["queue_cli"], figures["queue_cli_spread"] = median_spread(
        [postfix.list_queue() for _ in range(CLI_RUNS)]
    )
    rates = accept_trials(ctx, {"postfix": postfix}, 4 * KB, messages)[0]["postfix"]
    figures["accept_full"], _ = median_spread(rates)
    postfix.stop()

    progress("Postfix: accept trials with an empty queue")
    empty = Postfix(ctx.reaper, ctx.workdir, primary, "postfix-empty")
    empty.start()
    rates = accept_trials(ctx, {"postfix": empty}, 4 * KB, messages)[0]["postfix"]
    figures["accept_empty"], _ = median_spread(rates)
    figures["pss_empty"], _, _ = postfix_memory(empty)
    empty.stop()
    return figures


def bench_footprint(ctx: Context) -> Section:
    out = section(ctx, "footprint")
    count = 20_000 if ctx.quick else 100_000
    messages = 1000 if ctx.quick else 3000
    r = relay_footprint(ctx, count, messages)
    p = postfix_footprint(ctx, count, messages)
    n = f"{count:,} queued"
    memory = Row(
        measure=f"memory after start, {n}",
        unit="MiB",
        relay=r["rss_start"],
        postfix=p["pss"],
        better="lower",
        target="relay RSS ≤ 100 MB",
        met=r["rss_start"] <= 100 * 1000**2 / 1024**2,
        detail=(
            f"relay: VmRSS of its one process (empty queue: {r['rss_empty']:.1f});"
            f" Postfix: PSS summed over its {p['procs']:.0f} processes (RSS sum"
            f" {p['rss']:.1f}; empty queue: PSS {p['pss_empty']:.1f})"
        ),
    )
    scraped = Row(
        measure=f"relay memory after a /metrics scrape, {n}",
        unit="MiB",
        relay=r["rss_scrape"],
        postfix=None,
        better="lower",
        target="≤ 100 MB",
        met=r["rss_scrape"] <= 100 * 1000**2 / 1024**2,
        detail=f"scrape took {r['scrape']:.2f} s; peak (VmHWM) over the run {r['rss_peak']:.1f}",
    )
    listing = Row(
        measure=f"`relay queue` vs `postqueue -p`, {n}",
        unit="s",
        relay=r["queue_cli"],
        postfix=p["queue_cli"],
        better="lower",
        target="relay < 1 s",
        met=r["queue_cli"] < 1.0,
        detail=(
            "the full mailq-style listing, output to /dev/null, server running; median,"
            f" relay {r['queue_cli_spread']}, Postfix {p['queue_cli_spread']}"
        ),
    )
    summary = Row(
        measure=f"`relay status` (per-domain summary), {n}",
        unit="s",
        relay=r["status_cli"],
        postfix=None,
        better="lower",
        target="< 1 s",
        met=r["status_cli"] < 1.0,
        detail=(
            "output to /dev/null, server running; Postfix has no equivalent; median,"
            f" relay {r['status_cli_spread']}"
        ),
    )
    full_vs_empty = Row(
        measure=f"accept 4 KB with {n} ÷ with an empty queue",
        unit="%",
        relay=100 * r["accept_full"] / r["accept_empty"],
        postfix=100 * p["accept_full"] / p["accept_empty"],
        target="relay ≥ 80 %",
        detail=(
            f"relay {r['accept_full']:,.0f} vs {r['accept_empty']:,.0f} msgs/s;"
            f" Postfix {p['accept_full']:,.0f} vs {p['accept_empty']:,.0f} msgs/s"
        ),
    )
    full_vs_empty.met = full_vs_empty.relay is not None and full_vs_empty.relay >= 80
    out.rows += [memory, scraped, listing, summary, full_vs_empty]
    out.notes.append(
        f"Both queues were filled the same way, over SMTP ({count:,} messages of 4 KB, 20"
        f" sessions) with the primary down: relay {r['fill_rate']:,.0f} msgs/s, Postfix"
        f" {p['fill_rate']:,.0f} msgs/s sustained; the relay's database then took"
        f" {r['db_mib']:,.0f} MiB. The relay was then restarted on the full queue (as after a"
        f" reboot in the middle of an outage): {r['start']:.2f} s from `relay serve` to its"
        " SMTP greeting, and its memory measured after that start. Its messages came due for"
        " their retries (retry.min = 60 s, then backoff) while it was measured, as they would"
        " in a long outage: each retry of a destination known down is a deferral in the queue,"
        " no connection."
    )
    out.notes.append(
        "Postfix, being minutes old, had none of its messages come due for a retry while it"
        " was measured (minimal_backoff_time = 300 s)."
    )
    out.notes.append(
        f"Accept rates: median of {ctx.trials} smtp-source run(s) of {messages:,} messages,"
        f" {SENDERS} sessions, primary down; the empty-queue figures come from fresh instances"
        " in the same run."
    )
    out.commands = commands(ctx)
    return out


# -- running ----------------------------------------------------------------------------------

# -- 5. sender checks -------------------------------------------------------------------------

CHECK_DNS = "127.0.0.53"  # Postfix's resolver asks port 53 only: the local server sits there
SENDER_ZONE = "bench.test"  # smtp-source's MAIL FROM and From: domain
DNSBL_ZONE = "zen.bench.test"
SEAL_DOMAIN = "relay-bench.example"
POSTSCREEN = """\
127.0.0.1:PORT inet n - n - 1 postscreen
smtpd      pass  - - n - - smtpd
dnsblog    unix  - - n - 0 dnsblog
tlsproxy   unix  - - n - 0 tlsproxy
"""


def check_dns(workdir: Path) -> Any:
    """The local authoritative server every check asks: SPF pass and DMARC p=reject for the
    senders' domain, a DNS list that lists nobody, the relay's ARC key. Nothing leaves."""
    from relay.smtp import arc as arc_keys
    from tests.dnsserver import DnsServer

    key = arc_keys.generate_key(str(workdir / "arc.key"), force=True)
    strings = arc_keys.txt_strings(arc_keys.public_record(key))
    server = DnsServer(
        {
            f"{SENDER_ZONE}.": [("TXT", '"v=spf1 ip4:127.0.0.0/8 -all"')],
            f"_dmarc.{SENDER_ZONE}.": [("TXT", '"v=DMARC1; p=reject"')],
            f"{DNSBL_ZONE}.": [("TXT", '"a DNS list that lists nobody"')],
            f"s1._domainkey.{SEAL_DOMAIN}.": [("TXT", strings)],
        }
    )
    return server.start(CHECK_DNS, 53)


def bench_auth(ctx: Context) -> Section:
    """Issue 15 part 5: what the checks at the door cost, on both sides, same local DNS."""
    out = section(ctx, "auth")
    dead_primary = free_port()
    dns = check_dns(ctx.workdir)
    ctx.reaper.add("check-dns", dns.stop)
    resolv_conf = ctx.workdir / "resolv.conf"
    resolv_conf.write_text(f"nameserver {CHECK_DNS}\noptions attempts:1 timeout:2\n")
    nameservers = {"nameservers": [f"{CHECK_DNS}:53"]}
    plain = RelaySettings(dead_primary, sections={"dns": nameservers, "spam": {"auth": False}})
    checked = RelaySettings(
        dead_primary,
        sections={
            "dns": nameservers,
            "spam": {"auth": True, "dnsbl": [f"{DNSBL_ZONE}*3"]},
            "arc": {"key": str(ctx.workdir / "arc.key"), "selector": "s1", "domain": SEAL_DOMAIN},
        },
    )
    unsealed = RelaySettings(
        dead_primary,
        sections={"dns": nameservers, "spam": {"auth": True, "dnsbl": [f"{DNSBL_ZONE}*3"]}},
    )
    spread = RelaySettings(
        dead_primary, sections=checked.sections, smtp={"workers": "auto", **ROOMY}
    )
    postscreen = {
        "postscreen_dnsbl_sites": f"{DNSBL_ZONE}*3",
        "postscreen_dnsbl_threshold": "3",
        "postscreen_dnsbl_action": "enforce",
        "postscreen_access_list": "",  # 127.0.0.0/8 is mynetworks: it would skip every test
        "postscreen_greet_action": "ignore",
        "postscreen_cache_map": f"btree:{ctx.workdir / 'postscreen_cache'}",
    }
    systems: dict[str, Relay | Postfix] = {
        "relay, checks off": Relay(ctx.reaper, ctx.workdir, plain, "relay-auth-off"),
        "relay, checks on": Relay(ctx.reaper, ctx.workdir, checked, "relay-auth-on"),
        "relay, checks on, no ARC seal": Relay(
            ctx.reaper, ctx.workdir, unsealed, "relay-auth-unsealed"
        ),
        "relay, checks on, workers = auto": Relay(
            ctx.reaper, ctx.workdir, spread, "relay-auth-workers"
        ),
        "postfix": Postfix(ctx.reaper, ctx.workdir, dead_primary, "postfix-auth-off"),
        "postfix, postscreen": Postfix(
            ctx.reaper,
            ctx.workdir,
            dead_primary,
            "postfix-postscreen",
            postscreen,
            services=POSTSCREEN,
            resolv_conf=resolv_conf,
        ),
    }
    for system in systems.values():
        system.start()
    messages = 500 if ctx.quick else 3000
    size = 4 * KB
    for system in systems.values():  # warm-up, and postscreen's first (cached) verdict
        smtp_source(ctx.reaper, system.port, messages=100, size=size, sender=f"s@{SENDER_ZONE}")
    progress(
        f"4 KB: {ctx.trials} trial(s) of {messages:,} messages, each of {len(systems)} systems"
    )
    rates: dict[str, list[float]] = {name: [] for name in systems}
    names = list(systems)
    for trial in range(ctx.trials):
        for name in names if trial % 2 == 0 else names[::-1]:
            settle()
            port = systems[name].port
            result = smtp_source(
                ctx.reaper, port, messages=messages, size=size, sender=f"s@{SENDER_ZONE}"
            )
            rates[name].append(result.rate)
    median = {name: median_spread(values) for name, values in rates.items()}
    for relay_name, postfix_name, what in (
        ("relay, checks off", "postfix", "no checks"),
        ("relay, checks on", "postfix, postscreen", "checks on"),
        ("relay, checks on, workers = auto", "postfix, postscreen", "checks on, workers = auto"),
    ):
        out.rows.append(
            Row(
                measure=f"accept 4 KB, {SENDERS} senders, {what}",
                unit="msgs/s",
                relay=median[relay_name][0],
                postfix=median[postfix_name][0],
                detail=f"median; relay {median[relay_name][1]}, Postfix {median[postfix_name][1]}",
            )
        )
    for name, (rate, _) in median.items():
        out.notes.append(f"{name}: {rate:,.0f} msgs/s.")
    relay_cost = 1 - median["relay, checks on"][0] / median["relay, checks off"][0]
    seal_cost = 1 - median["relay, checks on"][0] / median["relay, checks on, no ARC seal"][0]
    postfix_cost = 1 - median["postfix, postscreen"][0] / median["postfix"][0]
    out.notes.append(
        f"Cost of the checks: the relay loses {relay_cost:.0%} of its accept rate with SPF, DKIM,"
        f" DMARC, the ARC chain check, an ARC seal (RSA 2048) and one DNS list on every message;"
        f" Postfix loses {postfix_cost:.0%} with postscreen's DNS list check, which is all it"
        " does at the door (no SPF, DKIM, DMARC or ARC without milters). Of the relay's cost,"
        f" the ARC seal alone (an RSA 2048 signature per message, by OpenSSL) is {seal_cost:.0%}"
        " of the checked rate."
    )
    out.notes.append(
        "Every lookup goes to one local authoritative server (tests/dnsserver.py on"
        f" {CHECK_DNS}:53): SPF pass and DMARC p=reject for {SENDER_ZONE}, a DNS list listing"
        " nobody, the relay's ARC key. The relay keeps the answers of the sender checks for"
        " their TTL (one sender domain here: after the first message they come from that"
        " cache), and its DNS list answers too; postscreen caches a client's DNS list verdict"
        " (postscreen_cache_map)."
        " smtp-source composes unsigned messages: the DKIM check finds no signature to verify."
        " Postfix runs in a mount namespace of its own whose /etc/resolv.conf names that server;"
        " the machine's resolver is untouched."
    )
    out.settings = {
        "relay, checks on": f'spam.auth = true, spam.dnsbl = ["{DNSBL_ZONE}*3"], [arc] key',
        "relay, checks off": "spam.auth = false",
        "relay, checks on, no ARC seal": "as checks on, without [arc]",
        "relay, checks on, workers = auto": (
            'as checks on, with smtp.workers = "auto" (and max_connections 4000)'
        ),
        "postfix, postscreen": f"postscreen_dnsbl_sites = {DNSBL_ZONE}*3, access list empty",
    }
    for system in systems.values():
        system.stop()
    dns.stop()
    out.commands = commands(ctx)
    return out


BENCHMARKS: dict[str, tuple[Callable[[Context], Section], float]] = {
    "accept": (bench_accept, 900),
    "drain": (bench_drain, 1800),
    "recovery": (bench_recovery, 3600),
    "footprint": (bench_footprint, 2400),
    "auth": (bench_auth, 1200),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "benchmarks",
        nargs="*",
        metavar="BENCHMARK",
        help=f"{', '.join(BENCHMARKS)} or all (the default)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts, one trial each; printed, not recorded"
    )
    parser.add_argument(
        "--outage", type=float, default=None, help="outage length for recovery (default 60 s)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="parent of the run's temporary directory"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--no-doc", action="store_true", help="print only; leave results.json and the doc"
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: write docs/performance.md again from bench/results.json (after"
        " a change to the text around the figures)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.benchmarks) - {*BENCHMARKS, "all"})
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}")
    return args


def terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.render:
        write_document(load(), PREAMBLE)
        print("bench: wrote docs/performance.md from bench/results.json", file=sys.stderr)
        return 0
    chosen = args.benchmarks
    names = list(BENCHMARKS) if not chosen or "all" in chosen else list(dict.fromkeys(chosen))
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, terminate)
    record = not args.no_doc and not args.quick  # a quick run's figures are not the record
    reaper = Reaper()
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-", dir=args.workdir))
    done: list[Section] = []
    failed: list[str] = []
    try:
        outage = args.outage if args.outage is not None else (20.0 if args.quick else 60.0)
        ctx = Context(reaper, workdir, args.quick, outage, machine(workdir))
        from tests.dnsserver import DnsServer

        # For the whole run, not in the reaper: it ends every benchmark's processes.
        nameserver = DnsServer().start()
        peers.NAMESERVER = nameserver.address
        for name in names:
            run, limit = BENCHMARKS[name]
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            reaper.commands.clear()
            started = time.monotonic()
            idle_load = cpu_busy_fraction(2.0)
            try:
                with budget(name, limit):
                    result = run(ctx)
                result.notes.append(
                    f"CPU busy before the benchmark started (other work on the machine):"
                    f" {idle_load:.0%}."
                )
            except BenchError as exc:
                print(f"bench: {name} FAILED: {exc}", file=sys.stderr)
                failed.append(name)
                continue
            except Exception:  # a bug here must not cost the other benchmarks their results
                traceback.print_exc()
                print(f"bench: {name} FAILED with the error above", file=sys.stderr)
                failed.append(name)
                continue
            finally:
                reaper.reap()
            print(f"bench: {name} done in {time.monotonic() - started:.0f}s", file=sys.stderr)
            print(table([result]) + "\n", flush=True)
            done.append(result)
            if record:
                # Saved as each one finishes, so an interrupted run keeps what it measured.
                write_document(save([result]), PREAMBLE)
    except KeyboardInterrupt as exc:
        print(f"bench: interrupted ({exc or 'Ctrl-C'}), cleaning up", file=sys.stderr)
        return 130
    finally:
        reaper.reap()
        if args.keep:
            print(f"bench: work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if done:
        print("## All results of this run\n\n" + table(done))
        if record:
            print("\nbench: wrote bench/results.json and docs/performance.md", file=sys.stderr)
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
