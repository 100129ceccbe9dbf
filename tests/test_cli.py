"""The `relay` command as an operator uses it: the real program in a subprocess, on real queues.

Queues are filled through `relay.store.Store` (the same code the server commits with), or by a
real `relay serve` for the tests of the CLI on a running server.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from relay.ops.cli import main
from relay.store import (
    DELIVERED,
    HELD,
    QUEUED,
    SCHEMA_VERSION,
    NewMessage,
    NewRecipient,
    Outcome,
    Store,
)
from tests.conftest import (
    DOMAIN,
    RelayProcess,
    open_store,
    run_relay,
    send_mail,
    wait_for,
    write_config,
)
from tests.fakeprimary import FakePrimary

# Ages that print the same for a good while: "2d3h" and "1h2m", whenever the test runs.
AAA_AGE = 2 * 86400 + 3 * 3600 + 100
BBB_AGE = 3725
BODY = b"Received: from x\r\n\tby y\r\nSubject: caf\xc3\xa9\r\n\r\n\x00\xff\r\n.\r\nend\r\n"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path)


def queue_path(config: Path) -> Path:
    return config.parent / "queue" / "queue.db"


@pytest.fixture
def now() -> float:
    return time.time()


@pytest.fixture
def queue(config: Path, now: float) -> Iterator[Store]:
    """A queue with two messages: AAA (one recipient deferred, one delivered) and BBB (held)."""
    store = Store(str(queue_path(config)))
    store.put(
        NewMessage(
            id="AAA",
            sender="alice@client.test",
            recipients=(
                NewRecipient("a@example.test"),
                NewRecipient("b@example.test", notify="FAILURE", orcpt="rfc822;B@Example.Test"),
            ),
            body=BODY,
            received_at=now - AAA_AGE,
            client_ip="127.0.0.2",
            helo="client.test",
            envid="ENV1",
            ret="HDRS",
        )
    )
    outcomes = [
        Outcome("a@example.test", QUEUED, "451 4.4.1 primary down", "mx1.example.test", now + 600),
        Outcome("b@example.test", DELIVERED, "250 2.0.0 ok", "mx1.example.test"),
    ]
    store.transaction(lambda s: s.record("AAA", outcomes))
    store.put(
        NewMessage(
            id="BBB",
            sender="",
            recipients=(NewRecipient("c@example.test"),),
            body=b"x" * 2000,
            received_at=now - BBB_AGE,
        )
    )
    store.hold(["BBB"])
    yield store
    store.close()


def relay(*args: str, config: Path | None = None) -> tuple[int, str, str]:
    result = run_relay(*args, *(["--config", str(config)] if config else []))
    return result.returncode, result.stdout.decode(), result.stderr.decode()


# -- listing ----------------------------------------------------------------------------------


def test_an_empty_queue_says_so(config: Path) -> None:
    Store(str(queue_path(config))).close()
    assert relay("queue", config=config) == (0, "Mail queue is empty\n", "")


@pytest.mark.parametrize(
    "args",
    [("queue",), ("queue", "--json"), ("status",), ("queue", "hold", "AAA"), ("queue", "flush")],
)
def test_a_queue_that_does_not_exist_is_an_error_not_an_empty_queue(
    config: Path, args: tuple[str, ...]
) -> None:
    """A wrong --config must not show "Mail queue is empty" over a full queue elsewhere; and
    `relay queue` run as root before the first start must not leave a root-owned queue."""
    code, out, err = relay(*args, config=config)
    assert (code, out) == (1, "")
    assert f"queue {queue_path(config)} does not exist" in err
    assert not queue_path(config).exists() and not queue_path(config).parent.exists()


def test_the_listing_reads_like_mailq(config: Path, queue: Store) -> None:
    code, out, err = relay("queue", config=config)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["-Queue", "ID-", "-Age-", "-Size-", "-Sender/Recipient-"]
    assert lines[1].split() == ["AAA", "2d3h", str(len(BODY)), "alice@client.test"]
    assert lines[2].split()[:4] == ["a@example.test", "(queued,", "1", "attempt,"]
    assert re.search(r"next in (9|10)m", lines[2])
    assert lines[3].strip() == "451 4.4.1 primary down"
    assert lines[4].split() == ["b@example.test", "(delivered,", "1", "attempt)"]
    assert lines[5] == ""
    # '!' marks a held message, as in Postfix; the null sender shows as <>.
    assert lines[6].split() == ["BBB!", "1h2m", "2000", "<>"]
    assert lines[7].split() == ["c@example.test", "(queued,", "0", "attempts)"]
    kbytes = (len(BODY) + 2000 + 1023) // 1024
    assert lines[-1] == f"-- {kbytes} Kbytes in 2 messages (1 held), 3 recipients."


RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def rfc3339(text: str) -> float:
    assert RFC3339.match(text), text
    return datetime.fromisoformat(text).timestamp()


def test_the_json_listing_has_every_contract_field(config: Path, queue: Store, now: float) -> None:
    code, out, err = relay("queue", "--json", config=config)
    assert (code, err) == (0, "")
    first, second = json.loads(out)
    assert set(first) >= {
        "id",
        "sender",
        "recipients",
        "size",
        "received_at",
        "state",
        "attempts",
        "next_attempt_at",
        "last_error",
    }
    assert (first["id"], first["sender"], first["size"], first["state"]) == (
        "AAA",
        "alice@client.test",
        len(BODY),
        "queued",
    )
    assert abs(rfc3339(first["received_at"]) - (now - AAA_AGE)) <= 1
    assert first["attempts"] == 1
    assert abs(rfc3339(first["next_attempt_at"]) - (now + 600)) <= 1
    assert first["last_error"] == "451 4.4.1 primary down"
    assert [
        {k: r[k] for k in ("address", "state", "attempts", "last_reply")}
        for r in first["recipients"]
    ] == [
        {
            "address": "a@example.test",
            "state": "queued",
            "attempts": 1,
            "last_reply": "451 4.4.1 primary down",
        },
        {
            "address": "b@example.test",
            "state": "delivered",
            "attempts": 1,
            "last_reply": "250 2.0.0 ok",
        },
    ]
    assert (second["id"], second["sender"], second["state"], second["attempts"]) == (
        "BBB",
        "",
        "held",
        0,
    )
    # A held message is not going to be tried: it has no next attempt.
    assert second["next_attempt_at"] is None and second["last_error"] is None
    assert second["recipients"][0]["next_attempt_at"] is None


def test_the_json_listing_of_an_empty_queue_is_an_empty_array(config: Path) -> None:
    Store(str(queue_path(config))).close()
    assert relay("queue", "--json", config=config) == (0, "[]\n", "")


# -- one message ------------------------------------------------------------------------------


def test_show_prints_the_envelope_and_every_attempt(config: Path, queue: Store, now: float) -> None:
    code, out, err = relay("queue", "show", "AAA", config=config)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[:9] == [
        "id: AAA",
        "state: queued",
        "sender: <alice@client.test>",
        f"size: {len(BODY)}",
        lines[4],
        "client: [127.0.0.2] helo=client.test",
        "smtputf8: no",
        "body: 7BIT",
        "dsn: envid=ENV1 ret=HDRS",
    ]
    assert abs(rfc3339(lines[4].removeprefix("received_at: ")) - (now - AAA_AGE)) <= 1
    assert "  <a@example.test> queued, attempts=1" in lines
    assert "    last reply: 451 4.4.1 primary down" in lines
    assert (
        "  <b@example.test> delivered, attempts=1 notify=FAILURE orcpt=rfc822;B@Example.Test"
        in lines
    )
    attempts = lines[lines.index("attempts:") + 1 :]
    assert [re.sub(r"^  \S+ ", "", line) for line in attempts] == [
        "<a@example.test> via mx1.example.test: 451 4.4.1 primary down",
        "<b@example.test> via mx1.example.test: 250 2.0.0 ok",
    ]
    assert "message" not in out


def test_show_body_prints_the_stored_bytes_exactly(config: Path, queue: Store) -> None:
    result = run_relay("queue", "show", "AAA", "--body", "--config", str(config))
    assert result.returncode == 0, result.stderr
    separator = b"\n" + b"-" * 20 + b" message " + b"-" * 20 + b"\n"
    head, found, body = result.stdout.partition(separator)
    assert found and head.startswith(b"id: AAA\n")
    assert body == BODY


def test_the_config_option_works_before_or_after_the_subcommand(config: Path, queue: Store) -> None:
    before = run_relay("queue", "--config", str(config), "show", "AAA")
    after = run_relay("queue", "show", "AAA", "--config", str(config))
    assert before.returncode == after.returncode == 0
    assert before.stdout == after.stdout


def test_relay_config_is_used_when_no_option_is_given(config: Path, queue: Store) -> None:
    result = run_relay("queue", "--json", env={"RELAY_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert [m["id"] for m in json.loads(result.stdout)] == ["AAA", "BBB"]


# -- changing the queue -----------------------------------------------------------------------


def states(config: Path) -> dict[str, str]:
    with open_store(queue_path(config)) as store:
        return {m.id: m.state for m in store.list_messages()}


def test_hold_and_release(config: Path, queue: Store) -> None:
    assert relay("queue", "hold", "AAA", config=config) == (0, "AAA: held\n", "")
    assert states(config) == {"AAA": HELD, "BBB": HELD}
    assert relay("queue", "release", "AAA", "BBB", config=config) == (
        0,
        "AAA: released\nBBB: released\n",
        "",
    )
    assert states(config) == {"AAA": QUEUED, "BBB": QUEUED}
    with open_store(queue_path(config)) as store:
        due = [m.id for m in store.due(time.time())]
    assert due == ["AAA", "BBB"], "released mail is due at once"


def test_delete(config: Path, queue: Store) -> None:
    assert relay("queue", "delete", "BBB", config=config) == (0, "BBB: deleted\n", "")
    assert states(config) == {"AAA": QUEUED}


def test_flush_all_and_flush_some(config: Path, queue: Store) -> None:
    assert relay("queue", "flush", config=config) == (0, "flushed 1 message\n", "")
    with open_store(queue_path(config)) as store:
        assert [m.id for m in store.due(time.time())] == ["AAA"]
    assert relay("queue", "flush", "AAA", config=config) == (0, "AAA: flushed\n", "")


def test_bounce(config: Path, queue: Store) -> None:
    assert relay("queue", "bounce", "AAA", config=config) == (0, "AAA: bounce requested\n", "")
    with open_store(queue_path(config)) as store:
        row = store.get("AAA")
    assert row is not None
    assert [(r.address, r.bounce_requested) for r in row.recipients] == [
        ("a@example.test", True),
        ("b@example.test", False),
    ]


def test_show_of_an_unknown_id_is_exit_1(config: Path, queue: Store) -> None:
    assert relay("queue", "show", "NOPE", config=config) == (
        1,
        "",
        "relay: no such message in the queue: NOPE\n",
    )


@pytest.mark.parametrize(
    ("args", "out"),
    [
        (("hold", "AAA", "NOPE"), "AAA: held\n"),
        (("release", "NOPE"), ""),
        (("delete", "NOPE", "AAA"), "AAA: deleted\n"),
        (("flush", "NOPE"), ""),
        (("bounce", "NOPE"), ""),
    ],
)
def test_a_batch_acts_on_every_known_id_names_each_unknown_and_exits_1(
    config: Path, queue: Store, args: tuple[str, ...], out: str
) -> None:
    """Like postsuper: one typo in a list of twenty ids must not leave the other nineteen."""
    assert relay("queue", *args, config=config) == (
        1,
        out,
        "relay: NOPE: no such message in the queue\n",
    )
    if "AAA" in args:
        with open_store(queue_path(config)) as store:
            row = store.get("AAA")
        assert row is None if args[0] == "delete" else row is not None and row.state == HELD


@pytest.mark.parametrize(
    "args",
    [
        ("frobnicate",),
        ("queue", "--bogus"),
        ("queue", "show"),
        ("queue", "show", "A", "B"),
        ("queue", "hold"),
        ("queue", "release"),
        ("queue", "delete"),
        ("queue", "bounce"),
        ("queue", "show", "AAA", "--config"),
        ("queue", "hold", "--all", "AAA"),
        ("queue", "delete", "--all", "--domain", "example.test"),
        ("queue", "hold", "--older-than", "soon"),
        ("serve", "--log-format", "xml"),
    ],
)
def test_bad_arguments_exit_2_with_usage(config: Path, args: tuple[str, ...]) -> None:
    result = run_relay(*args)
    assert result.returncode == 2
    assert result.stdout == b""
    assert b"Error: " in result.stderr


@pytest.mark.parametrize(
    ("args", "out", "left"),
    [
        (("hold", "--from", "alice@client.test"), "held 1 message\n", {"AAA": HELD, "BBB": HELD}),
        (("release", "--all"), "released 2 messages\n", {"AAA": QUEUED, "BBB": QUEUED}),
        (("delete", "--from", "<>"), "deleted 1 message\n", {"AAA": QUEUED}),
        (("delete", "--older-than", "1d"), "deleted 1 message\n", {"BBB": HELD}),
        (("delete", "--older-than", "3d"), "deleted 0 messages\n", {"AAA": QUEUED, "BBB": HELD}),
        # b@example.test was delivered: only a@ is still waiting in AAA
        (("bounce", "--to", "B@example.test"), "bounce requested for 0 messages\n", None),
        (
            ("delete", "--domain", "EXAMPLE.test", "--to", "c@example.test"),
            "deleted 1 message\n",
            {"AAA": QUEUED},
        ),
        (("flush", "--domain", "example.test"), "flushed 1 message\n", None),  # BBB is held
    ],
)
def test_commands_select_by_domain_sender_recipient_and_age(
    config: Path, queue: Store, args: tuple[str, ...], out: str, left: dict[str, str] | None
) -> None:
    assert relay("queue", *args, config=config) == (0, out, "")
    with open_store(queue_path(config)) as store:
        states = {m.id: m.state for m in store.list_messages()}
    assert states == (left or {"AAA": QUEUED, "BBB": HELD})


def test_every_operator_action_is_audited_with_who_ran_it(config: Path, queue: Store) -> None:
    relay("queue", "hold", "AAA", config=config)
    relay("queue", "release", "--all", config=config)
    relay("queue", "delete", "NOPE", config=config)  # nothing done: nothing to audit
    with open_store(queue_path(config)) as store:
        entries = store.unlogged_audit()
    assert [(e.action, e.ids, e.uid) for e in entries] == [
        ("hold", ["AAA"], os.getuid()),
        ("release", ["AAA", "BBB"], os.getuid()),
    ]
    assert entries[0].user == pwd.getpwuid(os.getuid()).pw_name


def test_a_queue_from_a_newer_relay_is_one_line_and_exit_1(config: Path, queue: Store) -> None:
    queue.conn.execute("PRAGMA user_version=99")
    code, out, err = relay("queue", config=config)
    assert (code, out) == (1, "")
    assert err == (
        "relay: queue schema version 99 is newer than this relay understands"
        f" ({SCHEMA_VERSION}): upgrade relay\n"
    )


def test_a_damaged_queue_is_one_line_and_exit_1(config: Path, queue: Store) -> None:
    queue.conn.execute("DROP TABLE recipients")
    assert relay("queue", config=config) == (
        1,
        "",
        "relay: queue error: no such table: recipients\n",
    )


def test_an_invalid_config_stops_queue_commands_with_exit_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, smtp={"max_hops": "many"})
    code, out, err = relay("queue", config=path)
    assert (code, out) == (2, "")
    assert err == f"{path}: smtp.max_hops: expected a whole number, got 'many'\n"


# -- help -------------------------------------------------------------------------------------


def every_command(
    group: click.Group, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from every_command(command, (*path, name))


COMMANDS = [path for path, _ in every_command(main)]


def test_the_command_tree_is_the_documented_one() -> None:
    assert set(COMMANDS) >= {
        ("serve",),
        ("check-config",),
        ("queue",),
        ("queue", "show"),
        ("queue", "hold"),
        ("queue", "release"),
        ("queue", "delete"),
        ("queue", "flush"),
        ("queue", "bounce"),
    }


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_has_help_text(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"], prog_name="relay")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: relay {' '.join(path)} ")
    description = result.output.split("\n\n")[1].strip()
    assert len(description) > 20, result.output


def test_the_installed_console_script_runs(config: Path) -> None:
    import shutil
    import subprocess
    import sys

    script = Path(sys.executable).with_name("relay")
    assert script.exists() or shutil.which("relay"), "pip install -e . provides `relay`"
    result = subprocess.run([str(script), "--help"], capture_output=True, timeout=30, check=False)
    assert result.returncode == 0
    assert b"relay: a backup MX" in result.stdout


# -- on a running server ----------------------------------------------------------------------


def test_the_cli_works_on_the_queue_of_a_running_server(
    tmp_path: Path, relay_process: Callable[[Path], RelayProcess]
) -> None:
    config = write_config(tmp_path, metrics={"listen": ""})
    server = relay_process(config)
    assert server.address is not None
    first = send_mail(server.address, [f"a@{DOMAIN}"])
    second = send_mail(server.address, [f"b@{DOMAIN}", f"c@{DOMAIN}"])

    code, out, _ = relay("queue", "--json", config=config)
    assert code == 0
    assert [m["id"] for m in json.loads(out)] == [first, second]

    # The CLI writes while the server keeps accepting mail: neither waits for the other.
    sent: list[str] = []
    errors: list[BaseException] = []

    def keep_sending() -> None:
        try:
            for i in range(15):
                assert server.address is not None
                sent.append(send_mail(server.address, [f"more{i}@{DOMAIN}"]))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    assert relay("queue", "hold", first, config=config) == (0, f"{first}: held\n", "")
    assert relay("queue", "delete", second, config=config) == (0, f"{second}: deleted\n", "")
    code, out, _ = relay("queue", "show", first, config=config)
    assert code == 0 and "state: held" in out
    sender.join(60)
    assert not errors, errors
    assert len(sent) == 15

    code, out, _ = relay("queue", "--json", config=config)
    listed = {m["id"]: m["state"] for m in json.loads(out)}
    assert listed == {first: "held"} | dict.fromkeys(sent, "queued")
    assert server.stop() == 0


def deferred_for_an_hour(config: Path, queue_id: str, recipient: str) -> None:
    """A message that was tried once and is not due again for an hour."""
    now = time.time()
    with open_store(queue_path(config)) as store:
        store.put(
            NewMessage(
                id=queue_id,
                sender="sender@client.test",
                recipients=(NewRecipient(recipient),),
                body=b"Subject: " + queue_id.encode() + b"\r\n\r\nbody\r\n",
                received_at=now - 60,
            )
        )
        outcome = Outcome(recipient, QUEUED, "451 4.3.0 not now", "127.0.0.2", now + 3600)
        store.transaction(lambda s: s.record(queue_id, [outcome]))


async def test_cli_changes_reach_a_running_server_within_two_seconds(
    tmp_path: Path, relay_process: Callable[[Path], RelayProcess]
) -> None:
    """Hold, flush and release from the CLI steer the running server's deliveries."""
    primary = await FakePrimary(address="127.0.0.2").start()
    try:
        config = write_config(
            tmp_path,
            metrics={"listen": ""},
            domain=[{"name": DOMAIN, "primary": [f"127.0.0.2:{primary.port}"]}],
        )
        deferred_for_an_hour(config, "KEPT", f"kept@{DOMAIN}")
        deferred_for_an_hour(config, "HELD", f"held@{DOMAIN}")
        server = await asyncio.to_thread(relay_process, config)

        def delivered_to() -> list[str]:
            return [rcpt for t in primary.delivered for rcpt, _ in t.rcpts]

        async def cli(*args: str) -> tuple[int, str, str]:
            return await asyncio.to_thread(relay, "queue", *args, config=config)

        async def within_two_seconds(recipient: str) -> None:
            await asyncio.to_thread(
                wait_for, lambda: recipient in delivered_to(), f"delivery to {recipient}", 2.0
            )

        assert await cli("hold", "HELD") == (0, "HELD: held\n", "")
        assert await cli("flush") == (0, "flushed 1 message\n", "")
        await within_two_seconds(f"kept@{DOMAIN}")
        await asyncio.to_thread(wait_for, lambda: "KEPT" not in states(config), "KEPT to go")
        assert f"held@{DOMAIN}" not in delivered_to()
        assert await asyncio.to_thread(states, config) == {"HELD": HELD}

        assert await cli("release", "HELD") == (0, "HELD: released\n", "")
        await within_two_seconds(f"held@{DOMAIN}")
        await asyncio.to_thread(wait_for, lambda: not states(config), "an empty queue")
        assert sorted(delivered_to()) == [f"held@{DOMAIN}", f"kept@{DOMAIN}"]

        # The audit trail: each command's line in the server's log, with who ran it.
        user = f"uid {os.getuid()} ({pwd.getpwuid(os.getuid()).pw_name})"
        expected = [f"{user} ran hold", f"{user} ran flush", f"{user} ran release"]

        def audited() -> list[str]:
            return re.findall(r"operator: (uid \d+ \(\S+\) ran \w+)", server.log())

        await asyncio.to_thread(wait_for, lambda: audited() == expected, "the audit lines")
        assert re.search(r"ran hold at \S+ on 1 message: HELD$", server.log(), re.M)
        assert await asyncio.to_thread(server.stop) == 0
    finally:
        await primary.stop()


