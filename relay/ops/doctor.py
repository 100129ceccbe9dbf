"""`relay doctor`: checks a deployment from the relay's own point of view, each finding with a fix.

A backup MX fails silently: with a wrong MX record, an unreachable primary or an expired
certificate it simply never sees mail, or keeps it, and nobody notices until the primary's outage.
So the doctor asks what senders and the relay itself will meet:

- mx:      every configured domain has an MX record naming our `hostname`, with a host preferred
           over it (RFC 5321 5.1: senders try the primary first, and the relay delivers only to
           hosts preferred over itself), and no better MX that is really us under another name;
- address: our `hostname` resolves (A/AAAA) to an address we listen on;
- primary: the primary answers SMTP (the fixed `primary` hosts, else the MX hosts preferred
           over us), with the same banner/EHLO/QUIT probe the scheduler uses;
- tls:     the certificate loads, covers our `hostname` and is not expired or about to expire;
- queue:   nobody but the server's user can write the queue file or its directory (the check
           `relay serve` makes before it starts);
- mta-sts: if the domain publishes MTA-STS (RFC 8461), its policy's `mx:` list covers us, since
           senders in enforce mode refuse any MX the policy does not name.

Findings are "ok", "warning" (works, but check this) or "problem" (mail is at risk); any
problem makes the exit status 1. DNS goes through `relay.mx` (the configured name servers),
SMTP through `relay.courier`; the only I/O of this module is the MTA-STS policy fetch over HTTPS.
"""

from __future__ import annotations

import _ssl
import asyncio
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from relay import tls
from relay.config import Config, DomainConfig, parse_hostport
from relay.delivery.courier import SessionError, probe
from relay.delivery.mx import NXDOMAIN, Hop, RouteError, Router, is_local_address
from relay.envelope import hostport
from relay.ops import sender_checks
from relay.smtp import arc as arc_keys
from relay.store import StorageError, Store
from relay.store.files import queue_paths, unsafe_queue_files, user_name
from relay.words import plural

OK = "ok"
INFO = "info"  # nothing wrong seen; something to check by hand (port 25 from outside)
WARNING = "warning"
PROBLEM = "problem"
STATUSES = (OK, INFO, WARNING, PROBLEM)

EXPIRY_WARNING = 14 * 86400.0  # certbot renews 30 days ahead: 14 left means renewal is failing
# RFC 8461 3.3: the policy lives at this URL, over HTTPS with a valid certificate.
MTA_STS_URL = "https://mta-sts.{domain}/.well-known/mta-sts.txt"
MTA_STS_MAX_BYTES = 64 * 1024  # RFC 8461 3.3 suggests senders cap a policy at 64 KB
PROBE_TIMEOUT = 10.0
FETCH_TIMEOUT = 10.0

# (url, timeout) → (content type, body); raises PolicyFetchError.
Fetch = Callable[[str, float], tuple[str, str]]
Prober = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Finding:
    """One thing the doctor looked at: what it saw and, unless all is well, what to do."""

    status: str  # one of STATUSES
    check: str  # "address", "rdns", "spf", "port25", "tls", "mx", "primary", "recipients", ...
    subject: str  # the host name, certificate file or domain it is about
    message: str
    fix: str = ""


class PolicyFetchError(Exception):
    """The MTA-STS policy could not be fetched; the message says why."""


@dataclass
class _Context:
    cfg: Config
    router: Router
    clock: Callable[[], float]
    fetch: Fetch
    mta_sts_url: str
    prober: Prober
    probes: dict[tuple[str, int], asyncio.Task[str | None]]


async def diagnose(
    cfg: Config,
    *,
    router: Router | None = None,
    clock: Callable[[], float] = time.time,
    fetch: Fetch | None = None,
    mta_sts_url: str = MTA_STS_URL,
    prober: Prober = probe,
) -> list[Finding]:
    """Every finding about `cfg`'s deployment: ours first (address, tls), then per domain.

    `mta_sts_url` is where policies are fetched ("{domain}" is replaced), `fetch` how; tests
    point them at a local HTTP server. Nothing here raises for what it finds: a failure to look
    something up is itself a finding.
    """
    context = _Context(
        cfg=cfg,
        router=router or _router(cfg),
        clock=clock,
        fetch=fetch or fetch_policy,
        mta_sts_url=mta_sts_url,
        prober=prober,
        probes={},
    )
    groups = await asyncio.gather(
        check_address(context),
        check_sending(context),
        asyncio.to_thread(check_tls, cfg, clock()),
        asyncio.to_thread(check_queue_files, cfg),
        check_arc(context),
        *(_check_domain(context, domain) for domain in cfg.domains),
    )
    return [finding for group in groups for finding in group]


