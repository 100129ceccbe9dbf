"""Next hops for a destination domain, minus ourselves: the only module that imports dnspython.

A backup MX must never deliver to itself or to an MX less preferred than itself, or mail loops
between the backups (RFC 5321 5.1: "If the SMTP client finds its own name or address in the
list, it MUST discard that entry and all entries at a less preferred level"). So `Router.hops`
looks up the MX records, walks them by preference, and stops at the first level where it finds
us, by host name or by an address and port we listen on. Configured primaries skip the MX
lookup altogether.

Every failure is a `RouteError` with a `kind` and a permanence bit. Only what the DNS states for
sure (the domain does not exist, or it says by null MX that it takes no mail) is permanent;
anything else, including "nothing preferred over us", is temporary, because a backup MX prefers
retrying to bouncing and the primary's records may be fixed in the meantime.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.TXT
import dns.resolver
import dns.reversename

from relay.config import parse_hostport

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NXDOMAIN = "nxdomain"
NULL_MX = "null_mx"
DNS_TEMPORARY = "dns_temporary"
NO_PREFERRED_MX = "no_preferred_mx"
NO_ADDRESS = "no_address"
KINDS = (NXDOMAIN, NULL_MX, DNS_TEMPORARY, NO_PREFERRED_MX, NO_ADDRESS)
_PERMANENT_KINDS = (NXDOMAIN, NULL_MX)

CACHED_ANSWERS = 20_000  # the sender checks' cache: a few MB at most
MAX_TRY_TIMEOUT = 2.0  # seconds per name server try; `timeout` bounds the whole lookup


@dataclass(frozen=True)
class Hop:
    """One place to connect to: `host` names it (TLS SNI, certificate checks, logs)."""

    host: str  # the MX (or fixed primary) host name, no trailing dot
    address: str  # an IP address literal to connect to
    port: int
    preference: int  # MX preference; fixed primaries: their position 0, 1, 2…


class RouteError(Exception):
    """Routing failed; `kind` is one of KINDS and `permanent` says whether to bounce now.

    `permanent` defaults from the kind: only NXDOMAIN and a null MX (RFC 7505) are permanent.
    """

    def __init__(self, message: str, *, kind: str, permanent: bool | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown route error kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.permanent = kind in _PERMANENT_KINDS if permanent is None else permanent


class Router:
    """Finds the next hops for a domain with dnspython's asyncio resolver.

    `listen` is every (address, port) our SMTP listeners are bound to; a wildcard address (0.0.0.0
    or ::) stands for every local address on that port. `nameservers` are "ip", "ip:port" or
    "[v6]:port"; empty means the system's resolver (/etc/resolv.conf). Nothing is cached here: the
    scheduler keeps routes for a short while itself.
    """

    def __init__(
        self,
        *,
        hostname: str,
        listen: Sequence[tuple[str, int]],
        nameservers: Sequence[str] = (),
        mx_port: int = 25,
        timeout: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.hostname = hostname.rstrip(".")
        self.mx_port = mx_port
        self.timeout = timeout
        self.rng = rng or random.Random()
        self._me = _dns_name(hostname)
        self._listen = {(_ip(address), port) for address, port in listen}
        self._wildcard_ports = {port for ip, port in self._listen if ip.is_unspecified}
        self._nameservers = [parse_hostport(ns, default_port=53) for ns in nameservers]
        for address, _ in self._nameservers:
            _ip(address)  # fail at start, not at the first delivery
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._caching: dns.asyncresolver.Resolver | None = None
        # The sender checks' answers as records() gave them: (until, records).
        self._kept: dict[tuple[str, str], tuple[float, list[dns.rdata.Rdata]]] = {}

    async def hops(self, domain: str, primary: Sequence[str] = ()) -> list[Hop]:
        """Where to connect for `domain`, best first: every address of every usable host.

        With `primary` ("host[:port]" entries) those hosts, in that order, without an MX lookup.
        Raises RouteError; no dnspython exception gets past this method.
        """
        if primary:
            return await self._primary_hops(primary)
        return await self._mx_hops(domain)

    # -- fixed primaries ------------------------------------------------------------------

    async def _primary_hops(self, primary: Sequence[str]) -> list[Hop]:
        targets = [parse_hostport(entry, default_port=self.mx_port) for entry in primary]
        lookups = await asyncio.gather(*(self._addresses(host) for host, _ in targets))
        hops: list[Hop] = []
        errors: list[RouteError] = []
        for position, ((host, port), (addresses, error)) in enumerate(
            zip(targets, lookups, strict=True)
        ):
            if error:
                errors.append(error)
            hops += [
                Hop(host, address, port, position)
                for address in addresses
                # Configured by the operator, so trusted, except a straight loop to our own socket.
                if (_ip(address), port) not in self._listen
            ]
        if not hops:
            raise _no_hop("no usable address for primary " + ", ".join(primary), errors)
        return _unique(hops)

    # -- MX lookup ------------------------------------------------------------------------

    async def _mx_hops(self, domain: str) -> list[Hop]:
        records = await self._lookup(domain, "MX")
        if not records:
            # RFC 5321 5.1: no MX records → the domain itself is the MX, at preference 0.
            exchanges = [(0, _dns_name(domain))]
        else:
            mxs = [rd for rd in records if isinstance(rd, dns.rdtypes.ANY.MX.MX)]
            # RFC 7505 3: "0 ." means the domain accepts no mail; a "." among real MX records
            # is a misconfiguration, and there is nothing to connect to at the root anyway.
            exchanges = [(mx.preference, mx.exchange) for mx in mxs if mx.exchange != dns.name.root]
            if not exchanges:
                raise RouteError(f"{domain} accepts no mail (null MX, RFC 7505)", kind=NULL_MX)
        hops: list[Hop] = []
        errors: list[RouteError] = []
        for level, (preference, names) in enumerate(self._by_preference(exchanges)):
            # One level at a time, so hosts less preferred than us are not even looked up.
            ours = self._is_us_by_name(names)
            lookups = [] if ours else await asyncio.gather(*(self._addresses(n) for n in names))
            ours = ours or self._is_us_by_address(names, lookups)
            if ours and level == 0:
                message = f"no MX host preferred over {self.hostname} ({ours})"
                raise RouteError(message, kind=NO_PREFERRED_MX)
            if ours:
                break  # RFC 5321 5.1: drop our level and every less preferred one
            for name, (addresses, error) in zip(names, lookups, strict=True):
                if error:
                    errors.append(error)
                hops += [Hop(name, address, self.mx_port, preference) for address in addresses]
        if not hops:
            what = f"no MX host of {domain}" if records else f"{domain} (no MX, RFC 5321 5.1)"
            raise _no_hop(f"{what} has an address", errors)
        return _unique(hops)

    def _by_preference(
        self, exchanges: list[tuple[int, dns.name.Name]]
    ) -> list[tuple[int, list[str]]]:
        """Levels from most preferred; hosts of one level in random order (RFC 5321 5.1)."""
        levels = []
        for preference, group in groupby(sorted(exchanges, key=lambda e: e[0]), key=lambda e: e[0]):
            # Sorted first so that a given rng gives one order whatever order the DNS answered in.
            names = sorted({name.to_text(omit_final_dot=True).lower() for _, name in group})
            self.rng.shuffle(names)
            levels.append((preference, names))
        return levels

    def _is_us_by_name(self, names: list[str]) -> str:
        """Why the level is ours ("" if not): one of its hosts carries our host name."""
        for name in names:
            if _dns_name(name) == self._me:
                return f"MX {name} is our host name"
        return ""

    def _is_us_by_address(
        self, names: list[str], lookups: list[tuple[list[str], RouteError | None]]
    ) -> str:
        """Why the level is ours ("" if not): one of its hosts has an address we listen on."""
        for name, (addresses, _) in zip(names, lookups, strict=True):
            for address in addresses:
                if self._is_listener(_ip(address), self.mx_port):
                    return f"MX {name} is [{address}]:{self.mx_port}, where we listen"
        return ""

    def _is_listener(self, ip: IPAddress, port: int) -> bool:
        if (ip, port) in self._listen:
            return True
        return port in self._wildcard_ports and _is_local(ip)

    # -- records as published, for `relay doctor` ---------------------------------------------

    async def mx_records(self, domain: str) -> list[tuple[int, str]]:
        """The MX records of `domain` as (preference, host), best first; [] when it has none.

        Hosts are lower-case without the final dot; a null MX (RFC 7505) shows as (0, ".").
        Unlike `hops`, nothing is dropped: the doctor judges the records as senders see them.
        Raises RouteError (NXDOMAIN when the domain does not exist).
        """
        records = await self._lookup(domain, "MX")
        found = {
            (rd.preference, rd.exchange.to_text(omit_final_dot=True).lower())
            for rd in records
            if isinstance(rd, dns.rdtypes.ANY.MX.MX)
        }
        return sorted(found)

    async def addresses(self, host: str) -> list[str]:
        """Every IPv4 then IPv6 address of `host`; [] when it has none or does not exist.

        Raises RouteError when the DNS could not say (timeout, SERVFAIL) and no address was found.
        """
        found, error = await self._addresses(host)
        if error is not None and not found:
            raise error
        return found

    async def records(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        """The `rdtype` records of `name` for the sender checks (relay.smtp.auth): [] when the name
        does not exist or has none; raises RouteError (kind DNS_TEMPORARY) on DNS failure.

        Answers are kept for their TTL (and "no such name" for the zone's negative TTL, RFC
        2308), as a resolver's cache would keep them: a flood from a few senders asks for the
        same SPF and DMARC records thousands of times. Routing does not use this cache: its
        answers must follow an operator's DNS change at once."""
        key = (name.lower(), rdtype)
        kept = self._kept.get(key)
        if kept is not None and kept[0] > time.time():
            # dnspython's cache answers too, but builds (and for "no such name" raises) anew
            # each time: a tenth of an SMTP worker's time, when every sender is the same.
            return kept[1]
        try:
            answer = await self._answer(name, rdtype, cached=True)
            found = list(answer.rrset) if answer.rrset is not None else []
            expires = answer.expiration
        except RouteError as exc:
            if exc.kind != NXDOMAIN:
                raise
            found, expires = [], self._negative_expiry(name)
        if len(self._kept) >= CACHED_ANSWERS:
            self._kept.clear()
        self._kept[key] = (expires, found)
        return found

    def _negative_expiry(self, name: str) -> float:
        """Until when dnspython's cache keeps "no such name" for `name` (0: it does not)."""
        cache = self._caching.cache if self._caching is not None else None
        if cache is None:
            return 0.0
        entry = cache.get((_dns_name(name), dns.rdatatype.ANY, dns.rdataclass.IN))
        return float(entry.expiration) if entry is not None else 0.0

    async def txt_records(self, name: str) -> list[str]:
        """The TXT records of `name`, each one's strings joined (RFC 7208 3.3 does the same).

        [] when there are none or the name does not exist; raises RouteError on DNS failure.
        """
        try:
            records = await self._lookup(name, "TXT")
        except RouteError as exc:
            if exc.kind == NXDOMAIN:
                return []
            raise
        return [
            b"".join(rd.strings).decode("utf-8", "replace")
            for rd in records
            if isinstance(rd, dns.rdtypes.ANY.TXT.TXT)
        ]

    async def reverse_names(self, address: str) -> list[str]:
        """The PTR names of an address, lower-case without the final dot; [] when none.

        Raises RouteError when the DNS could not say.
        """
        try:
            qname = dns.reversename.from_address(address).to_text()
            records = await self._lookup(qname, "PTR")
        except RouteError as exc:
            if exc.kind == NXDOMAIN:
                return []
            raise
        except (ValueError, dns.exception.SyntaxError):
            return []
        return [
            rd.target.to_text(omit_final_dot=True).lower()
            for rd in records
            if isinstance(rd, dns.rdtypes.ANY.PTR.PTR)
        ]

    async def dnsbl_answer(self, zone: str, address: str) -> tuple[list[str], float]:
        """A DNS list's answer for a client address: the A records of its reversed octets (or
        nibbles) under `zone`, and their TTL; ([], 0) when it is not listed (NXDOMAIN, NODATA).

        Raises RouteError when the list did not answer (relay.dnsbl then counts it as silent).
        """
        reversed_name = dns.reversename.from_address(address).to_text()
        stem = reversed_name.removesuffix(".in-addr.arpa.").removesuffix(".ip6.arpa.")
        try:
            answer = await self._answer(f"{stem}.{zone}", "A")
        except RouteError as exc:
            if exc.kind == NXDOMAIN:
                return [], 0.0
            raise
        if answer.rrset is None:
            return [], 0.0
        return [rd.to_text() for rd in answer.rrset], float(answer.rrset.ttl)

    def is_our_name(self, host: str) -> bool:
        """Whether `host` is our host name (case-insensitive, trailing dot or not)."""
        try:
            return bool(_dns_name(host) == self._me)
        except ValueError:
            return False

    def listens_on(self, address: str, port: int) -> bool:
        """Whether we accept SMTP at [address]:port; a wildcard listen covers every local one."""
        return self._is_listener(_ip(address), port)

    # -- DNS ------------------------------------------------------------------------------

    async def _addresses(self, host: str) -> tuple[list[str], RouteError | None]:
        """Every IPv4 then IPv6 address of `host`, and the temporary error met on the way, if any.

        Both families are always asked: a host whose IPv6 is broken may still work over IPv4.
        IPv4 comes first because a backup MX's IPv6 path is the more often broken one, and every
        dead address costs a connect timeout. A host that does not exist simply has no address.
        """
        try:
            return [str(_ip(host))], None
        except ValueError:
            pass  # a name, not a literal
        results = await asyncio.gather(
            self._host_lookup(host, "A"), self._host_lookup(host, "AAAA")
        )
        addresses = [a for found, _ in results for a in found]
        errors = [e for _, e in results if e is not None]
        return addresses, (errors[0] if errors else None)

    async def _host_lookup(self, host: str, rdtype: str) -> tuple[list[str], RouteError | None]:
        try:
            return [rd.to_text() for rd in await self._lookup(host, rdtype)], None
        except RouteError as exc:
            return [], (None if exc.kind == NXDOMAIN else exc)

    async def _lookup(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        """The `rdtype` records of `name`, [] when it has none (NODATA); CNAMEs are followed."""
        answer = await self._answer(name, rdtype)
        return list(answer.rrset) if answer.rrset is not None else []

    async def _answer(self, name: str, rdtype: str, cached: bool = False) -> dns.resolver.Answer:
        """dnspython's answer for `name` and `rdtype`, without raising on NODATA.

        This is where dnspython's exceptions become RouteError: NXDOMAIN is permanent, anything
        else (timeout, SERVFAIL, refused, no reachable server, no resolv.conf) is temporary.
        """
        try:
            qname = _dns_name(name)
        except ValueError as exc:
            raise RouteError(str(exc), kind=NXDOMAIN) from None  # cannot exist in the DNS
        where = f"{name} {rdtype}"
        try:
            resolver = self._get_caching_resolver() if cached else self._get_resolver()
            answer = await resolver.resolve(
                qname, rdtype, search=False, raise_on_no_answer=False, lifetime=self.timeout
            )
        except dns.resolver.NXDOMAIN:
            raise RouteError(f"{name}: no such domain (NXDOMAIN)", kind=NXDOMAIN) from None
        except dns.exception.Timeout:
            message = f"DNS lookup {where} timed out after {self.timeout:g}s"
            raise RouteError(message, kind=DNS_TEMPORARY) from None
        except dns.resolver.NoNameservers as exc:
            message = f"DNS lookup {where}: no name server answered ({_brief(exc)})"
            raise RouteError(message, kind=DNS_TEMPORARY) from None
        except dns.exception.DNSException as exc:
            message = f"DNS lookup {where} failed: {_brief(exc)}"
            raise RouteError(message, kind=DNS_TEMPORARY) from None
        return answer

    def _get_resolver(self) -> dns.asyncresolver.Resolver:
        """Built at first use, so that a missing resolv.conf is a temporary error, not a crash."""
        if self._resolver is None:
            if self._nameservers:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(address, port)
                    for address, port in self._nameservers
                ]
            else:
                resolver = dns.asyncresolver.Resolver()  # raises NoResolverConfiguration
            resolver.timeout = min(MAX_TRY_TIMEOUT, self.timeout)
            resolver.lifetime = self.timeout
            self._resolver = resolver
        return self._resolver

    def _get_caching_resolver(self) -> dns.asyncresolver.Resolver:
        if self._caching is None:
            resolver = dns.asyncresolver.Resolver(configure=False)
            plain = self._get_resolver()
            resolver.nameservers = plain.nameservers
            resolver.timeout, resolver.lifetime = plain.timeout, plain.lifetime
            resolver.cache = dns.resolver.LRUCache(CACHED_ANSWERS)
            self._caching = resolver
        return self._caching


