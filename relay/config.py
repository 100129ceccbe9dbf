"""Load and validate the relay's TOML configuration into frozen dataclasses.

Defaults → file → environment overrides → one validation pass. Every problem found is reported at
once, each naming the file, the key and what is wrong, so an operator fixes a file in one go rather
than one error per restart. No I/O beyond reading the file and checking the queue directory.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from relay.envelope import domain_key, split
from relay.tls import TLS_MODES

T = TypeVar("T")

DEFAULT_PORT = 25
VERIFY_MODES = ("none", "callout")
ACCEPT_MODES = ("always", "when_primary_down")
EXPIRY_ACTIONS = ("bounce", "hold")
UNKNOWN_WHILE_DOWN = ("tempfail", "accept")
LOG_FORMATS = ("text", "json")
RSPAMD_FAILURE = ("accept", "tempfail")
SPF_FAIL = ("tag", "reject")
DMARC_REJECT = ("honour", "tag")
BOUNCE_UNAUTHENTICATED = ("hold", "send", "discard")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


class ConfigError(Exception):
    """One or more problems in a configuration file; `problems` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_duration(value: object) -> float:
    """Seconds from "30s", "10m", "4h", "5d", "1w" or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 10m, 4h or 5d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if not isinstance(value, str) or not (match := _DURATION.match(value.lower())):
        raise ValueError(f"bad duration {value!r}: expected a number with s, m, h, d or w")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: object) -> int:
    """Bytes from "512K", "50M", "1G" (powers of 1024) or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512K, 50M or 1G")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if not isinstance(value, str) or not (match := _SIZE.match(value)):
        raise ValueError(f"bad size {value!r}: expected a number with K, M, G or T")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_hostport(value: object, default_port: int | None = None) -> tuple[str, int]:
    """("host", port) from "host:port", "1.2.3.4:25", "[::1]:25" (or bare host with a default)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'expected "host:port", got {value!r}')
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"bad address {value!r}: missing ']'")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad address {value!r}")
    elif text.count(":") > 1:
        host, port_text = text, ""  # a bare IPv6 literal
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"bad address {value!r}: empty host")
    if not port_text:
        if default_port is None:
            raise ValueError(f"bad address {value!r}: expected host:port")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad port in {value!r}")
    return host, int(port_text)


@dataclass(frozen=True)
class SmtpConfig:
    listen: tuple[tuple[str, int], ...] = (("0.0.0.0", 25), ("::", 25))
    max_message_size: int = 50 * 1024**2
    max_recipients: int = 100
    max_hops: int = 50
    etrn_clients: tuple[str, ...] = ()
    max_connections: int = 200
    max_connections_per_ip: int = 20
    max_messages_per_session: int = 100
    max_unknown_recipients: int = 20
    rate_per_ip: int = 120
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    # DATA earns time as it arrives: each N bytes add N / min_data_rate seconds to its deadline
    # (Postfix 3.7's smtpd_min_data_rate), so a trickle cannot hold a slot for ever; 0 = off.
    min_data_rate: int = 500
    max_junk_commands: int = 100  # NOOP, RSET, VRFY, EXPN, HELP per connection (Postfix: 100)
    # Above 80 % of max_connections: every timeout at most this (Postfix's ${stress?10}{300}).
    stress_timeout: float = 10.0
    max_line_length: int = 2048
    max_inflight_bytes: int = 256 * 1024**2
    # Processes that run SMTP sessions (relay.workers); 1 = the relay process alone, as before.
    workers: int = 1


@dataclass(frozen=True)
class TlsConfig:
    cert: str = ""
    key: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)


@dataclass(frozen=True)
class QueueConfig:
    path: str = "/var/lib/relay/queue.db"
    lifetime: float = 5 * 86400.0
    on_expiry: str = "bounce"
    min_free_space: int = 1024**3


@dataclass(frozen=True)
class DeliveryConfig:
    concurrency: int = 20
    per_host_concurrency: int = 20  # Postfix's default_destination_concurrency_limit
    probe_interval: float = 5.0
    mx_port: int = DEFAULT_PORT
    timeout: float = 300.0
    cafile: str = ""


@dataclass(frozen=True)
class RetryConfig:
    min: float = 60.0
    max: float = 600.0
    warn_after: float | None = None


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, int] | None = ("127.0.0.1", 9325)


@dataclass(frozen=True)
class RescueConfig:
    # Where rescue Maildirs live (<path>/<domain>/<local>/) and Dovecot's passwd-file
    # (<path>/passwd); "" means `rescue` next to the queue file.
    path: str = ""


@dataclass(frozen=True)
class StatusConfig:
    """The /status page for the people waiting for their mail (relay.status)."""

    # Its own listener, for a page anyone may read; unset: /status only on metrics.listen.
    listen: tuple[str, int] | None = None
    public: bool = False  # must be true with `listen`: the page is then served to anyone


@dataclass(frozen=True)
class SpamConfig:
    """Spam checks: at the door, DNS lists and the pregreet test like postscreen (relay.dnsbl);
    at the end of DATA, before the 250, the content through rspamd (relay.rspamd)."""

    dnsbl: tuple[str, ...] = ()  # postscreen_dnsbl_sites entries: zone[=filter][*weight]
    dnsbl_threshold: int = 3
    dnsbl_action: str = "rcpt"  # refuse at each RCPT (the log names recipients) or "banner"
    dnsbl_timeout: float = 5.0  # one deadline for every list; a silent list blocks nothing
    greet_delay: float = 0.0  # wait this long before the banner; a client talking first is out

    rspamd: str = ""  # "http://host:port" of rspamd's normal worker; "" = no content check
    # What a message gets when rspamd cannot answer in time: a backup MX that refuses mail
    # because its filter is down sends it back to a primary that is down too, so "accept".
    rspamd_failure: str = "accept"
    # Longer than rspamd's own task_timeout (8s), so that a slow scan ends with rspamd's
    # partial answer rather than our giving up; far below the 10 minutes a client waits.
    rspamd_timeout: float = 10.0

    # SPF, DKIM and DMARC at the end of DATA (relay.smtp.auth), an Authentication-Results header
    # for the primary, and the results stored for the no-backscatter rule (issue 15).
    auth: bool = True
    auth_timeout: float = 10.0  # one deadline for every lookup of one message


@dataclass(frozen=True)
class ArcConfig:
    """The ARC seal (relay.smtp.arc): our Authentication-Results, signed for the primary."""

    key: str = ""  # PEM RSA private key (relay arc keygen); "" = no seal
    selector: str = ""  # the key is published at <selector>._domainkey.<domain>
    domain: str = ""  # the signing domain, d= (the one a primary lists as a trusted sealer)


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"


@dataclass(frozen=True)
class DomainConfig:
    name: str
    primary: tuple[str, ...] = ()
    tls: str = "opportunistic"
    recipients: tuple[str, ...] = ()
    recipients_file: str = ""
    verify: str = "none"
    verify_positive_ttl: float = 7 * 86400.0
    verify_negative_ttl: float = 3600.0
    verify_unknown_while_down: str = "tempfail"
    accept: str = "always"
    # Rescue mailboxes (relay.rescue): copies of held mail people can read over IMAP (Dovecot)
    # once the primary has been down for rescue_after; removed rescue_keep after delivery.
    rescue: bool = False
    rescue_after: float = 30 * 60.0
    rescue_keep: float = 2 * 86400.0
    # Sender authentication policy (relay.smtp.auth): what a failing sender gets here, and
    # whether a refused message's DSN may go to a sender nobody authenticated (backscatter).
    spf_fail: str = "tag"
    dmarc_reject: str = "honour"
    bounce_unauthenticated: str = "hold"


@dataclass(frozen=True)
class Config:
    hostname: str
    domains: tuple[DomainConfig, ...]
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    spam: SpamConfig = field(default_factory=SpamConfig)
    rescue: RescueConfig = field(default_factory=RescueConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    arc: ArcConfig = field(default_factory=ArcConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Where mail for our own postmaster goes (RCPT TO:<postmaster>, postmaster@ and abuse@ our
    # hostname), with double bounces and copies of operator bounces (RFC 5321 4.5.1).
    postmaster: str | None = None
    source: str = "<defaults>"
    _by_name: dict[str, DomainConfig] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {domain_key(d.name): d for d in self.domains})

    def domain(self, name: str) -> DomainConfig | None:
        """The configured domain for `name`: ASCII case-insensitive, a U-label equal to its
        A-label (envelope.domain_key), and exact (no implied subdomains)."""
        return self._by_name.get(domain_key(name))


class _Reader:
    """Walks one TOML table, converting values and collecting problems instead of raising."""

    def __init__(self, source: str, table: Mapping[str, Any], prefix: str, problems: list[str]):
        self.source = source
        self.table = table
        self.prefix = prefix
        self.problems = problems
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def problem(self, name: str, message: str) -> None:
        self.problems.append(f"{self.source}: {self.key(name)}: {message}")

    def get(self, name: str, default: T, convert: Callable[[Any], T]) -> T:
        self.seen.add(name)
        if name not in self.table:
            return default
        try:
            return convert(self.table[name])
        except (ValueError, TypeError) as exc:
            self.problem(name, str(exc))
            return default

    def finish(self) -> None:
        for name in self.table:
            if name not in self.seen:
                self.problem(name, "unknown key")


def _int(minimum: int = 0) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {value!r}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return convert


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return convert


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _address(value: Any) -> str:
    """A plain mailbox, local@domain, as an envelope would carry it (no <>, no comments)."""
    text = _text(value).strip()
    local, domain = split(text)
    if not local or "." not in domain or any(c.isspace() or c in "<>,;" for c in text):
        raise ValueError(f"expected an address such as hostmaster@example.org, got {value!r}")
    return f"{local}@{domain.lower().rstrip('.')}"


def _loopback(host: str) -> bool:
    """Whether a listen address takes connections from this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _listen(value: Any) -> tuple[tuple[str, int], ...]:
    items = [value] if isinstance(value, str) else _strings(value)
    if not items:
        raise ValueError("needs at least one host:port")
    return tuple(parse_hostport(item) for item in items)