def _router(cfg: Config) -> Router:
    return Router(
        hostname=cfg.hostname,
        listen=cfg.smtp.listen,
        nameservers=cfg.dns.nameservers,
        mx_port=cfg.delivery.mx_port,
    )


async def _check_domain(context: _Context, domain: DomainConfig) -> list[Finding]:
    mx, primary, sts = await asyncio.gather(
        check_mx(context, domain), check_primary(context, domain), check_mta_sts(context, domain)
    )
    primary_down = any(f.status == PROBLEM for f in primary)
    known = await asyncio.to_thread(known_mailboxes, context.cfg.queue.path, domain.name)
    return [*mx, *primary, *check_recipients(domain, primary_down, known), *sts]


def known_mailboxes(queue_path: str, domain: str) -> int:
    """Mailboxes of `domain` the queue database remembers as existing (callouts, imports)."""
    if not os.path.exists(queue_path):
        return 0
    try:
        store = Store(queue_path)
    except StorageError:
        return 0
    try:
        suffix = "@" + domain
        return sum(1 for address, ok, _ in store.verdicts() if ok and address.endswith(suffix))
    except StorageError:
        return 0
    finally:
        store.close()


def check_recipients(domain: DomainConfig, primary_down: bool, known: int) -> list[Finding]:
    """Would a callout domain tempfail every recipient if (or because) its primary is down?

    A relay installed in the middle of an outage has asked the primary nothing yet: with
    `verify = "callout"` it then answers 450 to everyone, which delays the very mail it exists
    to take. The fix is to give it the list of mailboxes.
    """
    if domain.verify != "callout" or domain.verify_unknown_while_down == "accept":
        return []
    if domain.recipients or domain.recipients_file:
        return []  # listed mailboxes are accepted whatever the primary does
    fix = (
        "relay recipients import FILE (one address per line, e.g. exported from the primary),"
        ' or list them in recipients_file, or set verify_unknown_while_down = "accept" for'
        " the length of the outage"
    )
    if known == 0 and primary_down:
        message = (
            "every recipient gets 450 4.1.1 right now: the primary cannot be asked"
            ' (verify = "callout") and no mailbox is known yet'
        )
        return [Finding(PROBLEM, "recipients", domain.name, message, fix)]
    if known == 0:
        message = (
            "no mailbox known yet: callouts work while the primary answers, but if it went down"
            " now every recipient would get 450 4.1.1"
        )
        return [Finding(WARNING, "recipients", domain.name, message, fix)]
    message = f"{plural(known, 'mailbox', 'mailboxes')} known: accepted while the primary is down"
    return [Finding(OK, "recipients", domain.name, message)]


def check_queue_files(cfg: Config) -> list[Finding]:
    """Could anyone but the server's user change the queue (the check `relay serve` makes)?

    The doctor may run as root or as the server's user, so the files are compared with the
    owner of the queue directory (the user the server must run as), not with whoever asks.
    """
    directory = queue_paths(cfg.queue.path)[0][1]
    try:
        owner = directory.stat().st_uid
    except FileNotFoundError:
        message = f"{directory} does not exist yet: the server creates it (mode 0700) at start"
        return [Finding(OK, "queue", cfg.queue.path, message)]
    unsafe = unsafe_queue_files(cfg.queue.path, owner, "who owns the queue directory")
    if unsafe:
        return [Finding(PROBLEM, "queue", found.path, found.message, found.fix) for found in unsafe]
    message = (
        f"only {user_name(owner)} can write the queue and its directory: the server must run"
        f" as {user_name(owner)}"
    )
    return [Finding(OK, "queue", cfg.queue.path, message)]


def exit_code(findings: Iterable[Finding]) -> int:
    """0 when nothing is a problem (warnings included), else 1."""
    return 1 if any(f.status == PROBLEM for f in findings) else 0


# -- our host name ----------------------------------------------------------------------------


