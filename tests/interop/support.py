"""The relay side of the interop tests: its config, a client, and what its queue holds."""

from __future__ import annotations

import smtplib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conftest import Reply, open_store, wait_for, write_config

RELAY_ADDRESS = "127.0.0.20"
DEADLINE = 60.0


def relay_config(tmp_path: Path, port: int, domains: dict[str, str], **overrides: Any) -> Path:
    """A config for `relay serve` on RELAY_ADDRESS:port; `domains` maps names to one primary
    ("host:port", or "" for an MX lookup). Probes every second so tests wait little."""
    sections: dict[str, Any] = {
        "smtp": {"listen": [f"{RELAY_ADDRESS}:{port}"]},
        "metrics": {"listen": ""},
        "delivery": {"probe_interval": "1s"},
        "domain": [
            {"name": name, "primary": [primary] if primary else []}
            for name, primary in domains.items()
        ],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(sections.get(key), dict):
            sections[key] = {**sections[key], **value}
        else:
            sections[key] = value
    return write_config(tmp_path, **sections)


def submit(
    address: tuple[str, int],
    sender: str,
    recipients: Sequence[str],
    content: bytes,
    mail_options: Sequence[str] = (),
) -> str:
    """One message through smtplib, UTF-8 on the command line when SMTPUTF8 is asked for; the
    queue id from the 250. `content` must use CRLF and have no line starting with a dot that
    smtplib would not stuff: what the relay stores is then exactly `content`."""
    with smtplib.SMTP(*address, local_hostname="client.test", timeout=DEADLINE) as client:
        if "SMTPUTF8" in mail_options:
            client.command_encoding = "utf-8"
        client.ehlo()
        code, text = client.mail(sender, list(mail_options))
        assert code == 250, (code, text)
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            assert code == 250, (recipient, code, text)
        code, text = client.data(content)
        assert code == 250, (code, text)
        return Reply(code, (f"{code} {text.decode()}",)).queue_id


def stored_bodies(queue: Path, ids: Sequence[str]) -> dict[str, bytes]:
    """The bytes the relay will send for each queued message (its Received header on top)."""
    with open_store(queue) as store:
        bodies = {queue_id: store.body(queue_id) for queue_id in ids}
    missing = [queue_id for queue_id, body in bodies.items() if body is None]
    assert not missing, f"not in the queue: {missing}"
    return {queue_id: body for queue_id, body in bodies.items() if body is not None}


def queue_empty(queue: Path) -> bool:
    with open_store(queue) as store:
        return not store.list_messages()


def wait_queue_empty(queue: Path, what: str, timeout: float = DEADLINE) -> None:
    wait_for(lambda: queue_empty(queue), what, timeout)
