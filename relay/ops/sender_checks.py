"""What receivers check about the relay as a sender, for `relay doctor`.

The relay sends mail too: to the primary when it comes back, and DSNs to senders. Receivers (the
primary included) judge that mail by the sending address's reverse DNS and by the SPF record of
our HELO name (a DSN has MAIL FROM:<>, so RFC 7208 2.3 checks the HELO identity). A relay whose
reverse DNS or SPF is wrong has its redelivered mail scored as spam on the day it matters most.

The SPF evaluation here is the subset a relay's own record uses (`ip4`, `ip6`, `a`, `mx`,
`include`, `redirect`, `all`, with qualifiers and the 10-lookup limit); a record that needs
`exists`, `ptr` or macros is reported as not evaluated rather than guessed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from relay.delivery.mx import RouteError, Router

LOOKUP_LIMIT = 10  # RFC 7208 4.6.4


@dataclass(frozen=True)
class ReverseDns:
    """What the DNS says about one of our addresses."""

    address: str
    names: list[str]  # its PTR names
    confirmed: list[str]  # those that resolve back to the address (FCrDNS)


async def reverse_dns(router: Router, address: str) -> ReverseDns:
    names = await router.reverse_names(address)
    confirmed = []
    for name in names:
        try:
            if address in await router.addresses(name):
                confirmed.append(name)
        except RouteError:
            continue
    return ReverseDns(address, names, confirmed)


class SpfUnsupported(Exception):
    """The record needs a mechanism or macro this evaluator does not implement."""


class SpfPermError(Exception):
    """RFC 7208 permerror: the record is broken (several records, too many lookups, syntax)."""


async def spf_record(router: Router, domain: str) -> str | None:
    records = [t for t in await router.txt_records(domain) if t.lower().split()[:1] == ["v=spf1"]]
    if len(records) > 1:
        raise SpfPermError(f"{domain} publishes {len(records)} SPF records (RFC 7208 4.5)")
    return records[0] if records else None


async def spf_check(router: Router, domain: str, address: str) -> str:
    """The SPF result for mail from `address` with the identity `domain`: pass, fail, softfail,
    neutral or none. Raises SpfPermError, SpfUnsupported, RouteError (temperror)."""
    return await _evaluate(router, domain, ipaddress.ip_address(address), [0])


_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}


async def _evaluate(
    router: Router,
    domain: str,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    lookups: list[int],
) -> str:
    record = await spf_record(router, domain)
    if record is None:
        return "none"
    redirect = None
    for term in record.split()[1:]:
        if "%" in term:
            raise SpfUnsupported(f"macros in {term!r}")
        if term.lower().startswith("redirect="):
            redirect = term.split("=", 1)[1]
            continue
        if "=" in term:
            continue  # another modifier (exp=): no effect on the result
        qualifier = _QUALIFIERS.get(term[0])
        mechanism = term[1:] if qualifier else term
        if await _matches(router, domain, mechanism, ip, lookups):
            return qualifier or "pass"
    if redirect is not None:
        _count(lookups)
        result = await _evaluate(router, redirect, ip, lookups)
        if result == "none":
            raise SpfPermError(f"redirect={redirect} has no SPF record")
        return result
    return "neutral"


async def _matches(
    router: Router,
    domain: str,
    mechanism: str,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    lookups: list[int],
) -> bool:
    name, _, argument = mechanism.partition(":")
    name = name.lower()
    if "/" in name:  # "a/24", "mx/24": our own domain with a prefix length
        name, _, prefix_only = name.partition("/")
        argument = f"{domain}/{prefix_only}"
    if name == "all":
        return True
    if name in ("ip4", "ip6"):
        return ip in ipaddress.ip_network(argument, strict=False)
    if name in ("a", "mx"):
        _count(lookups)
        target, _, prefix = (argument or domain).partition("/")
        hosts = [target] if name == "a" else [h for _, h in await router.mx_records(target)]
        for host in hosts:
            for found in await router.addresses(host):
                network = ipaddress.ip_network(
                    f"{found}/{prefix}" if prefix and ":" not in found else found, strict=False
                )
                if ip in network:
                    return True
        return False
    if name == "include":
        _count(lookups)
        result = await _evaluate(router, argument, ip, lookups)
        if result == "none":
            raise SpfPermError(f"include:{argument} has no SPF record")
        return result == "pass"
    raise SpfUnsupported(f"the {name!r} mechanism")


def _count(lookups: list[int]) -> None:
    lookups[0] += 1
    if lookups[0] > LOOKUP_LIMIT:
        raise SpfPermError("more than 10 DNS lookups (RFC 7208 4.6.4)")