async def check_address(context: _Context) -> list[Finding]:
    """Our host name resolves to an address where we accept SMTP on the port senders use.

    An address of this machine that we do not listen on is a sure problem. An address that is
    not this machine's at all is only a warning: behind NAT (cloud 1:1 NAT, Docker's port
    mapping) the public address is never local, and the doctor cannot see the forwarding.
    """
    cfg, router = context.cfg, context.router
    name = cfg.hostname
    port = cfg.delivery.mx_port
    listen = ", ".join(_hostport(host, p) for host, p in cfg.smtp.listen)
    try:
        addresses = await router.addresses(name)
    except RouteError as exc:
        return [
            Finding(
                PROBLEM,
                "address",
                name,
                f"cannot resolve our host name: {exc}",
                "check dns.nameservers (or /etc/resolv.conf) and that the name's zone answers",
            )
        ]
    if not addresses:
        return [
            Finding(
                PROBLEM,
                "address",
                name,
                "our host name has no A or AAAA record: senders cannot connect to us",
                f"publish `{name}. IN A <public IPv4>` (and AAAA if we listen on IPv6),"
                " or set `hostname` to the name the MX record points at",
            )
        ]
    listened = [a for a in addresses if router.listens_on(a, port)]
    other_port = [a for a in addresses if a not in listened and _listens_on_any_port(cfg, a)]
    unlistened = [a for a in addresses if a not in listened and a not in other_port]
    local = [a for a in unlistened if is_local_address(a)]
    foreign = [a for a in unlistened if a not in local]
    findings = []
    if local:
        findings.append(
            Finding(
                PROBLEM,
                "address",
                name,
                f"resolves to {_list(local)}, an address of this machine, but smtp.listen"
                f" ({listen}) does not include it: senders connecting there are refused",
                f'add "{_hostport(local[0], port)}" to smtp.listen, or listen on'
                f' "{_hostport(_wildcard(local[0]), port)}"',
            )
        )
    if other_port:
        findings.append(
            Finding(
                WARNING,
                "address",
                name,
                f"resolves to {_list(other_port)}, where we listen, but not on port {port}"
                f" (delivery.mx_port), where senders connect: smtp.listen is {listen}",
                f"listen on port {port}, unless a firewall or proxy redirects port {port}"
                " to our listener",
            )
        )
    if foreign:
        status = WARNING
        message = f"resolves to {_list(foreign)}, which is not an address of this machine" + (
            "" if listened else ": no address of our name reaches our listener directly"
        )
        findings.append(
            Finding(
                status,
                "address",
                name,
                message,
                f"fine behind NAT or a port mapping that forwards port {port} to {listen};"
                f" otherwise fix the A/AAAA records of {name}",
            )
        )
    if not findings:
        findings.append(
            Finding(
                OK, "address", name, f"resolves to {_list(addresses)}, where we listen ({listen})"
            )
        )
    return findings


async def check_sending(context: _Context) -> list[Finding]:
    """How receivers see the relay as a sender: reverse DNS, the SPF of our HELO name, and how
    to check port 25 from outside (which no check from this machine can do).

    Our public address is taken to be what `hostname` resolves to: on a VPS, the address we
    receive on is the address we send from.
    """
    name = context.cfg.hostname
    try:
        addresses = await context.router.addresses(name)
    except RouteError:
        return []  # the address finding already says why
    findings: list[Finding] = []
    for address in addresses:
        findings.append(await _reverse_finding(context, name, address))
    findings += await _spf_findings(context, name, addresses)
    if addresses:
        where = addresses[0]
        findings.append(
            Finding(
                INFO,
                "port25",
                name,
                "whether port 25 is open to the internet cannot be seen from this machine",
                f"from a machine on another network: swaks --server {where} --port 25"
                f" --quit-after EHLO (or: nc -vz {where} 25); expect our banner"
                f' "220 {name} ESMTP". Many VPS providers block port 25 until asked',
            )
        )
    return findings


async def _reverse_finding(context: _Context, name: str, address: str) -> Finding:
    fix = f"ask the provider of {address} to set its PTR record to {name}"
    try:
        found = await sender_checks.reverse_dns(context.router, address)
    except RouteError as exc:
        return Finding(PROBLEM, "rdns", address, f"reverse DNS lookup failed: {exc}", _dns_fix())
    if not found.names:
        message = (
            "no PTR record: receivers (the primary included) refuse or mark down mail from an"
            " address without reverse DNS, our redeliveries and DSNs included"
        )
        return Finding(PROBLEM, "rdns", address, message, fix)
    if not found.confirmed:
        message = (
            f"PTR {_list(found.names)} does not resolve back to {address}: forward-confirmed"
            " reverse DNS fails, which receivers treat like no PTR at all"
        )
        return Finding(PROBLEM, "rdns", address, message, fix + f" and give {name} the A record")
    if not any(name_matches(n, name) for n in found.confirmed):
        message = (
            f"PTR {found.confirmed[0]} resolves back to {address} (forward-confirmed), but is not"
            f" our host name {name}: FCrDNS checks pass; receivers that compare the PTR with our"
            " EHLO name (some spam filters) score us down"
        )
        return Finding(
            WARNING, "rdns", address, message, fix + f", or set hostname to {found.confirmed[0]}"
        )
    return Finding(
        OK, "rdns", address, f"PTR {name} resolves back to {address}: forward-confirmed, our name"
    )


