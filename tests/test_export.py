"""`relay queue export` (issue 16 section 2): held mail out of a live queue, read-only, as .eml
files with the stored bytes or one mboxrd file, for the selections of the other queue commands.

Mail goes in over real SMTP to a running relay whose primary is down; the real CLI exports it
beside the running server.
"""

from __future__ import annotations

import asyncio
import functools
import mailbox
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import (
    DOMAIN,
    open_store,
    relay_command,
    relay_env,
    send_mail,
    smtp_address,
    write_config,
)

from relay.service import Relay

RelayFactory = Callable[..., Awaitable[Relay]]
TRICKY = (
    b"From: <alice@client.test>\r\nSubject: dots and Froms\r\n\r\n"
    b"From here on, a line an mbox reader would split at.\r\n>From a quoted one.\r\n"
    b".a dot-stuffed line\r\nlast\r\n"
)


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        relay_command("queue", "export", *args, "--config", str(config)),
        capture_output=True,
        env=relay_env(),
        timeout=30,
    )


@pytest.fixture
async def queued(relay_factory: RelayFactory, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """Three messages held for a down primary: two for bob, one for carol from another sender."""
    server = await relay_factory()
    address = smtp_address(server)
    ids = [
        await asyncio.to_thread(send_mail, address, [f"bob@{DOMAIN}"], TRICKY),
        await asyncio.to_thread(send_mail, address, [f"bob@{DOMAIN}"], b"Subject: 2\r\n\r\nx\r\n"),
        await asyncio.to_thread(
            functools.partial(send_mail, sender="eve@other.test"),
            address,
            [f"carol@{DOMAIN}"],
            b"Subject: 3\r\n\r\ny\r\n",
        ),
    ]
    with open_store(server.config.queue.path) as store:
        stored = {i: store.body(i) or b"" for i in ids}
    config = write_config(tmp_path, "cli.toml", queue={"path": server.config.queue.path})
    return config, stored


async def test_eml_files_hold_the_stored_bytes_exactly(
    queued: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    config, stored = queued
    out = tmp_path / "out"
    out.mkdir()
    done = await asyncio.to_thread(cli, config, "--to", f"bob@{DOMAIN}", "--output", str(out))
    assert done.returncode == 0, done.stderr
    files = {p.stem: p.read_bytes() for p in out.iterdir()}
    bob = {i: b for i, b in stored.items() if b.endswith((TRICKY, b"x\r\n"))}
    assert files == bob and len(files) == 2
    assert done.stdout.decode().strip() == f"exported 2 messages to {out}"

    again = await asyncio.to_thread(cli, config, "--to", f"bob@{DOMAIN}", "--output", str(out))
    assert again.returncode == 1 and b"exist already: add --force" in again.stderr
    forced = await asyncio.to_thread(
        cli, config, "--to", f"bob@{DOMAIN}", "--output", str(out), "--force"
    )
    assert forced.returncode == 0
    one = next(iter(stored))
    single = await asyncio.to_thread(cli, config, one)
    assert single.returncode == 0 and single.stdout == stored[one]  # one message to stdout


async def test_an_mbox_reads_back_into_the_same_messages(
    queued: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    config, stored = queued
    done = await asyncio.to_thread(cli, config, "--all", "--format", "mbox")
    assert done.returncode == 0, done.stderr
    path = tmp_path / "held.mbox"
    path.write_bytes(done.stdout)
    box = mailbox.mbox(str(path))
    try:
        messages = [bytes(m.as_bytes()) for m in box]
        senders = [m.get_from().split()[0] for m in box]
    finally:
        box.close()
    assert len(messages) == 3
    assert sorted(senders) == ["eve@other.test", "sender@client.test", "sender@client.test"]

    def unquoted(raw: bytes) -> bytes:  # mboxrd: one '>' off every quoted From line
        return b"\n".join(
            line[1:] if line.lstrip(b">").startswith(b"From ") and line.startswith(b">") else line
            for line in raw.split(b"\n")
        )

    expected = sorted(body.replace(b"\r\n", b"\n") for body in stored.values())
    found = sorted(unquoted(m).rstrip(b"\n") + b"\n" for m in messages)
    assert found == expected
    assert b"\n>From here on" in done.stdout and b"\n>>From a quoted one." in done.stdout

    file_out = await asyncio.to_thread(
        cli, config, "--from", "eve@other.test", "--format", "mbox", "--output", str(path)
    )
    assert file_out.returncode == 1 and b"exists: add --force" in file_out.stderr


async def test_export_refuses_what_it_cannot_do_precisely(
    queued: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    config, stored = queued
    assert (await asyncio.to_thread(cli, config)).returncode == 2  # nothing selected
    many = await asyncio.to_thread(cli, config, "--all")
    assert many.returncode == 2 and b"exactly one queue id" in many.stderr
    missing = await asyncio.to_thread(cli, config, "NOSUCHID", "--format", "mbox")
    assert missing.returncode == 1 and b"NOSUCHID: no such message" in missing.stderr
    nothing = await asyncio.to_thread(cli, config, "--domain", "nobody.test", "--format", "mbox")
    assert nothing.returncode == 1 and b"no message selected" in nothing.stderr
    not_dir = await asyncio.to_thread(cli, config, "--all", "--output", str(tmp_path / "x.eml"))
    assert not_dir.returncode == 2 and b"is not a directory" in not_dir.stderr
    with open_store(tmp_path / "queue" / "queue.db") as store:  # read-only: all still queued
        rows = store.list_messages()
    assert sorted(r.id for r in rows) == sorted(stored)
    assert all(r.state == "queued" for r in rows)
