"""DNS lists at the door, weighted like Postfix's postscreen: a backup MX filters no less.

Spammers send to the highest-numbered MX on purpose, because backup MXes check less. Each
client is looked up in every configured list at once, under one deadline; each list that lists
it adds its weight (negative for allowlists such as list.dnswl.org), and a sum at or over
`spam.dnsbl_threshold` is refused with 550 5.7.1 naming the lists. The syntax of a site is
postscreen_dnsbl_sites': `zone[=filter][*weight]`, the filter an A record pattern such as
`127.0.0.[2..11]` or `127.0.[0..255].[1;2;3]`. A list that does not answer in time never blocks
mail. Answers are cached per client for their DNS TTL (bounded).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config validation imports this module: no DNS or metrics machinery for it
    from relay.delivery.mx import Router

MIN_TTL = 60.0  # postscreen_dnsbl_min_ttl
MAX_TTL = 3600.0  # postscreen_dnsbl_max_ttl
_SITE = re.compile(
    r"^(?P<zone>[A-Za-z0-9.-]+?)(?:=(?P<filter>[0-9.\[\];]+))?(?:\*(?P<weight>-?\d+))?$"
)
_OCTET = re.compile(r"^(?:(\d{1,3})|\[(\d{1,3})\.\.(\d{1,3})\]|\[(\d{1,3}(?:;\d{1,3})*)\])$")


@dataclass(frozen=True)
class Site:
    zone: str
    weight: int
    # Per octet of the A record: the values that count, or None for any reply.
    octets: tuple[frozenset[int], ...] | None

    def matches(self, record: str) -> bool:
        if self.octets is None:
            return True
        parts = record.split(".")
        return len(parts) == 4 and all(
            part.isdigit() and int(part) in allowed
            for part, allowed in zip(parts, self.octets, strict=True)
        )

    @property
    def text(self) -> str:
        return self.zone


def parse_site(text: str) -> Site:
    """A postscreen_dnsbl_sites entry; ValueError saying what is wrong."""
    match = _SITE.match(text.strip())
    if match is None or not match.group("zone") or "." not in match.group("zone"):
        raise ValueError(f"bad DNS list {text!r}: expected zone[=filter][*weight]")
    weight = int(match.group("weight")) if match.group("weight") else 1
    pattern = match.group("filter")
    return Site(match.group("zone").lower().rstrip("."), weight, _octets(pattern, text))


def _octets(pattern: str | None, text: str) -> tuple[frozenset[int], ...] | None:
    if pattern is None:
        return None
    parts = re.findall(r"\[[^\]]*\]|\d+", pattern)
    if len(parts) != 4 or ".".join(parts) != pattern:
        raise ValueError(
            f"bad reply filter in {text!r}: expected four octets, e.g. 127.0.0.[2..11]"
        )
    allowed: list[frozenset[int]] = []
    for part in parts:
        octet = _OCTET.match(part)
        if octet is None:
            raise ValueError(f"bad reply filter in {text!r}: {part!r}")
        single, low, high, choices = octet.groups()
        if single is not None:
            values = frozenset({int(single)})
        elif choices is not None:
            values = frozenset(int(c) for c in choices.split(";"))
        else:
            values = frozenset(range(int(low), int(high) + 1))
        if not values or max(values) > 255 or (low is not None and int(low) > int(high)):
            raise ValueError(f"bad reply filter in {text!r}: {part!r}")
        allowed.append(values)
    return tuple(allowed)


@dataclass(frozen=True)
class Verdict:
    score: int
    listed_by: tuple[str, ...]  # the lists that counted against the client (positive weight)
    silent: tuple[str, ...]  # the lists that did not answer in time


class DnsLists:
    """Scores clients against the configured lists; one instance per server, cache included."""

    def __init__(self, router: Callable[[], Router], clock: Callable[[], float] = time.monotonic):
        self._router = router
        self._clock = clock
        self._cache: dict[str, tuple[float, Verdict]] = {}

    async def check(self, address: str, sites: Sequence[Site], deadline: float) -> Verdict:
        """The client's score over `sites`, asked all at once within `deadline` seconds."""
        now = self._clock()
        cached = self._cache.get(address)
        if cached is not None and cached[0] > now:
            return cached[1]
        started = time.monotonic()
        tasks = [asyncio.ensure_future(self._ask(site, address)) for site in sites]
        done, pending = await asyncio.wait(tasks, timeout=deadline) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        score, listed, silent, ttls = 0, [], [], []
        for site, task in zip(sites, tasks, strict=True):
            if task not in done or task.cancelled() or task.exception() is not None:
                silent.append(site.zone)
                continue
            records, ttl = task.result()
            if any(site.matches(record) for record in records):
                score += site.weight
                ttls.append(ttl)
                if site.weight > 0:
                    listed.append(site.zone)
        from relay.ops import metrics

        metrics.spam_check_duration.labels("dnsbl").observe(time.monotonic() - started)
        verdict = Verdict(score, tuple(listed), tuple(silent))
        if not silent:  # a list that was silent is asked again next time
            ttl = min([MAX_TTL, *ttls]) if ttls else MAX_TTL / 4
            self._cache[address] = (now + max(MIN_TTL, ttl), verdict)
            if len(self._cache) > 100_000:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        return verdict

    async def _ask(self, site: Site, address: str) -> tuple[list[str], float]:
        """RouteError (the list did not answer) makes the site silent for this client."""
        return await self._router().dnsbl_answer(site.zone, address)