async def _spf_findings(context: _Context, name: str, addresses: list[str]) -> list[Finding]:
    publish = f'publish `{name}. IN TXT "v=spf1 a -all"` (our HELO name\'s own addresses)'
    try:
        record = await sender_checks.spf_record(context.router, name)
        if record is None:
            message = (
                "no SPF record for our HELO name: our DSNs (MAIL FROM:<>, so SPF checks the HELO"
                " name, RFC 7208 2.3) get SPF none, which strict receivers score as spam"
            )
            return [Finding(WARNING, "spf", name, message, publish)]
        results = {a: await sender_checks.spf_check(context.router, name, a) for a in addresses}
    except sender_checks.SpfPermError as exc:
        return [Finding(PROBLEM, "spf", name, f"the SPF record is broken: {exc}", publish)]
    except sender_checks.SpfUnsupported as exc:
        message = f"SPF record {record!r} uses {exc}, which the doctor does not evaluate"
        return [Finding(WARNING, "spf", name, message, "check it with an SPF validator")]
    except RouteError as exc:
        return [Finding(PROBLEM, "spf", name, f"SPF lookup failed: {exc}", _dns_fix())]
    refused = {a: r for a, r in results.items() if r != "pass"}
    if refused:
        detail = ", ".join(f"{a}: {r}" for a, r in refused.items())
        message = f"SPF of our HELO name does not permit our address ({detail}): our DSNs fail SPF"
        return [
            Finding(
                PROBLEM,
                "spf",
                name,
                message,
                f"add `a` or `ip4:{next(iter(refused))}` to {record!r}",
            )
        ]
    return [Finding(OK, "spf", name, f"SPF {record!r} permits {_list(addresses)}: our DSNs pass")]


async def check_arc(context: _Context) -> list[Finding]:
    """The ARC key the relay seals with, against the record primaries look it up by."""
    arc = context.cfg.arc
    if not arc.key:
        return []
    name = f"{arc.selector}._domainkey.{arc.domain}"
    keygen = f"relay arc keygen --selector {arc.selector} prints the record to publish"
    try:
        expected = arc_keys.public_record(arc_keys.load_key(arc.key))
    except arc_keys.ArcKeyError as exc:
        return [Finding(PROBLEM, "arc", arc.key, str(exc), keygen)]
    try:
        records = await context.router.txt_records(name)
    except RouteError as exc:
        return [Finding(PROBLEM, "arc", name, f"key lookup failed: {exc}", _dns_fix())]
    published = [_dkim_key_of(record) for record in records]
    published = [key for key in published if key is not None]
    if not published:
        message = f"no key record at {name}: no primary can verify our ARC seal"
        return [Finding(PROBLEM, "arc", name, message, keygen)]
    if _dkim_key_of(expected) not in published:
        message = f"the key published at {name} is not the one in {arc.key}: seals fail"
        return [Finding(PROBLEM, "arc", name, message, keygen + " (for the key in use)")]
    return [Finding(OK, "arc", name, f"the published key matches {arc.key}: seals verify")]


def _dkim_key_of(record: str) -> str | None:
    """The p= of a DKIM key record, white space removed (RFC 6376 3.6.1); None if it has none."""
    for part in record.split(";"):
        tag, _, value = part.strip().partition("=")
        if tag.strip() == "p":
            return "".join(value.split()) or None
    return None


def _listens_on_any_port(cfg: Config, address: str) -> bool:
    router = Router(hostname=cfg.hostname, listen=cfg.smtp.listen)
    return any(router.listens_on(address, port) for _, port in cfg.smtp.listen)


def _wildcard(address: str) -> str:
    return "::" if ":" in address else "0.0.0.0"


def _hostport(host: str, port: int) -> str:
    return hostport(host, port)


def _list(items: Sequence[str]) -> str:
    return ", ".join(items)


# -- TLS --------------------------------------------------------------------------------------