def test_after_a_drain_the_running_server_gives_the_space_back_and_status_shows_it(
    tmp_path: Path, relay_process: Callable[[Path], RelayProcess]
) -> None:
    """An outage filled the queue; the operator deletes it all (or it drains): the file shrinks
    without a restart, and `relay status` shows its size and free pages."""
    config = write_config(tmp_path)
    with open_store(queue_path(config)) as store:
        for n in range(120):
            body = b"Subject: big\r\n\r\n" + os.urandom(50_000).hex().encode()
            store.put(
                NewMessage(
                    id=f"BIG{n:04d}",
                    sender="alice@client.test",
                    recipients=(NewRecipient(f"bob@{DOMAIN}"),),
                    body=body,
                    received_at=time.time(),
                )
            )
    server = relay_process(config)
    code, out, _ = relay("status", config=config)
    assert code == 0
    size = re.search(r"^queue \S+: ([\d.]+) MB, ([\d,]+) free pages? \((\d+)%\)$", out, re.M)
    assert size is not None and float(size.group(1)) > 10, out
    assert relay("queue", "delete", "--all", config=config) == (0, "deleted 120 messages\n", "")
    line = wait_for(
        lambda: re.search(r"space returned: queue file ([\d.]+) MB -> ([\d.]+) MB", server.log()),
        "the server to give the space back",
    )
    assert float(line.group(1)) > 10 and float(line.group(2)) < 1
    after = re.search(r"^queue \S+: ([\d.]+) MB", relay("status", config=config)[1], re.M)
    assert after is not None and float(after.group(1)) < 1


def test_show_says_what_happened_to_attempts_that_reached_no_host(
    config: Path, queue: Store, now: float
) -> None:
    """`via -` said nothing: an attempt without a host was not tried, found no route, or could
    not connect, and `relay queue show` says which."""
    replies = [
        "421 4.4.1 delivery temporarily suspended: connection refused by mx1.example.test",
        "451 4.4.3 example.test: DNS lookup failed (SERVFAIL)",
        "421 4.4.1 connection refused by mx1.example.test[127.0.0.6]:25",
        "421 4.4.1 no answer from 127.0.0.6:25 at connect",
    ]
    for reply in replies:
        outcome = Outcome("a@example.test", QUEUED, reply, "", now + 600)
        queue.transaction(lambda s, o=outcome: s.record("AAA", [o]))
    code, out, _ = relay("queue", "show", "AAA", config=config)
    assert code == 0
    attempts = out.split("attempts:\n", 1)[1].splitlines()
    assert [line.split("> ", 1)[1].split(":", 1)[0] for line in attempts] == [
        "via mx1.example.test",
        "via mx1.example.test",
        "not tried (destination down, probing)",
        "no route",
        "connection refused",
        "no connection",
    ]
    assert " via -" not in out
