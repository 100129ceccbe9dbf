"""Rescue mailboxes read over IMAP from a real Dovecot (Debian's dovecot-imapd) running the
shipped deploy/dovecot/dovecot.conf, beside the real `relay serve` during an outage.

Byte-exact for the person granted access, nothing for anyone else, and gone after the primary
came back and rescue_keep passed, while the primary has the original.
"""

from __future__ import annotations

import imaplib
import shutil
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from conftest import RelayProcess, open_store, relay_command, relay_env, wait_for

from tests.interop.mtas import DovecotImap, SmtpSink, free_port, running
from tests.interop.support import RELAY_ADDRESS, relay_config, submit, wait_queue_empty

pytestmark = pytest.mark.interop

PRIMARY = "127.0.0.13"
IMAP = "127.0.0.14"
DOMAIN = "example.test"
CONTENT = b"From: alice@sender.test\r\nSubject: the contract\r\n\r\nSigned, at last.\r\n"


def grant(config: Path, address: str) -> str:
    done = subprocess.run(
        relay_command("rescue", "grant", address, "--config", str(config)),
        capture_output=True,
        text=True,
        env=relay_env(),
        timeout=30,
        check=True,
    )
    return done.stdout.splitlines()[1].removeprefix("password: ")


def inbox(port: int, user: str, password: str, ca: trustme.CA) -> list[bytes]:
    """Every message of the user's INBOX, as IMAP gives it, over STARTTLS (verified)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with imaplib.IMAP4(IMAP, port, timeout=30) as client:
        client.starttls(context)
        client.login(user, password)
        client.select("INBOX", readonly=True)
        _, numbers = client.search(None, "ALL")
        found = []
        for number in numbers[0].split():
            _, data = client.fetch(number, "(BODY.PEEK[])")
            found.append(data[0][1])
        return found


def test_a_granted_person_reads_held_mail_over_dovecot_and_nobody_else_does(
    workdir: Path, tmp_path: Path, relay_process: Callable[[Path], RelayProcess]
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test", IMAP)
    cert_path, key_path = workdir / "imap-cert.pem", workdir / "imap-key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    rescue = workdir / "rescue"
    rescue.mkdir()
    shutil.chown(rescue, "nobody", "nogroup")  # Dovecot's user: the relay hands it its copies
    port = free_port(PRIMARY, RELAY_ADDRESS)
    imap_port = free_port(IMAP)
    config = relay_config(
        tmp_path,
        port,
        {DOMAIN: f"{PRIMARY}:{port}"},
        domain=[
            {
                "name": DOMAIN,
                "primary": [f"{PRIMARY}:{port}"],
                "recipients": ["bob", "carol"],
                "rescue": True,
                "rescue_after": "0s",
                "rescue_keep": "2s",
            }
        ],
        rescue={"path": str(rescue)},
    )
    relay = relay_process(config)
    assert relay.address is not None
    bob_password = grant(config, f"bob@{DOMAIN}")
    queue_id = submit(relay.address, "alice@sender.test", [f"bob@{DOMAIN}"], CONTENT)
    submit(relay.address, "alice@sender.test", [f"carol@{DOMAIN}"], b"Subject: x\r\n\r\nx\r\n")
    queue = tmp_path / "queue" / "queue.db"
    with open_store(queue) as store:
        stored = store.body(queue_id)
    assert stored is not None and stored.endswith(CONTENT)

    with running(DovecotImap(workdir / "dovecot", IMAP, imap_port, rescue, cert_path, key_path)):
        messages = wait_for(lambda: inbox(imap_port, f"Bob@{DOMAIN}", bob_password, ca), "copy")
        assert messages == [stored]  # byte for byte, our Received header included
        for user, password in ((f"bob@{DOMAIN}", "wrong"), (f"carol@{DOMAIN}", bob_password)):
            with pytest.raises(imaplib.IMAP4.error):
                inbox(imap_port, user, password, ca)

        with running(SmtpSink(workdir / "primary", PRIMARY, port)):
            wait_queue_empty(queue, "the originals delivered to the primary")
            wait_for(
                lambda: inbox(imap_port, f"bob@{DOMAIN}", bob_password, ca) == [],
                "the copy removed rescue_keep after delivery",
            )
            dumps = SmtpSink(workdir / "primary", PRIMARY, port).dumps
            delivered = b"".join(path.read_bytes() for path in dumps.iterdir())
            assert CONTENT.split(b"\r\n\r\n")[1] in delivered.replace(b"\n", b"\r\n")