def check_tls(cfg: Config, now: float) -> list[Finding]:
    """The inbound certificate loads, names our host name and has time left.

    MTA-STS senders (RFC 8461 4.2) and DANE-less verifying senders check the name and the dates;
    an opportunistic sender falls back to plain text, so a broken certificate costs privacy
    before it costs mail.
    """
    name = cfg.hostname
    if not cfg.tls.enabled:
        return [
            Finding(
                WARNING,
                "tls",
                name,
                "no certificate configured ([tls] cert and key): we do not offer STARTTLS, so"
                " senders deliver in clear text, and MTA-STS senders in enforce mode skip us",
                f"get a certificate for {name} (e.g. certbot, see docs/deploy.md) and set"
                " [tls] cert and key",
            )
        ]
    path = cfg.tls.cert
    try:
        tls.server_context(cfg)
        cert = _decode_cert(path)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return [
            Finding(
                PROBLEM,
                "tls",
                path,
                f"cannot load the certificate and key: {exc}",
                "tls.cert must be a PEM certificate chain (ours first) and tls.key its private"
                " key, both readable by the relay's user",
            )
        ]
    findings = []
    names = certificate_names(cert)
    covered = any(name_matches(pattern, name) for pattern in names)
    if not covered:
        findings.append(
            Finding(
                PROBLEM,
                "tls",
                path,
                f"the certificate does not cover {name}: it names {_list(names) or 'nothing'}",
                f"get a certificate whose subjectAltName includes {name}",
            )
        )
    validity = _validity(path, cert, now)
    if self_signed(cert):
        findings.append(
            Finding(
                WARNING,
                "tls",
                path,
                "the certificate is self-signed: senders doing opportunistic TLS (most) accept"
                " it, but MTA-STS senders in enforce mode do not deliver to us, and DANE senders"
                " only with a matching TLSA record",
                f"get a certificate for {name} from a public CA (e.g. certbot, docs/deploy.md),"
                " or publish a TLSA 3 1 1 record for it",
            )
        )
    elif covered or validity.status != OK:
        # "valid until" says nothing good of a certificate for another name: only its dates.
        findings.append(validity)
    return findings


def self_signed(cert: dict[str, Any]) -> bool:
    """Issued by itself: subject and issuer are the same name."""
    return bool(cert.get("issuer")) and cert.get("issuer") == cert.get("subject")


def _decode_cert(path: str) -> dict[str, Any]:
    """The first certificate of a PEM file, decoded the way `SSLSocket.getpeercert()` shows it.

    The stdlib decodes a certificate file only through this test hook; it is stable since
    Python 3.2 and keeps `cryptography` from becoming a dependency just for the doctor.
    """
    decode = getattr(_ssl, "_test_decode_cert", None)
    if decode is None:
        raise ValueError("this Python cannot decode certificate files")
    decoded: dict[str, Any] = decode(path)
    return decoded


def certificate_names(cert: dict[str, Any]) -> list[str]:
    """The DNS names a certificate is for: its subjectAltName entries, else its common name.

    RFC 6125 6.4.4: with any DNS-ID present the CN is not looked at.
    """
    sans = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    if sans:
        return sans
    return [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]


def name_matches(pattern: str, host: str) -> bool:
    """Whether a certificate name (or an MTA-STS `mx:` pattern) covers `host`.

    A wildcard is only a whole leftmost label and stands for exactly one label (RFC 6125 6.4.3,
    RFC 8461 4.1): "*.example.org" covers "mx2.example.org", not "example.org" nor
    "a.mx2.example.org". A wildcard right above a top-level domain ("*.org") covers nothing.
    """
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if "*" not in pattern:
        return pattern == host
    if not pattern.startswith("*.") or "*" in pattern[2:] or "." not in pattern[2:]:
        return False
    label, _, rest = host.partition(".")
    return bool(label) and rest == pattern[2:]


def _validity(path: str, cert: dict[str, Any], now: float) -> Finding:
    not_before = ssl.cert_time_to_seconds(cert["notBefore"])
    not_after = ssl.cert_time_to_seconds(cert["notAfter"])
    until = _date(not_after)
    renew = "renew it (certbot renew) and reload the relay (systemctl reload relay)"
    if now >= not_after:
        return Finding(PROBLEM, "tls", path, f"the certificate expired on {until}", renew)
    if now < not_before:
        return Finding(
            PROBLEM,
            "tls",
            path,
            f"the certificate is not valid before {_date(not_before)}",
            "check the clock of this machine, or install a certificate valid now",
        )
    left = (not_after - now) / 86400
    if not_after - now < EXPIRY_WARNING:
        message = f"the certificate expires on {until}, in {left:.0f} days"
        return Finding(WARNING, "tls", path, message, renew + "; check that renewal runs")
    return Finding(OK, "tls", path, f"covers our host name; valid until {until} ({left:.0f} days)")