def _optional_listen(value: Any) -> tuple[str, int] | None:
    if value in ("", False):
        return None
    return parse_hostport(value)


def _optional_duration(value: Any) -> float | None:
    if value in ("", 0, False, "off"):
        return None
    return parse_duration(value)


def _nameservers(value: Any) -> tuple[str, ...]:
    servers = _strings(value)
    for server in servers:
        host, _ = parse_hostport(server, default_port=53)
        ipaddress.ip_address(host)  # raises ValueError naming the bad address
    return servers


def _etrn_clients(value: Any) -> tuple[str, ...]:
    clients = _strings(value)
    for client in clients:
        ipaddress.ip_network(client, strict=False)
    return clients


_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_HOSTNAME = 253  # octets of a name in text form (RFC 1035 2.3.4, without the final dot)


def hostname_problem(name: str) -> str | None:
    """Why `name` cannot be our name in the banner, in EHLO and in Received, or None.

    The name is written raw into every greeting and trace header: a CR LF in it would let a
    config line inject whole SMTP replies, a space would break the EHLO syntax. So it is a host
    name (LDH labels of 1-63 characters, 253 in all, RFC 1035 2.3.1 / RFC 1123 2.1) or an
    address literal, `[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 4.1.3), as Postfix's
    valid_hostname() and valid_hostaddr() want for myhostname.
    """
    if name.startswith("["):
        inside = name[1:-1] if name.endswith("]") else None
        try:
            if inside is None:
                raise ValueError
            if inside[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(inside[5:])
            else:
                ipaddress.IPv4Address(inside)
        except ValueError:
            return "not an address literal such as [192.0.2.1] or [IPv6:2001:db8::1]"
        return None
    if not name:
        return "empty"
    if len(name) > MAX_HOSTNAME:
        return f"longer than {MAX_HOSTNAME} characters"
    if bad := sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in ".-"))}):
        shown = ", ".join(repr(c) for c in bad)
        return f"{shown} not allowed: letters, digits, hyphens and dots only (or [address])"
    for label in name.split("."):
        if not label:
            return "empty label (two dots in a row, or a leading dot)"
        if len(label) > 63:
            return f"label {label[:20]}… is longer than 63 characters"
        if not _LDH_LABEL.fullmatch(label):
            return f"label {label!r} starts or ends with a hyphen"
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return None
    return f"an IP address is written as an address literal, [{name}]"


