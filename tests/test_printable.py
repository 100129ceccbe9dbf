"""Terminal and log injection: what strangers send is shown escaped, never acted on.

A HELO name, an address or a header is the sender's text; the operator reads it in the log
and through `relay queue`. ESC ] 0 ; … BEL retitles their terminal, a CR rewrites the line
shown, U+202E reverses it. Every text log line and CLI line goes through `words.printable`;
JSON goes through `words.json_text`, which keeps the value and escapes the characters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pty
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.ops.logs import JsonFormatter, TextFormatter
from relay.store import NewMessage, NewRecipient
from relay.words import json_text, printable
from tests.conftest import (
    DEADLINE,
    DOMAIN,
    RelayProcess,
    conversation,
    dot_stuff,
    make_config,
    open_store,
    relay_command,
    relay_env,
    run_relay,
    write_config,
)

OSC_TITLE = "\x1b]0;pwned\x07"  # xterm: set the window title to "pwned"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("bob@example.test", "bob@example.test"),
        ("Jörg Müller <j@ex.test> \\x1b", "Jörg Müller <j@ex.test> \\x1b"),
        (f"a{OSC_TITLE}b", "a\\x1b]0;pwned\\x07b"),
        ("line\r\nforged", "line\\x0d\\x0aforged"),
        ("tab\tdel\x7f c1\x9b nul\x00", "tab\\x09del\\x7f c1\\x9b nul\\x00"),
        ("\u202egnp.exe \u2028 \u200b \u00ad", "\\u202egnp.exe \\u2028 \\u200b \\xad"),
        ("bad byte \udcff", "bad byte \\xff"),  # invalid UTF-8 kept by surrogateescape
        ("\U000f0000", "\\U000f0000"),  # private use, plane 15
    ],
)
def test_every_character_that_is_not_printable_is_shown_as_an_escape(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert printable(text).isprintable()


def test_json_text_keeps_the_value_and_escapes_what_a_terminal_would_act_on() -> None:
    value = {"to": f"x{OSC_TITLE}\r\u202e\x7f\x9b\udcff\U000f0000é", "n": [1, None]}
    for indent in (None, 2):
        text = json_text(value, indent=indent)
        assert json.loads(text) == value
        assert all(c.isprintable() or c == "\n" for c in text), text
    assert "é" in json_text(value)  # readable names stay readable


def log_record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("relay.intake", logging.INFO, "", 0, message, args, None)


def test_a_text_log_line_is_one_printable_line_whatever_it_quotes() -> None:
    record = log_record("reject RCPT from [%s]: relay denied to=<%s>", "192.0.2.1", "a\r\nb")
    line = TextFormatter().format(record)
    assert line.endswith(
        "relay.intake INFO reject RCPT from [192.0.2.1]: relay denied to=<a\\x0d\\x0ab>"
    )
    try:
        raise ValueError(f"reply {OSC_TITLE}")
    except ValueError:
        record = log_record("failed")
        record.exc_info = sys.exc_info()
    text = TextFormatter().format(record)
    assert "ValueError: reply \\x1b]0;pwned\\x07" in text.splitlines()
    entry = JsonFormatter().format(log_record("to=<%s>", f"x{OSC_TITLE}\u202e"))
    assert json.loads(entry)["message"] == f"to=<x{OSC_TITLE}\u202e>"
    assert entry.isprintable()


def raw_characters(text: str) -> list[str]:
    """Characters a terminal would act on: every one that is not printable, line breaks aside."""
    return sorted({c for c in text if not c.isprintable() and c != "\n"})


async def test_hostile_text_accepted_over_smtp_reaches_log_and_queue_listing_escaped(
    tmp_path: Path, relay_process: Callable[[Path], RelayProcess]
) -> None:
    config = write_config(tmp_path, metrics={"listen": ""})  # no recipient validation
    server = relay_process(config)
    assert server.address is not None
    helo = f"evil{OSC_TITLE}\rhost"
    sender = "\u202egnp.exe@sender.test"  # shown reversed: "exe.png"
    recipient = f"line\u2028sep\u200b@{DOMAIN}"
    async with conversation(server.address) as talk:
        assert (await talk.command(f"EHLO {helo}")).code == 250
        assert (await talk.command(f"MAIL FROM:<{sender}> SMTPUTF8")).code == 250
        # Controls in an address are refused outright (501, the courier could not send them).
        refused = await talk.command(f'RCPT TO:<"{OSC_TITLE}\r"@{DOMAIN}>')
        assert refused.code == 501, refused
        assert (await talk.command(f"RCPT TO:<{recipient}>")).code == 250
        assert (await talk.command("DATA")).code == 354
        body = f"Subject: {OSC_TITLE}hi\r\n\r\nhello\r\n".encode()
        await talk.send(dot_stuff(body))
        queued = await talk.reply()
        assert queued.code == 250, queued
    queue_id = queued.queue_id

    listing = await asyncio.to_thread(run_relay, "queue", "--config", str(config))
    show = await asyncio.to_thread(run_relay, "queue", "show", queue_id, "--config", str(config))
    as_json = await asyncio.to_thread(run_relay, "queue", "--json", "--config", str(config))
    assert server.stop() == 0
    log = server.log_path.read_bytes().decode("utf-8")

    outputs = {"queue": listing, "queue show": show, "queue --json": as_json}
    for command, result in outputs.items():
        assert result.returncode == 0, (command, result.stderr)
        text = result.stdout.decode("utf-8")
        assert raw_characters(text) == [], (command, text)
    assert raw_characters(log) == [], log
    assert "\\u202egnp.exe" in listing.stdout.decode()
    assert "\\u2028sep\\u200b" in listing.stdout.decode()
    shown = show.stdout.decode()
    assert "helo=evil\\x1b]0;pwned\\x07\\x0dhost" in shown
    assert "accepted from=<\\u202egnp.exe@sender.test>" in log
    assert "helo=evil\\x1b]0;pwned\\x07\\x0dhost" in log
    # JSON keeps the exact value: a program reading it sees what the sender sent.
    (message,) = json.loads(as_json.stdout)
    assert message["sender"] == sender
    assert message["recipients"][0]["address"] == recipient


def on_a_terminal(*args: str) -> bytes:
    """What `relay ARGS…` writes when its standard output is a terminal (a pseudo-terminal)."""
    primary, secondary = pty.openpty()
    try:
        with subprocess.Popen(
            relay_command(*args), env=relay_env(), stdout=secondary, stderr=subprocess.PIPE
        ) as process:
            os.close(secondary)
            output = bytearray()
            while True:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: the command exited and closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            assert process.stderr is not None
            errors = process.stderr.read()
            assert process.wait(DEADLINE) == 0, errors
        return bytes(output)
    finally:
        os.close(primary)


def test_queue_show_body_is_escaped_on_a_terminal_and_exact_when_piped(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    content = f"Subject: {OSC_TITLE}hi\r\nX-Bidi: \u202egnp.exe\r\n\r\nbody\r\n".encode()
    with open_store(make_config(tmp_path).queue.path) as store:
        store.put(
            NewMessage(
                id="25XQTERMINAL0001",
                sender="s@client.test",
                recipients=(NewRecipient(f"r@{DOMAIN}"),),
                body=content,
                received_at=time.time(),
                client_ip="127.0.0.1",
                helo="client.test",
            )
        )
    args = ("queue", "show", "25XQTERMINAL0001", "--body", "--config", str(config))

    piped = run_relay(*args)
    shown = on_a_terminal(*args).decode().replace("\r\n", "\n")  # the tty adds CRs

    assert piped.stdout.endswith(b"-" * 20 + b" message " + b"-" * 20 + b"\n" + content)
    assert raw_characters(shown) == [], shown
    assert shown.endswith("Subject: \\x1b]0;pwned\\x07hi\nX-Bidi: \\u202egnp.exe\n\nbody\n"), shown
