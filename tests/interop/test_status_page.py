"""The /status page as people see it: rendered by a real headless Chromium (Debian's chromium),
served by the real `relay serve` on its public status listener, during an outage and after.

Chromium renders the page with no JavaScript to run (there is none), and the text of the DOM it
dumps is what a person would read.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from html import unescape
from pathlib import Path

import pytest
from conftest import RelayProcess, wait_for

from tests.interop.mtas import SmtpSink, free_port, running
from tests.interop.support import RELAY_ADDRESS, relay_config, submit, wait_queue_empty

pytestmark = pytest.mark.interop

PRIMARY = "127.0.0.12"
DOMAIN = "example.test"


def rendered_text(url: str, profile: Path) -> str:
    """The page's text after Chromium loaded and rendered it."""
    done = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",  # as root in a container: Chromium's sandbox needs user namespaces
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.sub(r"(?s)<(style|head)\b.*?</\1>", " ", done.stdout)
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", body)).split())


def test_chromium_shows_the_outage_and_then_the_recovery(
    workdir: Path, tmp_path: Path, relay_process: Callable[[Path], RelayProcess]
) -> None:
    port = free_port(PRIMARY, RELAY_ADDRESS)
    status_port = free_port(RELAY_ADDRESS)
    config = relay_config(
        tmp_path,
        port,
        {DOMAIN: f"{PRIMARY}:{port}"},
        status={"listen": f"{RELAY_ADDRESS}:{status_port}", "public": True},
    )
    relay = relay_process(config)
    address = relay.address
    assert address is not None
    for _ in range(3):
        submit(address, "alice@sender.test", [f"bob@{DOMAIN}"], b"Subject: hi\r\n\r\nhello\r\n")
    url = f"http://{RELAY_ADDRESS}:{status_port}/status"
    profile = workdir / "chromium"

    def outage_shown() -> str | None:
        text = rendered_text(url, profile)
        return text if "down since" in text else None

    text = wait_for(outage_shown, "Chromium to show the primary down")
    assert "Mail status" in text and DOMAIN in text
    assert "Mail held here now 3 messages" in text
    assert "@" not in text

    with running(SmtpSink(workdir / "primary", PRIMARY, port)):
        wait_queue_empty(tmp_path / "queue" / "queue.db", "the queue to drain")

        def recovery_shown() -> str | None:
            text = rendered_text(url, profile)
            return text if "Mail server of the domain up" in text else None

        text = wait_for(recovery_shown, "Chromium to show the primary up")
    assert "Mail held here now 0 messages" in text
    assert "Oldest waiting message none waiting" in text