def _dns_name(text: str) -> dns.name.Name:
    """An absolute DNS name (IDNA-encoded); ValueError when `text` cannot be one."""
    try:
        return dns.name.from_text(text.rstrip(".") + ".")
    except dns.exception.DNSException as exc:
        raise ValueError(f"bad domain name {text!r}: {_brief(exc)}") from None


def _ip(text: str) -> IPAddress:
    """An address; an IPv4-mapped IPv6 one (::ffff:a.b.c.d) is the IPv4 address it maps."""
    ip = ipaddress.ip_address(text.strip("[]"))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_local_address(address: str) -> bool:
    """Whether `address` is assigned to this machine (loopback and wildcard always are)."""
    return _is_local(_ip(address))


def _is_local(ip: IPAddress) -> bool:
    """Whether `ip` is an address of this machine.

    The kernel knows best: binding to an address succeeds only if it is ours (EADDRNOTAVAIL
    otherwise), and no packet is sent. Loopback and unspecified addresses always count.
    """
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((str(ip), 0))
    except OSError:
        return False
    return True


def _unique(hops: list[Hop]) -> list[Hop]:
    """Drops repeats of an (address, port) two host names share, keeping the best one."""
    seen: set[tuple[str, int]] = set()
    unique = []
    for hop in hops:
        if (hop.address, hop.port) not in seen:
            seen.add((hop.address, hop.port))
            unique.append(hop)
    return unique


def _no_hop(message: str, errors: list[RouteError]) -> RouteError:
    """A DNS failure explains an empty result better than "no address", so it wins."""
    if errors:
        return RouteError(f"{message}: {errors[0]}", kind=DNS_TEMPORARY)
    return RouteError(message, kind=NO_ADDRESS)


def _brief(exc: dns.exception.DNSException) -> str:
    return str(exc) or type(exc).__name__
