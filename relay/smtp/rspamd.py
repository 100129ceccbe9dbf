"""Content filtering through rspamd, the engine postmasters already run: one check per message.

At the end of DATA, before the 250, the message goes to rspamd's normal worker with its envelope
as headers of its HTTP protocol (`POST /checkv2`: IP, Helo, From, one Rcpt per recipient,
Queue-Id), and rspamd's action decides the reply: `reject` 550 5.7.1, `soft reject` and
`greylist` 451 4.7.1, `add header` and `rewrite subject` tag the message (`X-Spam: Yes`, the
Subject rspamd wrote), `no action` accepts. Every checked message carries `X-Spam-Score`, and
copies of our headers that the sender wrote are removed, so the primary can trust them.

When rspamd does not answer within `spam.rspamd_timeout` (down, slow, or an answer that is not
rspamd's JSON), `spam.rspamd_failure` decides: "accept" (the default: a backup MX that refuses
mail because its filter is down sends it back to a primary that is likely down too) stores it
with `X-Spam-Unchecked`, "tempfail" answers 451 4.7.1 as Postfix's
`milter_default_action = tempfail` does.

The HTTP client is a plain HTTP/1.1 POST on asyncio streams, one connection per message
(`Connection: close`, Content-Length both ways): a few dozen lines that never block the event
loop, where aiohttp would bring a connection pool, a cookie jar and a dozen dependencies for one
request to a neighbour on loopback. No exception of the transport leaves this module: each one
becomes a `RspamdError` and then the configured failure action.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from relay.config import SpamConfig
from relay.ops import metrics
from relay.ops.logs import fields
from relay.smtp.headers import edit, subject_of
from relay.words import one_line

log = logging.getLogger("relay.rspamd")

CHECK = "rspamd"  # the `check` label of the spam metrics
MAX_ANSWER = 1024 * 1024  # rspamd's JSON for one message is a few KB; more is not rspamd
DEFAULT_PORT = 11333  # rspamd's normal worker
REJECT = ("reject",)
DEFER = ("soft reject", "greylist")
# `discard` and `quarantine` (rspamd 2+) would have the relay drop or park mail: a backup MX hands
# it on tagged instead, and the primary, which knows its users, decides.
TAG = ("add header", "rewrite subject", "discard", "quarantine")
ACCEPT = ("no action",)
ACTIONS = REJECT + DEFER + TAG + ACCEPT
# Headers the relay writes: a sender's own copies are removed so that the primary can trust ours.
SPAM = "X-Spam"
SCORE = "X-Spam-Score"
UNCHECKED = "X-Spam-Unchecked"
OURS = (SPAM, SCORE, UNCHECKED)
SPAM_SUBJECT = "***SPAM*** "  # rspamd's default when its answer names no subject

_HEADER_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")  # RFC 5322 2.2 ftext
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Replies:
    """What the client is told; the detail (score, symbols) goes to the log and the headers."""

    REJECTED = "550 5.7.1 Spam message rejected"
    DEFERRED = "451 4.7.1 Try again later"
    UNAVAILABLE = "451 4.7.1 Service unavailable - try again later"


class RspamdError(Exception):
    """No usable answer: connection refused or reset, an HTTP error, or not rspamd's JSON."""


@dataclass(frozen=True)
class Transaction:
    """The envelope rspamd is told about: what it cannot read from the message itself."""

    client_ip: str
    helo: str
    sender: str  # "" for the null reverse-path
    recipients: tuple[str, ...]
    queue_id: str


@dataclass(frozen=True)
class Answer:
    """rspamd's verdict, reduced to what the relay acts on."""

    action: str
    score: float | None = None
    required: float | None = None
    subject: str | None = None  # the new Subject, for "rewrite subject"
    add_headers: tuple[tuple[str, str], ...] = ()  # `milter.add_headers` (milter_headers module)
    remove_headers: frozenset[str] = field(default_factory=frozenset)  # lower-case names


@dataclass(frozen=True)
class Outcome:
    """A refusal to send instead of the 250, or the message to store."""

    reply: str | None
    content: bytes


# -- the HTTP exchange ---------------------------------------------------------------------------


