"""A tiny rspamd for tests: an asyncio HTTP/1.1 server on 127.0.0.1 answering `POST /checkv2`.

It records each request (its headers in order, its body) and answers what the test set: a JSON
verdict (`answer`), raw bytes (`raw`, for garbage), after an optional `delay` (for the deadline).
The real rspamd is in tests/interop/test_rspamd.py; this one lets the main suite run every action
and every failure in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


@dataclass
class FakeRspamd:
    answer: dict[str, Any] = field(default_factory=lambda: {"action": "no action", "score": 0.5})
    raw: bytes | None = None  # sent instead of a JSON answer when set
    delay: float = 0.0
    requests: list[Request] = field(default_factory=list)
    server: asyncio.Server | None = None
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> FakeRspamd:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def stop(self) -> None:
        for task in self.handlers:  # a slow answer still waiting: the test is over
            task.cancel()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            method, path, _ = (await reader.readline()).decode().split(" ", 2)
            headers = []
            while (line := await reader.readline()).strip():
                name, _, value = line.decode("utf-8").partition(":")
                headers.append((name.strip(), value.strip()))
            length = int(dict((k.lower(), v) for k, v in headers)["content-length"])
            body = await reader.readexactly(length)
            self.requests.append(Request(method, path, headers, body))
            if self.delay:
                await asyncio.sleep(self.delay)  # the slow rspamd under test, not a wait
            if self.raw is not None:
                writer.write(self.raw)
            else:
                payload = json.dumps(self.answer).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                    + payload
                )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self.handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