def _hostname(value: Any) -> str:
    name = _text(value).strip().rstrip(".")
    if not name:
        return ""  # the machine's name (_machine_name)
    if (problem := hostname_problem(name)) is not None:
        raise ValueError(f"bad host name {value!r}: {problem}")
    return name


def _machine_name(source: str, problems: list[str]) -> str:
    """The machine's FQDN when `hostname` is not set: checked like a configured one."""
    name = socket.getfqdn().rstrip(".")
    if (problem := hostname_problem(name)) is not None:
        problems.append(
            f"{source}: hostname: not set, and this machine's name {name!r} is not usable:"
            f" {problem}; set hostname"
        )
    return name


def _domain_name(value: Any) -> str:
    name = _text(value).strip().rstrip(".")
    # IDNA 2008, as mail for the domain is matched (envelope.domain_key), not Python's IDNA 2003;
    # checked before any lower(), which would turn a Kelvin sign into a "k".
    if not name or not re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)*", domain_key(name)):
        raise ValueError(f"bad domain name {value!r}")
    return name.lower()


def _primaries(value: Any) -> tuple[str, ...]:
    hops = _strings(value)
    for hop in hops:
        parse_hostport(hop, default_port=DEFAULT_PORT)
    return hops


def _read_smtp(r: _Reader) -> SmtpConfig:
    d = SmtpConfig()
    return SmtpConfig(
        listen=r.get("listen", d.listen, _listen),
        max_message_size=r.get("max_message_size", d.max_message_size, parse_size),
        max_recipients=r.get("max_recipients", d.max_recipients, _int(1)),
        max_hops=r.get("max_hops", d.max_hops, _int(1)),
        etrn_clients=r.get("etrn_clients", d.etrn_clients, _etrn_clients),
        max_connections=r.get("max_connections", d.max_connections, _int(1)),
        max_connections_per_ip=r.get("max_connections_per_ip", d.max_connections_per_ip, _int(1)),
        max_messages_per_session=r.get(
            "max_messages_per_session", d.max_messages_per_session, _int(1)
        ),
        max_unknown_recipients=r.get("max_unknown_recipients", d.max_unknown_recipients, _int(1)),
        rate_per_ip=r.get("rate_per_ip", d.rate_per_ip, _int(0)),
        command_timeout=r.get("command_timeout", d.command_timeout, parse_duration),
        data_timeout=r.get("data_timeout", d.data_timeout, parse_duration),
        min_data_rate=r.get("min_data_rate", d.min_data_rate, _int(0)),
        max_junk_commands=r.get("max_junk_commands", d.max_junk_commands, _int(1)),
        stress_timeout=r.get("stress_timeout", d.stress_timeout, parse_duration),
        max_line_length=r.get("max_line_length", d.max_line_length, _int(512)),
        max_inflight_bytes=r.get("max_inflight_bytes", d.max_inflight_bytes, parse_size),
        workers=r.get("workers", d.workers, _workers),
    )