def _date(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


# -- MX records -------------------------------------------------------------------------------


async def check_mx(context: _Context, domain: DomainConfig) -> list[Finding]:
    """The domain's MX records send senders to the primary first and to us after it.

    RFC 5321 5.1: senders try MX hosts from the lowest preference number; the relay, finding
    itself in the list, delivers only to hosts preferred over it. So our name must be there,
    something must be preferred over it, and nothing preferred over it may be us by address
    (the relay would take that host for itself and stop there).
    """
    cfg, router = context.cfg, context.router
    name, me = domain.name, cfg.hostname
    add_us = f"publish `{name}. IN MX 10 <primary>.` and `{name}. IN MX 20 {me}.`"
    try:
        records = await router.mx_records(name)
    except RouteError as exc:
        if exc.kind == NXDOMAIN:
            return [_mx(PROBLEM, name, f"{name} does not exist in the DNS", add_us)]
        return [_mx(PROBLEM, name, f"cannot look up the MX records: {exc}", _dns_fix())]
    if not records:
        return [
            _mx(
                PROBLEM,
                name,
                "no MX records: senders deliver to the domain's own address (RFC 5321 5.1)"
                " and never to us",
                add_us,
            )
        ]
    listing = ", ".join(f"MX {p} {h}" for p, h in records)
    if all(host == "." for _, host in records):
        return [_mx(PROBLEM, name, "null MX (RFC 7505): the domain says it takes no mail", add_us)]
    ours = [p for p, h in records if router.is_our_name(h)]
    if not ours:
        return [await _not_listed(context, domain, records, listing)]
    preference = min(ours)
    better = [(p, h) for p, h in records if p < preference and h != "."]
    if not better:
        return [
            _mx(
                PROBLEM,
                name,
                f"{listing}: nothing is preferred over MX {preference} {me}, so senders deliver"
                " here first and the relay has no host to deliver to",
                f"give the primary a lower number than ours: `{name}. IN MX 10 <primary>.`,"
                f" `{name}. IN MX {max(preference, 20)} {me}.`",
            )
        ]
    findings = []
    for p, host in better:
        us = await _our_address(router, host, cfg.delivery.mx_port)
        if us:
            findings.append(
                _mx(
                    PROBLEM,
                    name,
                    f"MX {p} {host} resolves to {us}, where we listen: the relay takes it for"
                    " itself and will not deliver to it, nor to anything after it",
                    f"point MX {p} at the primary, or give the relay one MX record named {me}",
                )
            )
    same = [h for p, h in records if p == preference and not router.is_our_name(h)]
    primaries = {parse_hostport(entry, 25)[0].lower().rstrip(".") for entry in domain.primary}
    clash = [h for h in same if h in primaries]
    if clash:
        findings.append(
            _mx(
                PROBLEM,
                name,
                f"the primary {_list(clash)} has our preference ({preference}): senders split"
                " mail between it and us at random",
                f"give {_list(clash)} a lower preference number than {preference}",
            )
        )
    if not findings:
        shared = f"; shares preference {preference} with {_list(same)}" if same else ""
        findings.append(_mx(OK, name, f"{listing}: we are behind {better[0][1]}{shared}"))
    return findings


async def _not_listed(
    context: _Context, domain: DomainConfig, records: list[tuple[int, str]], listing: str
) -> Finding:
    """No MX names us: perhaps one names us by another name (a warning), else a problem."""
    me, name = context.cfg.hostname, domain.name
    for preference, host in records:
        us = await _our_address(context.router, host, context.cfg.delivery.mx_port)
        if us:
            return _mx(
                WARNING,
                name,
                f"{listing}: MX {preference} {host} resolves to {us}, where we listen,"
                f" but our hostname is {me}: our banner, EHLO and certificate disagree with DNS",
                f'set hostname = "{host}" (and get a certificate for it)',
            )
    worst = max(p for p, _ in records)
    return _mx(
        PROBLEM,
        name,
        f"{listing}: no MX record names {me}, so senders never come to us",
        f"publish `{name}. IN MX {worst + 10} {me}.`, or set hostname to the MX name that"
        " points at this relay",
    )


async def _our_address(router: Router, host: str, port: int) -> str:
    """The address of `host` where we listen on `port` ("" if none, or if the lookup failed)."""
    if host == "." or router.is_our_name(host):
        return ""
    try:
        addresses = await router.addresses(host)
    except RouteError:
        return ""
    return next((_hostport(a, port) for a in addresses if router.listens_on(a, port)), "")


def _mx(status: str, domain: str, message: str, fix: str = "") -> Finding:
    return Finding(status, "mx", domain, message, fix)


def _dns_fix() -> str:
    return "check dns.nameservers (or /etc/resolv.conf) and that the domain's DNS answers"


# -- the primary ------------------------------------------------------------------------------


async def check_primary(context: _Context, domain: DomainConfig) -> list[Finding]:
    """The hosts the relay would deliver to answer SMTP: the same probe the scheduler runs."""
    name = domain.name
    source = "primary" if domain.primary else "MX hosts preferred over us"
    try:
        hops = await context.router.hops(name, domain.primary)
    except RouteError as exc:
        return [
            Finding(
                PROBLEM,
                "primary",
                name,
                f"no {source} to deliver to: {exc}",
                "fix the MX records (see the mx finding) or set primary in this [[domain]]"
                if not domain.primary
                else "check that each primary host name resolves, or use an address",
            )
        ]
    replies = await asyncio.gather(*(_probe(context, hop) for hop in hops))
    answered = [hop for hop, error in zip(hops, replies, strict=True) if error is None]
    failed = [(hop, error) for hop, error in zip(hops, replies, strict=True) if error is not None]
    failures = "; ".join(f"{_where(hop)}: {error}" for hop, error in failed)
    fix = (
        "the relay keeps the mail until the primary answers; check that it runs and that its"
        " firewall accepts SMTP from this relay's address"
    )
    if not answered:
        return [Finding(PROBLEM, "primary", name, f"{source} do not answer: {failures}", fix)]
    if failed:
        message = f"{_list([_where(h) for h in answered])} answer; {failures}"
        return [Finding(WARNING, "primary", name, message, fix)]
    where = _list([_where(h) for h in answered])
    return [Finding(OK, "primary", name, f"{source} answer SMTP: {where}")]


async def _probe(context: _Context, hop: Hop) -> str | None:
    """None when the hop greets us, else why not; one probe per address for all domains."""
    key = (hop.address, hop.port)
    task = context.probes.get(key)
    if task is None:
        task = asyncio.ensure_future(_probe_once(context, hop))
        context.probes[key] = task
    return await task


async def _probe_once(context: _Context, hop: Hop) -> str | None:
    try:
        await context.prober(hop, helo=context.cfg.hostname, timeout=PROBE_TIMEOUT)
    except SessionError as exc:
        return str(exc.reply)
    return None


def _where(hop: Hop) -> str:
    return f"{hop.host} {_hostport(hop.address, hop.port)}"


# -- MTA-STS ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """An MTA-STS policy (RFC 8461 3.2) as far as the doctor needs it."""

    version: str
    mode: str
    mx: tuple[str, ...]


def parse_policy(text: str) -> Policy:
    """RFC 8461 3.2: "key: value" lines; `mx` may repeat. Unknown keys are ignored."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), []).append(value.strip())
    return Policy(
        version=(fields.get("version") or [""])[0],
        mode=(fields.get("mode") or [""])[0],
        mx=tuple(fields.get("mx", [])),
    )


async def check_mta_sts(context: _Context, domain: DomainConfig) -> list[Finding]:
    """If the domain publishes MTA-STS, its policy must list us, or enforcing senders skip us."""
    name, me = domain.name, context.cfg.hostname
    try:
        records = await context.router.txt_records(f"_mta-sts.{name}")
    except RouteError as exc:
        return [_sts(WARNING, name, f"cannot look up _mta-sts.{name} TXT: {exc}", _dns_fix())]
    # RFC 8461 3.1: records not starting with v=STSv1 are ignored; more than one is no policy.
    sts = [r for r in records if r.replace(" ", "").startswith("v=STSv1")]
    if not sts:
        return [_sts(OK, name, "no MTA-STS policy published (nothing to check)")]
    if len(sts) > 1:
        return [
            _sts(
                WARNING,
                name,
                f"{len(sts)} v=STSv1 TXT records at _mta-sts.{name}: senders see no policy",
                "keep exactly one",
            )
        ]
    url = context.mta_sts_url.format(domain=name)
    try:
        content_type, text = await asyncio.to_thread(context.fetch, url, FETCH_TIMEOUT)
    except PolicyFetchError as exc:
        return [
            _sts(
                WARNING,
                name,
                f"_mta-sts.{name} says a policy exists but {url} failed: {exc}",
                f"serve the policy at {url} over HTTPS with a valid certificate for"
                f" mta-sts.{name}, or remove the TXT record",
            )
        ]
    policy = parse_policy(text)
    findings = []
    if policy.version != "STSv1" or policy.mode not in ("enforce", "testing", "none"):
        findings.append(
            _sts(
                WARNING,
                name,
                f"{url}: not a valid policy (version {policy.version or '-'},"
                f" mode {policy.mode or '-'}): senders ignore it",
                "see RFC 8461 3.2: version: STSv1, mode, one mx: line per host, max_age",
            )
        )
        return findings
    if content_type.split(";")[0].strip().lower() != "text/plain":
        findings.append(
            _sts(
                WARNING,
                name,
                f"{url} is served as {content_type or 'no content type'}: RFC 8461 3.2 wants"
                " text/plain and strict senders ignore anything else",
                "serve it with Content-Type: text/plain",
            )
        )
    covered = any(name_matches(pattern, me) for pattern in policy.mx)
    patterns = _list(policy.mx) or "no host"
    if policy.mode == "none":
        findings.append(_sts(OK, name, "policy mode none: senders do not enforce it"))
    elif not covered:
        status = PROBLEM if policy.mode == "enforce" else WARNING
        effect = (
            "senders enforcing it will not deliver to us"
            if policy.mode == "enforce"
            else "senders in testing mode deliver but report failures"
        )
        findings.append(
            _sts(
                status,
                name,
                f"policy mode {policy.mode} lists {patterns} but not {me}: {effect}",
                f"add `mx: {me}` to {url} and change the id= in the _mta-sts.{name} TXT record"
                " so that senders fetch it again",
            )
        )
    elif not context.cfg.tls.enabled:
        status = PROBLEM if policy.mode == "enforce" else WARNING
        findings.append(
            _sts(
                status,
                name,
                f"policy mode {policy.mode} lists us, but we offer no STARTTLS, which it requires",
                f"configure [tls] cert and key with a certificate for {me}",
            )
        )
    else:
        findings.append(_sts(OK, name, f"policy mode {policy.mode} lists us ({patterns})"))
    return findings


def _sts(status: str, domain: str, message: str, fix: str = "") -> Finding:
    return Finding(status, "mta-sts", domain, message, fix)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """RFC 8461 3.3: "HTTP 3xx redirects MUST NOT be followed"."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def fetch_policy(url: str, timeout: float) -> tuple[str, str]:
    """GET `url` as a sender would (no proxy, no redirects, verified HTTPS, 64 KB at most).

    Returns (content type, text); raises PolicyFetchError.
    """
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        _NoRedirects(),
        urllib.request.HTTPSHandler(context=ssl.create_default_context()),
    )
    try:
        with opener.open(url, timeout=timeout) as response:
            body: bytes = response.read(MTA_STS_MAX_BYTES + 1)
            content_type = str(response.headers.get("Content-Type", ""))
    except urllib.error.HTTPError as exc:
        raise PolicyFetchError(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise PolicyFetchError(str(exc.reason)) from None
    except (OSError, ValueError) as exc:
        raise PolicyFetchError(str(exc) or type(exc).__name__) from None
    if len(body) > MTA_STS_MAX_BYTES:
        raise PolicyFetchError(f"larger than {MTA_STS_MAX_BYTES} bytes")
    return content_type, body.decode("utf-8", "replace")


# -- reports ----------------------------------------------------------------------------------


def counts(findings: Sequence[Finding]) -> dict[str, int]:
    return {status: sum(f.status == status for f in findings) for status in STATUSES}


def report_text(findings: Sequence[Finding]) -> str:
    """One block per finding, its fix indented under it, and a count at the end."""
    lines = []
    for f in findings:
        lines.append(f"{f.status:<8} {f.check:<10} {f.subject}: {f.message}")
        if f.fix:
            lines.append(f"{'':<19} {'how' if f.status == INFO else 'fix'}: {f.fix}")
    n = counts(findings)
    words = {
        OK: f"{n[OK]} ok",
        INFO: f"{n[INFO]} to check by hand",
        WARNING: plural(n[WARNING], "warning"),
        PROBLEM: plural(n[PROBLEM], "problem"),
    }
    summary = ", ".join(words[s] for s in STATUSES)
    lines += ["", summary]
    return "\n".join(lines)


def report_json(findings: Sequence[Finding]) -> str:
    """{"findings": [...], "ok": n, "warning": n, "problem": n}: a contract for scripts."""
    return json.dumps({"findings": [asdict(f) for f in findings], **counts(findings)}, indent=2)
