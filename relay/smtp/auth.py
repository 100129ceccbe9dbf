"""Sender authentication at the end of DATA: SPF (RFC 7208), DKIM (RFC 6376), DMARC (RFC 7489).

A backup MX sits between the sender and the primary: once it relays, the primary's own SPF
check sees the relay's address, not the sender's. So the relay checks what the primary no
longer can, before the 250, and says what it found in an Authentication-Results header (RFC
8601) with its hostname as authserv-id; forged copies of that header are removed first (RFC
8601 5), so the primary can trust it. The results are stored with the message too
(relay.authresults): a DSN goes only to a sender who was authenticated.

Libraries: pyspf for SPF (the reference implementation the RFC's test suite was written
against; authheaders, the only alternative that evaluates messages, calls it too) and dkimpy
for DKIM (maintained, and its ARC support is what the ARC sealer uses). DMARC is evaluated
here (record discovery, policy, alignment: a page of RFC 7489), with the organizational domain
from publicsuffixlist, because authheaders' DMARC code has its own DNS path (no deadline, no
temperror) and an outdated suffix list.

Both libraries are synchronous and look records up as they go. They run on the event loop,
reading answers from `Lookups`; a record not fetched yet stops the check (NeedAnswer), the
relay's asynchronous resolver (relay.delivery.mx) fetches it, and the check runs again. One
deadline covers the whole message, `spam.auth_timeout`. A lookup that fails or runs out of
time is a temperror, and a temperror never refuses mail.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from email.utils import getaddresses
from typing import Any, TypeVar

import dkim
import dns.rdata
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.TXT
import spf

from relay.authresults import AuthResults, Signature, aligned, org_domain
from relay.delivery.mx import RouteError, Router
from relay.envelope import domain_of
from relay.ops import metrics
from relay.smtp.headers import edit, fields, fold, split

HEADER = "Authentication-Results"
MAX_SIGNATURES = 5  # DKIM signatures verified per message; each costs a lookup and a hash
_DKIM_LOG = logging.Logger("relay.auth.dkimpy", level=logging.CRITICAL)  # we report results
_thread = threading.local()
T = TypeVar("T")
MAX_LOOKUPS = 40  # SPF allows 10 DNS mechanisms, each with its own A or MX lookups; past that


class TemporaryFailure(Exception):
    """A lookup that timed out or failed."""


class NeedAnswer(BaseException):
    """Raised through a library when it asks for a name not fetched yet: the check runs again
    once the event loop has the answer. A BaseException, so that the libraries' own
    `except Exception` clauses let it through."""

    def __init__(self, key: tuple[str, str]) -> None:
        super().__init__(key)
        self.key = key


class Lookups:
    """The DNS answers of one message's checks.

    The libraries are synchronous and ask for records as they go. They run on the event loop,
    and every record they ask for comes from here: an answer fetched earlier, or NeedAnswer,
    after which `answered` fetches it with the relay's resolver (relay.delivery.mx) and runs
    the check again from the start. A check costs a fraction of a millisecond of CPU; running
    it once per lookup is cheaper than threads, whose hand-offs of the GIL with a busy event
    loop cost milliseconds each (measured: a thread per check held 20 senders to a quarter of
    this design's rate)."""

    def __init__(self, router: Router):
        self.router = router
        self.answers: dict[tuple[str, str], list[dns.rdata.Rdata] | str] = {}
        self.failed = False  # a lookup failed: the check that asked it is a temperror
        self.missing = False  # a DKIM key that is not in the DNS

    def records(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        key = (name.lower().rstrip("."), rdtype)
        if key not in self.answers:
            raise NeedAnswer(key)
        answer = self.answers[key]
        if isinstance(answer, str):
            self.failed = True
            raise TemporaryFailure(answer)
        return answer

    async def fetch(self, key: tuple[str, str]) -> None:
        if len(self.answers) >= MAX_LOOKUPS:
            self.answers[key] = f"more than {MAX_LOOKUPS} lookups for one message"
            return
        try:
            self.answers[key] = await self.router.records(*key)
        except RouteError as exc:
            self.answers[key] = str(exc)

    async def answered(self, check: Callable[[], T]) -> T:
        """`check()`, run again after each answer it was missing, until it needs no more."""
        while True:
            try:
                return check()
            except NeedAnswer as need:
                await self.fetch(need.key)

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record of `name`, its strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
        return [
            b"".join(rd.strings)
            for rd in self.records(name, "TXT")
            if isinstance(rd, dns.rdtypes.ANY.TXT.TXT)
        ]

    def dkim_key(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's `dnsfunc`: the key record, or None (then dkimpy reports a failure)."""
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            found = self.txt(text.rstrip("."))
        except TemporaryFailure:
            return None
        if not found:
            self.missing = True
            return None
        return found[0]

    def spf_answers(self, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's `DNSLookup`: its own answer shape (that of its dnspython driver)."""
        try:
            records = self.records(name, qtype)
        except TemporaryFailure as exc:
            raise spf.TempError(f"DNS {exc}") from None
        answers: list[tuple[tuple[str, str], Any]] = []
        for rd in records:
            if qtype in ("A", "AAAA"):
                answers.append(((name, qtype), rd.address))  # type: ignore[attr-defined]
            elif isinstance(rd, dns.rdtypes.ANY.MX.MX):
                answers.append(((name, qtype), (rd.preference, rd.exchange)))
            elif isinstance(rd, dns.rdtypes.ANY.PTR.PTR):
                answers.append(((name, qtype), rd.target.to_text(True)))
            elif isinstance(rd, dns.rdtypes.ANY.TXT.TXT):
                answers.append(((name, qtype), rd.strings))
        return answers


def _spf_lookup(name: str, qtype: str, strict: object = True, timeout: object = None) -> Any:
    lookups: Lookups | None = getattr(_thread, "lookups", None)
    if lookups is None:
        raise spf.TempError("DNS: asked outside a message's checks")
    return lookups.spf_answers(name, qtype)


# pyspf looks up `DNSLookup` in its module at each query: every SPF lookup becomes ours.
spf.DNSLookup = _spf_lookup


# -- the four checks ----------------------------------------------------------------------------


def spf_identity(sender: str, helo: str) -> tuple[str, str, str]:
    """(identity, its domain, scope): MAIL FROM, or postmaster@HELO when MAIL FROM is <>
    (RFC 7208 2.4)."""
    identity = sender if sender else f"postmaster@{helo}"
    return identity, domain_of(identity).lower(), "mailfrom" if sender else "helo"


def check_spf(lookups: Lookups, ip: str, sender: str, helo: str) -> tuple[str, str, str]:
    """(result, domain, scope) for spf_identity(). A HELO that is an address literal or no
    domain name has nothing to check: none."""
    identity, domain, scope = spf_identity(sender, helo)
    if not domain or domain.startswith("[") or "." not in domain:
        return "none", domain, scope
    _thread.lookups = lookups
    try:
        query = spf.query(i=ip, s=identity, h=helo or domain, timeout=30)
        result, _code, _explanation = query.check()
    except (spf.TempError, TemporaryFailure):
        result = "temperror"
    except Exception:  # pyspf on input it cannot parse: the record's fault or the sender's
        result = "permerror"
    finally:
        _thread.lookups = None
    return (result if result in _SPF else "permerror"), domain, scope


_SPF = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")


def check_dkim(lookups: Lookups, content: bytes) -> tuple[Signature, ...]:
    """Each DKIM-Signature's verdict, the first MAX_SIGNATURES of them."""
    head, _ = split(content)
    count = sum(1 for name, _ in fields(head) if name == "dkim-signature")
    verdicts = []
    for index in range(min(count, MAX_SIGNATURES)):
        verifier = dkim.DKIM(content, logger=_DKIM_LOG)
        lookups.failed = lookups.missing = False
        try:
            passed = verifier.verify(idx=index, dnsfunc=lookups.dkim_key)
        except dkim.ValidationError as exc:
            # The body was changed after signing: the signature fails (RFC 6376 6.3). Any
            # other ValidationError is a signature with bad tags: a permanent error.
            passed, lookups.missing = False, "body hash mismatch" not in str(exc)
        except Exception:  # a malformed signature or message dkimpy cannot parse
            passed, lookups.missing = False, True
        tags = getattr(verifier, "signature_fields", {}) or {}
        domain = tags.get(b"d", b"").decode("ascii", "replace")
        selector = tags.get(b"s", b"").decode("ascii", "replace")
        if passed:
            result = "pass"
        elif lookups.failed:
            result = "temperror"
        elif lookups.missing:
            result = "permerror"
        else:
            result = "fail"
        verdicts.append(Signature(domain.lower(), selector, result))
    return tuple(verdicts)


def from_domain(content: bytes) -> str | None:
    """The RFC5322.From domain DMARC is about; None when there is not exactly one (RFC 7489
    6.6.1: such a message is not one DMARC can judge, and we do not guess)."""
    head, _ = split(content)
    values = [
        field.split(b":", 1)[1].decode("utf-8", "replace")
        for name, field in fields(head)
        if name == "from" and b":" in field
    ]
    if len(values) != 1:
        return None
    addresses = getaddresses([re.sub(r"\r?\n", "", values[0])])
    if len(addresses) != 1:
        return None
    local, at, domain = addresses[0][1].rpartition("@")
    if not local or not at or not _DOMAIN.fullmatch(domain):
        return None
    return domain.lower().rstrip(".") or None


_DOMAIN = re.compile(r"[^\s@()<>\[\],;:\\\"]+")  # a dot-atom domain; no literal ([192.0.2.1])


def _dmarc_record(lookups: Lookups, domain: str) -> dict[str, str] | None:
    """The tags of the one `v=DMARC1` record at _dmarc.<domain>; None when there is none (or
    several, which RFC 7489 6.6.3 says to treat as none)."""
    records = [r for r in lookups.txt(f"_dmarc.{domain}") if r.lower().startswith(b"v=dmarc1")]
    if len(records) != 1:
        return None
    tags: dict[str, str] = {}
    for part in records[0].decode("ascii", "replace").split(";"):
        key, _, value = part.partition("=")
        if key.strip():
            tags[key.strip().lower()] = value.strip()
    return tags


def check_dmarc(
    lookups: Lookups, domain: str | None, spf: tuple[str, str, str], dkim: Sequence[Signature]
) -> tuple[str, str, str]:
    """(result, policy, From domain), RFC 7489 6.6: the From domain's record, else its
    organizational domain's (and its sp=); pass when SPF or DKIM passed for an aligned domain.
    `domain` is from_domain()'s, found once: this runs again after each answer it waited for."""
    if domain is None:
        return "permerror", "", ""
    lookups.failed = False
    try:
        record = _dmarc_record(lookups, domain)
        organizational = org_domain(domain)
        policy_tag = "p"
        if record is None and organizational != domain:
            record = _dmarc_record(lookups, organizational)
            policy_tag = "sp"
    except TemporaryFailure:
        return "temperror", "", domain
    if record is None:
        return "none", "", domain
    policy = record.get(policy_tag) or record.get("p", "")
    if policy not in ("none", "quarantine", "reject"):
        # RFC 7489 6.6.3: an invalid p= with rua is p=none; without, no policy at all.
        return ("none", "none", domain) if "rua" in record else ("none", "", domain)
    spf_result, spf_domain, spf_scope = spf
    strict_spf, strict_dkim = record.get("aspf") == "s", record.get("adkim") == "s"
    spf_ok = spf_result == "pass" and spf_scope == "mailfrom"
    spf_ok = spf_ok and aligned(spf_domain, domain, strict_spf)
    dkim_ok = any(s.result == "pass" and aligned(s.domain, domain, strict_dkim) for s in dkim)
    return ("pass" if spf_ok or dkim_ok else "fail"), policy, domain


SpfResult = tuple[str, str, str]  # (result, domain, scope)


async def authenticate(
    lookups: Lookups, ip: str, sender: str, helo: str, content: bytes, spf: SpfResult | None
) -> AuthResults:
    """The four checks for one message (SPF reused when RCPT asked for it already)."""
    started = time.monotonic()
    if spf is None:
        spf = await lookups.answered(lambda: check_spf(lookups, ip, sender, helo))
        metrics.spam_check_duration.labels("spf").observe(time.monotonic() - started)
    started = time.monotonic()
    signatures = await lookups.answered(lambda: check_dkim(lookups, content))
    metrics.spam_check_duration.labels("dkim").observe(time.monotonic() - started)
    started = time.monotonic()
    found = spf
    author = from_domain(content)
    dmarc, policy, domain = await lookups.answered(
        lambda: check_dmarc(lookups, author, found, signatures)
    )
    metrics.spam_check_duration.labels("dmarc").observe(time.monotonic() - started)
    started = time.monotonic()
    chain = await lookups.answered(lambda: check_arc(lookups, content))
    metrics.spam_check_duration.labels("arc").observe(time.monotonic() - started)
    return AuthResults(
        spf=spf[0],
        spf_domain=spf[1],
        spf_scope=spf[2],
        dkim=signatures,
        dmarc=dmarc,
        dmarc_policy=policy,
        from_domain=domain,
        arc=chain,
    )


def check_arc(lookups: Lookups, content: bytes) -> str:
    """The ARC chain the message came with (RFC 8617 5.2): none, pass or fail; a chain whose
    keys could not be looked up is not judged (none), since a temperror must not fail it."""
    head, _ = split(content)
    if not any(name == "arc-seal" for name, _ in fields(head)):
        return "none"
    lookups.failed = False
    try:
        verdict, _results, _reason = dkim.ARC(content, logger=_DKIM_LOG).verify(
            dnsfunc=lookups.dkim_key
        )
    except Exception:  # dkimpy on a chain it cannot parse: broken
        return "fail"
    if lookups.failed:
        return "none"
    result = verdict.decode("ascii", "replace").lower() if isinstance(verdict, bytes) else ""
    return result if result in ("pass", "fail") else "none"


def _timed_out(sender: str, helo: str, spf: SpfResult | None) -> AuthResults:
    if spf is None:
        _identity, domain, scope = spf_identity(sender, helo)
        spf = ("temperror", domain, scope)
    return AuthResults(spf=spf[0], spf_domain=spf[1], spf_scope=spf[2], dmarc="temperror")


class Authenticator:
    """Runs the checks for intake: SPF alone at RCPT (for a domain whose `spf_fail` is
    "reject"), everything at the end of DATA. Each call has its own deadline."""

    def __init__(self, router: Callable[[], Router]) -> None:
        self._router = router

    async def spf(self, ip: str, sender: str, helo: str, limit: float) -> SpfResult:
        lookups = Lookups(self._router())
        started = time.monotonic()
        try:
            async with asyncio.timeout(limit):
                return await lookups.answered(lambda: check_spf(lookups, ip, sender, helo))
        except TimeoutError:
            return _timed_out(sender, helo, None).spf_identity()
        finally:
            metrics.spam_check_duration.labels("spf").observe(time.monotonic() - started)

    async def check(
        self,
        ip: str,
        sender: str,
        helo: str,
        content: bytes,
        limit: float,
        spf: SpfResult | None = None,
    ) -> AuthResults:
        """The message's results within `limit` seconds; whatever is unanswered by then is a
        temperror (never a reason to refuse)."""
        lookups = Lookups(self._router())
        try:
            async with asyncio.timeout(limit):
                return await authenticate(lookups, ip, sender, helo, content, spf)
        except TimeoutError:
            return _timed_out(sender, helo, spf)


def with_header(content: bytes, results: AuthResults, authserv_id: str) -> bytes:
    """The message with our Authentication-Results on top and every copy claiming to be ours
    (the same authserv-id, RFC 8601 5) removed; other receivers' results are kept."""
    ours = authserv_id.lower().encode("ascii", "replace")

    def forged(name: str, field: bytes) -> bool:
        if name != HEADER.lower():
            return False
        value = field.split(b":", 1)[1] if b":" in field else b""
        value = re.sub(rb"\([^()]*\)", b"", value)  # a comment may come before the id
        return value.strip().split(b";", 1)[0].strip().lower() == ours

    return fold(HEADER, results.header_value(authserv_id)) + edit(content, [], remove_if=forged)