def endpoint(url: str) -> tuple[str, int, str]:
    """(host, port, path of /checkv2) from `spam.rspamd` (validated by relay.config)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    path = parts.path.rstrip("/") + "/checkv2"
    return host, parts.port or DEFAULT_PORT, path


def _value(text: str) -> str:
    """A header value we send: a HELO is the client's word, and must not end our header."""
    return _CONTROL.sub("?", text)


def request_head(url: str, transaction: Transaction, length: int) -> bytes:
    """The HTTP request up to its body: rspamd's protocol takes the envelope as headers. The
    message follows as it is, not copied into one buffer with this (it may be 50 MB)."""
    host, port, path = endpoint(url)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {authority}",
        "Connection: close",
        f"Content-Length: {length}",
        f"Queue-Id: {_value(transaction.queue_id)}",
        f"IP: {_value(transaction.client_ip)}",
        f"Helo: {_value(transaction.helo)}",
        f"From: <{_value(transaction.sender)}>",
        *(f"Rcpt: <{_value(recipient)}>" for recipient in transaction.recipients),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    """The body of an HTTP/1.1 200 answer (Content-Length, or up to the close)."""
    status = await reader.readline()
    parts = status.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise RspamdError(f"not an HTTP answer: {status[:80]!r}")
    if parts[1] != b"200":
        raise RspamdError(f"HTTP {one_line(status.decode('latin-1'))}")
    length: int | None = None
    while (line := await reader.readline()).strip():
        name, _, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        if name == "content-length":
            if not value.strip().isdigit():
                raise RspamdError(f"bad Content-Length {value.strip()!r}")
            length = int(value)
        elif name == "transfer-encoding":
            raise RspamdError(f"unexpected Transfer-Encoding {value.strip()!r}")
    if length is None:
        body = await reader.read(MAX_ANSWER + 1)
    elif length > MAX_ANSWER:
        raise RspamdError(f"answer of {length} bytes")
    else:
        body = await reader.readexactly(length)
    if len(body) > MAX_ANSWER:
        raise RspamdError("answer too long")
    return body


async def ask(url: str, transaction: Transaction, content: bytes) -> Answer:
    """One check; the caller bounds it with a deadline. Raises RspamdError, never OSError."""
    host, port, _ = endpoint(url)
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        raise RspamdError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
    try:
        writer.write(request_head(url, transaction, len(content)))
        writer.write(content)
        await writer.drain()
        body = await _read_response(reader)
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        raise RspamdError(f"connection to {host}:{port} failed: {exc}") from exc
    finally:
        writer.close()
    return parse_answer(body)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _milter_headers(value: Any) -> Iterable[tuple[str, str]]:
    """`milter.add_headers`: {name: value | {"value": v, "order": n} | [those]}."""
    if not isinstance(value, dict):
        return
    for name, entries in value.items():
        for entry in entries if isinstance(entries, list) else [entries]:
            text = entry.get("value") if isinstance(entry, dict) else entry
            if isinstance(name, str) and _HEADER_NAME.match(name) and isinstance(text, str):
                yield name, text


def parse_answer(body: bytes) -> Answer:
    """rspamd's JSON reply (its `/checkv2` protocol); RspamdError for anything else."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RspamdError(f"answer is not JSON: {body[:80]!r}") from exc
    if not isinstance(data, dict):
        raise RspamdError(f"answer is not a JSON object: {body[:80]!r}")
    action = data.get("action")
    if action not in ACTIONS:
        detail = f"error {data['error']!r}" if "error" in data else f"action {action!r}"
        raise RspamdError(f"answer without a known action: {one_line(detail)[:200]}")
    milter = data.get("milter")
    if not isinstance(milter, dict):
        milter = {}
    removed = milter.get("remove_headers")
    subject = data.get("subject")
    return Answer(
        action=action,
        score=_number(data.get("score")),
        required=_number(data.get("required_score")),
        subject=subject if isinstance(subject, str) else None,
        add_headers=tuple(_milter_headers(milter.get("add_headers"))),
        remove_headers=frozenset(
            name.lower() for name in (removed if isinstance(removed, dict) else {})
        ),
    )


# -- the message ---------------------------------------------------------------------------------


def tagged(content: bytes, answer: Answer) -> bytes:
    """The message as stored after rspamd's answer: its score, its headers, its Subject."""
    add: list[tuple[str, str]] = []
    if answer.action in TAG:
        add.append((SPAM, "Yes"))
    if answer.score is not None:
        required = "" if answer.required is None else f" / {answer.required:.2f}"
        add.append((SCORE, f"{answer.score:.2f}{required}"))
    ours = {name.lower() for name, _ in add}
    add += [(name, value) for name, value in answer.add_headers if name.lower() not in ours]
    subject = None
    if answer.action == "rewrite subject":
        subject = answer.subject or SPAM_SUBJECT + subject_of(content)
    return edit(content, add, remove={*OURS, *answer.remove_headers}, subject=subject)


