"""The /status page (issue 16 section 4): what people waiting for their mail are shown.

Fetched over HTTP from a running relay during an outage and after recovery; read as a browser
would show it (the text of the HTML, without tags). The interop suite renders it in a real
headless Chromium too (tests/interop/test_status_page.py).
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from html.parser import HTMLParser
from typing import Any

import pytest
from conftest import DEADLINE, DOMAIN, metrics_url, open_store, send_mail, smtp_address
from hostile import eventually

from relay import config as config_module
from relay.service import Relay
from tests.fakeprimary import FakePrimary, fake_primary, unused_port

__all__ = ["fake_primary"]

RelayFactory = Callable[..., Awaitable[Relay]]
Start = Callable[..., Awaitable[FakePrimary]]
PRIMARY = "127.0.0.5"


def queued(server: Relay) -> int:
    with open_store(server.config.queue.path) as store:
        return len(store.list_messages())


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.refresh: str | None = None
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "meta" and values.get("http-equiv") == "refresh":
            self.refresh = values.get("content")
        self.scripts += tag == "script"

    def handle_data(self, data: str) -> None:
        if data.strip():
            self.parts.append(" ".join(data.split()))


def fetch(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


async def page_text(url: str) -> tuple[str, _Text]:
    status, ctype, body = await asyncio.to_thread(fetch, url)
    assert (status, ctype) == (200, "text/html; charset=utf-8")
    parser = _Text()
    parser.feed(body)
    return " | ".join(parser.parts), parser


async def page_until(url: str, wanted: str) -> tuple[str, _Text]:
    deadline = time.monotonic() + DEADLINE
    while True:
        text, parsed = await page_text(url)
        if wanted in text:
            return text, parsed
        assert time.monotonic() < deadline, f"the page never said {wanted!r}: {text}"
        await asyncio.sleep(0.05)


async def test_the_page_shows_an_outage_then_the_recovery_without_naming_anyone(
    relay_factory: RelayFactory, fake_primary: Start
) -> None:
    port = unused_port(PRIMARY)
    server = await relay_factory(
        domain=[{"name": DOMAIN, "primary": [f"{PRIMARY}:{port}"], "tls": "none"}],
        delivery={"probe_interval": "0.1s"},
    )
    for _ in range(2):
        await asyncio.to_thread(
            send_mail,
            smtp_address(server),
            [f"bob@{DOMAIN}"],
            b"Subject: secret plans\r\n\r\nx\r\n",
        )
    await eventually(lambda: server.health.is_down(DOMAIN), "the outage noticed")
    url = metrics_url(server, "/status")
    # The page reads the state the server saves in the queue database, a write behind the
    # in-memory one: wait for the page itself to say so.
    text, parsed = await page_until(url, f"{DOMAIN} | Mail server of the domain | down | since 20")
    assert "Mail held here now | 2 messages" in text
    assert "Oldest waiting message | " in text and " ago" in text
    assert "Last delivery to it | none recorded" in text
    assert parsed.refresh == "30" and parsed.scripts == 0  # refreshes itself, no JavaScript
    assert "@" not in text and "secret" not in text  # no address, no subject
    assert "refused" not in text and PRIMARY not in text  # no error text, no internal host

    await fake_primary(address=PRIMARY, port=port)

    delivered = await eventually(
        lambda: not server.health.is_down(DOMAIN) and not queued(server), "the recovery"
    )
    assert delivered
    text, _ = await page_until(url, "| up | since 20")
    assert "Mail held here now | 0 messages" in text
    assert "Oldest waiting message | none waiting" in text
    assert "Last delivery to it | 20" in text


async def test_a_public_listener_serves_the_page_and_nothing_else(
    relay_factory: RelayFactory,
) -> None:
    server = await relay_factory(status={"listen": "127.0.0.1:0", "public": True})
    assert server.status_http_server is not None
    host, port = server.status_http_server.sockets[0].getsockname()[:2]
    text, _ = await page_text(f"http://{host}:{port}/status")
    assert f"{DOMAIN} | Mail server of the domain | not checked yet" in text
    for private in ("/metrics", "/healthz"):
        status, _, _ = await asyncio.to_thread(fetch, f"http://{host}:{port}{private}")
        assert status == 404, private


@pytest.mark.parametrize(
    ("status", "problem"),
    [
        ({"listen": "0.0.0.0:8080"}, "status.listen: a listener of its own serves the page"),
        ({"public": "yes"}, "status.public: expected true or false"),
    ],
)
def test_a_public_page_must_be_asked_for(
    status: dict[str, Any], problem: str, tmp_path: Any
) -> None:
    from conftest import config_mapping

    with pytest.raises(config_module.ConfigError) as raised:
        config_module.from_mapping(config_mapping(tmp_path, status=status))
    assert any(problem in line for line in raised.value.problems), raised.value.problems