MAX_WORKERS = 64


def _workers(value: Any) -> int:
    """smtp.workers: a count, or "auto" for one per core this process may run on."""
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'expected a whole number or "auto", got {value!r}')
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"must be from 1 to {MAX_WORKERS}, got {value}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _dnsbl_sites(value: Any) -> tuple[str, ...]:
    from relay.smtp.dnsbl import parse_site

    sites = _strings(value)
    for site in sites:
        parse_site(site)  # ValueError names the entry and what is wrong
    return sites


def _read_status(r: _Reader) -> StatusConfig:
    status = StatusConfig(
        listen=r.get("listen", None, _optional_listen), public=r.get("public", False, _flag)
    )
    if status.listen is not None and not status.public:
        r.problem(
            "listen",
            "a listener of its own serves the page to anyone who can connect: set"
            " status.public = true, or leave status.listen out to serve /status on"
            " metrics.listen only",
        )
    return status


def _rspamd_url(value: Any) -> str:
    """rspamd's normal worker speaks plain HTTP (RFC 9112) on a port of its own, 11333 unless
    configured otherwise; a path is kept for an rspamd behind a proxy."""
    text = _text(value).strip()
    if not text:
        return ""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "http":
        raise ValueError(
            f"expected an http:// URL such as http://127.0.0.1:11333, got {value!r}"
            " (rspamd's worker speaks plain HTTP: keep it on loopback or a private network)"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in {value!r}") from exc
    if not parts.hostname or parts.username or parts.query or parts.fragment:
        raise ValueError(f"expected http://host:port, got {value!r}")
    if port == 0:
        raise ValueError(f"bad port in {value!r}")
    return text


def _read_spam(r: _Reader) -> SpamConfig:
    d = SpamConfig()
    spam = SpamConfig(
        dnsbl=r.get("dnsbl", d.dnsbl, _dnsbl_sites),
        dnsbl_threshold=r.get("dnsbl_threshold", d.dnsbl_threshold, _int(1)),
        dnsbl_action=r.get("dnsbl_action", d.dnsbl_action, _choice(("rcpt", "banner"))),
        dnsbl_timeout=r.get("dnsbl_timeout", d.dnsbl_timeout, parse_duration),
        greet_delay=r.get("greet_delay", d.greet_delay, parse_duration),
        rspamd=r.get("rspamd", d.rspamd, _rspamd_url),
        rspamd_failure=r.get("rspamd_failure", d.rspamd_failure, _choice(RSPAMD_FAILURE)),
        rspamd_timeout=r.get("rspamd_timeout", d.rspamd_timeout, parse_duration),
        auth=r.get("auth", d.auth, _flag),
        auth_timeout=r.get("auth_timeout", d.auth_timeout, parse_duration),
    )
    for key in ("rspamd_timeout", "auth_timeout"):
        if getattr(spam, key) <= 0:
            r.problem(key, "must be greater than 0")
    return spam


def _read_arc(r: _Reader, spam: SpamConfig) -> ArcConfig:
    arc = ArcConfig(
        key=r.get("key", "", _text),
        selector=r.get("selector", "", _text),
        domain=r.get("domain", "", _text),
    )
    if not arc.key:
        return arc
    from relay.smtp.arc import NAME, ArcKeyError, load_key

    try:
        load_key(arc.key)
    except ArcKeyError as exc:
        r.problem("key", str(exc))
    for name in ("selector", "domain"):
        value = getattr(arc, name)
        if not value:
            r.problem(
                name, "required with arc.key: the key is published at selector._domainkey.domain"
            )
        elif not NAME.fullmatch(value):
            r.problem(name, f"{value!r} is not a DNS name")
    if not spam.auth:
        r.problem("key", "an ARC seal carries the sender checks' results: needs spam.auth = true")
    return arc


def _read_tls(r: _Reader) -> TlsConfig:
    tls = TlsConfig(cert=r.get("cert", "", _text), key=r.get("key", "", _text))
    if bool(tls.cert) != bool(tls.key):
        r.problem("cert" if not tls.cert else "key", "cert and key must be set together")
    for name in ("cert", "key"):
        path = getattr(tls, name)
        if path and not os.access(path, os.R_OK):
            r.problem(name, f"cannot read {path}")
    return tls


def _read_queue(r: _Reader) -> QueueConfig:
    d = QueueConfig()
    return QueueConfig(
        path=r.get("path", d.path, _text),
        lifetime=r.get("lifetime", d.lifetime, parse_duration),
        on_expiry=r.get("on_expiry", d.on_expiry, _choice(EXPIRY_ACTIONS)),
        min_free_space=r.get("min_free_space", d.min_free_space, parse_size),
    )


def _read_delivery(r: _Reader) -> DeliveryConfig:
    d = DeliveryConfig()
    return DeliveryConfig(
        concurrency=r.get("concurrency", d.concurrency, _int(1)),
        per_host_concurrency=r.get("per_host_concurrency", d.per_host_concurrency, _int(1)),
        probe_interval=r.get("probe_interval", d.probe_interval, parse_duration),
        mx_port=r.get("mx_port", d.mx_port, _int(1)),
        timeout=r.get("timeout", d.timeout, parse_duration),
        cafile=r.get("cafile", d.cafile, _text),
    )


def _read_retry(r: _Reader) -> RetryConfig:
    d = RetryConfig()
    retry = RetryConfig(
        min=r.get("min", d.min, parse_duration),
        max=r.get("max", d.max, parse_duration),
        warn_after=r.get("warn_after", d.warn_after, _optional_duration),
    )
    if retry.min <= 0:
        r.problem("min", "must be greater than 0")
    if retry.max < retry.min:
        r.problem("max", f"must not be less than retry.min ({retry.min:g}s)")
    return retry


def _read_domain(r: _Reader) -> DomainConfig | None:
    name = r.get("name", "", _domain_name)
    d = DomainConfig(name=name)
    domain = DomainConfig(
        name=name,
        primary=r.get("primary", d.primary, _primaries),
        tls=r.get("tls", d.tls, _choice(TLS_MODES)),
        recipients=r.get("recipients", d.recipients, _strings),
        recipients_file=r.get("recipients_file", d.recipients_file, _text),
        verify=r.get("verify", d.verify, _choice(VERIFY_MODES)),
        verify_positive_ttl=r.get("verify_positive_ttl", d.verify_positive_ttl, parse_duration),
        verify_negative_ttl=r.get("verify_negative_ttl", d.verify_negative_ttl, parse_duration),
        verify_unknown_while_down=r.get(
            "verify_unknown_while_down", d.verify_unknown_while_down, _choice(UNKNOWN_WHILE_DOWN)
        ),
        accept=r.get("accept", d.accept, _choice(ACCEPT_MODES)),
        rescue=r.get("rescue", d.rescue, _flag),
        rescue_after=r.get("rescue_after", d.rescue_after, parse_duration),
        rescue_keep=r.get("rescue_keep", d.rescue_keep, parse_duration),
        spf_fail=r.get("spf_fail", d.spf_fail, _choice(SPF_FAIL)),
        dmarc_reject=r.get("dmarc_reject", d.dmarc_reject, _choice(DMARC_REJECT)),
        bounce_unauthenticated=r.get(
            "bounce_unauthenticated", d.bounce_unauthenticated, _choice(BOUNCE_UNAUTHENTICATED)
        ),
    )
    if "name" not in r.table:
        r.problem("name", "missing: every [[domain]] needs a name")
        return None
    if domain.recipients_file and not os.access(domain.recipients_file, os.R_OK):
        r.problem("recipients_file", f"cannot read {domain.recipients_file}")
    return domain if name else None


def _table(value: Any, source: str, key: str, problems: list[str]) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    problems.append(f"{source}: {key}: expected a table, got {value!r}")
    return {}


def _check_queue_dir(source: str, path: str, problems: list[str]) -> None:
    """The queue directory must be writable or creatable: fail at start, not at the first 250."""
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        problems.append(f"{source}: queue.path: {target} is a directory, not a database file")
        return
    directory = target.parent
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        problems.append(
            f"{source}: queue.path: directory {directory} cannot be created:"
            f" {probe} is not a directory"
        )
    elif not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == directory else f"cannot be created under {probe}"
        problems.append(f"{source}: queue.path: directory {directory} {what}")


# Keys a running server cannot take up on SIGHUP: its sockets, its queue file, its log set-up
# and its pool of delivery sessions are made once, at start. Every other key applies on reload
# (docs/operations.md, "What SIGHUP applies").
NEEDS_RESTART = (
    "smtp.listen",
    "queue.path",
    "metrics.listen",
    "status.listen",
    "log.format",
    "delivery.concurrency",
    "smtp.workers",
)


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ between two configurations ("domain" for domains)."""
    changed = [] if old.hostname == new.hostname else ["hostname"]
    if old.postmaster != new.postmaster:
        changed.append("postmaster")
    sections = (
        *("smtp", "tls", "queue", "delivery", "retry"),
        *("metrics", "status", "rescue", "spam", "dns", "log"),
    )
    for section in sections:
        before, after = getattr(old, section), getattr(new, section)
        changed += [
            f"{section}.{f.name}"
            for f in fields(before)
            if getattr(before, f.name) != getattr(after, f.name)
        ]
    if old.domains != new.domains:
        changed.append("domain")
    return changed


def keep_running(old: Config, new: Config, keys: Sequence[str]) -> Config:
    """`new` with the running values of `keys` (those NEEDS_RESTART): what the server runs on."""
    for key in keys:
        section, _, name = key.partition(".")
        running = getattr(old, section)
        kept = replace(getattr(new, section), **{name: getattr(running, name)})
        new = replace(new, **{section: kept})
    return new


def from_mapping(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validates a parsed TOML document; raises ConfigError listing every problem."""
    problems: list[str] = []
    top = _Reader(source, data, "", problems)
    before = len(problems)
    hostname = top.get("hostname", "", _hostname)
    if not hostname:  # not set, or set wrong (then that is the problem to report, not this)
        hostname = _machine_name(source, problems if len(problems) == before else [])

    def section(name: str) -> _Reader:
        top.seen.add(name)
        return _Reader(
            source, _table(data.get(name, {}), source, name, problems), f"{name}.", problems
        )

    readers = {name: section(name) for name in ("smtp", "tls", "queue", "delivery", "retry")}
    readers |= {name: section(name) for name in ("metrics", "status", "rescue", "spam")}
    readers |= {name: section(name) for name in ("dns", "log", "arc")}
    smtp = _read_smtp(readers["smtp"])
    tls = _read_tls(readers["tls"])
    queue = _read_queue(readers["queue"])
    delivery = _read_delivery(readers["delivery"])
    retry = _read_retry(readers["retry"])
    metrics = MetricsConfig(
        listen=readers["metrics"].get("listen", MetricsConfig().listen, _optional_listen)
    )
    status = _read_status(readers["status"])
    spam = _read_spam(readers["spam"])
    rescue = RescueConfig(
        path=readers["rescue"].get("path", "", _text)
        or str(Path(queue.path).resolve().parent / "rescue")
    )
    dns = DnsConfig(nameservers=readers["dns"].get("nameservers", (), _nameservers))
    log = LogConfig(format=readers["log"].get("format", "text", _choice(LOG_FORMATS)))
    arc = _read_arc(readers["arc"], spam)

    top.seen.add("domain")
    raw_domains = data.get("domain", [])
    if not isinstance(raw_domains, list):
        problems.append(f"{source}: domain: expected [[domain]] tables")
        raw_domains = []
    domains: list[DomainConfig] = []
    # A set, not a scan of the list so far: operators list thousands of customer domains, and a
    # comparison with every earlier entry made loading 10,000 of them take seconds (issue 18).
    seen_names: set[str] = set()
    for index, raw in enumerate(raw_domains):
        reader = _Reader(source, _table(raw, source, f"domain[{index}]", problems), "", problems)
        reader.prefix = f"domain[{index}]."
        domain = _read_domain(reader)
        reader.finish()
        if domain is None:
            continue
        key = domain_key(domain.name)  # a U-label and its A-label are one domain
        if key in seen_names:
            problems.append(f"{source}: domain[{index}].name: {domain.name} is listed twice")
        seen_names.add(key)
        domains.append(domain)
    if not raw_domains:
        problems.append(
            f"{source}: domain: no [[domain]] configured: the relay would accept nothing"
        )

    postmaster = top.get("postmaster", None, _address)
    if postmaster is None and not all(_loopback(host) for host, _ in smtp.listen):
        problems.append(
            f"{source}: postmaster: required when smtp.listen takes mail from other hosts: the"
            f" address where mail to postmaster@{hostname} and abuse@{hostname}, double bounces"
            " and copies of operator bounces go (RFC 5321 4.5.1), e.g. hostmaster@example.org"
        )
    for reader in (top, *readers.values()):
        reader.finish()
    _check_queue_dir(source, queue.path, problems)
    if problems:
        raise ConfigError(problems)
    return Config(
        hostname=hostname,
        domains=tuple(domains),
        smtp=smtp,
        tls=tls,
        queue=queue,
        delivery=delivery,
        retry=retry,
        metrics=metrics,
        status=status,
        spam=spam,
        rescue=rescue,
        dns=dns,
        arc=arc,
        log=log,
        postmaster=postmaster,
        source=source,
    )


def load(path: str | os.PathLike[str]) -> Config:
    """Reads and validates a TOML file. Relative queue/TLS paths stay relative to the cwd."""
    source = str(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"]) from exc
    return from_mapping(data, source)


def default_path() -> str | None:
    """The config named by RELAY_CONFIG, the operator's override of the packaged default."""
    return os.environ.get("RELAY_CONFIG") or None