# -- the decision --------------------------------------------------------------------------------


async def scan(
    spam: SpamConfig,
    transaction: Transaction,
    content: bytes,
    clock: Callable[[], float] = time.monotonic,
) -> Outcome:
    """Checks one message under one deadline; the reply to send instead of 250, or what to store.

    Counted in `relay_spam_check_duration_seconds{check="rspamd"}` and
    `relay_spam_checks_total{check="rspamd",result}`; refusals in
    `relay_messages_rejected_total{reason="rspamd"}`.
    """
    started = clock()
    try:
        async with asyncio.timeout(spam.rspamd_timeout):
            answer = await ask(spam.rspamd, transaction, content)
    except (TimeoutError, RspamdError) as exc:
        metrics.spam_check_duration.labels(CHECK).observe(clock() - started)
        timed_out = isinstance(exc, TimeoutError)
        problem = f"no answer within {spam.rspamd_timeout:g}s" if timed_out else str(exc)
        metrics.spam_checks.labels(CHECK, "timeout" if timed_out else "error").inc()
        return _failed(spam, transaction, content, problem, "timeout" if timed_out else "error")
    metrics.spam_check_duration.labels(CHECK).observe(clock() - started)
    metrics.spam_checks.labels(CHECK, answer.action.replace(" ", "_")).inc()
    score = "-" if answer.score is None else f"{answer.score:.2f}"
    if answer.action in REJECT + DEFER:
        metrics.messages_rejected.labels(CHECK).inc()
        log.info(
            "%s: reject DATA from [%s]: rspamd action=%s score=%s",
            transaction.queue_id,
            transaction.client_ip,
            answer.action,
            score,
            extra=fields(
                queue_id=transaction.queue_id,
                event="rejected",
                client=transaction.client_ip,
                reason=CHECK,
                action=answer.action,
            ),
        )
        return Outcome(Replies.REJECTED if answer.action in REJECT else Replies.DEFERRED, content)
    if answer.action in TAG:
        log.info(
            "%s: rspamd action=%s score=%s: tagged",
            transaction.queue_id,
            answer.action,
            score,
            extra=fields(queue_id=transaction.queue_id, action=answer.action),
        )
    return Outcome(None, tagged(content, answer))


def _failed(
    spam: SpamConfig, transaction: Transaction, content: bytes, problem: str, kind: str
) -> Outcome:
    """No usable answer: `spam.rspamd_failure` says whether the message goes on unchecked."""
    if spam.rspamd_failure == "tempfail":
        metrics.messages_rejected.labels(CHECK).inc()
        log.warning(
            "%s: reject DATA from [%s]: rspamd check failed: %s",
            transaction.queue_id,
            transaction.client_ip,
            problem,
            extra=fields(
                queue_id=transaction.queue_id,
                event="rejected",
                client=transaction.client_ip,
                reason=CHECK,
            ),
        )
        return Outcome(Replies.UNAVAILABLE, content)
    log.warning(
        "%s: rspamd check failed: %s: accepted unchecked",
        transaction.queue_id,
        problem,
        extra=fields(queue_id=transaction.queue_id, reason=CHECK),
    )
    return Outcome(None, edit(content, [(UNCHECKED, f"yes (rspamd {kind})")], remove=OURS))
