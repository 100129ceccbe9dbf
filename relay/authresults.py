"""What sender authentication found for one message, as stored with it and as told to others.

Intake computes it (relay.smtp.auth) before the 250 and stores it with the message, in the same
transaction; delivery reads it back when the primary refuses a recipient, to decide whether a
DSN may go to the sender at all (issue 15: a bounce to an unauthenticated, likely forged sender
is backscatter); `relay queue show` prints it; the Authentication-Results header (RFC 8601)
tells the primary. One owner for the shape, so those four never disagree.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from publicsuffixlist import PublicSuffixList

from relay.envelope import domain_of

SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
DKIM_RESULTS = ("pass", "fail", "neutral", "none", "temperror", "permerror", "policy")
DMARC_RESULTS = ("pass", "fail", "none", "temperror", "permerror")

_psl: PublicSuffixList | None = None
_psl_lock = threading.Lock()


def org_domain(domain: str) -> str:
    """The organizational domain (RFC 7489 3.2): the public suffix plus one label.

    publicsuffixlist carries a current copy of the Public Suffix List (its releases follow the
    list); a name that is itself a public suffix, or that the list does not know the end of,
    is its own organizational domain.
    """
    global _psl
    name = domain.lower().rstrip(".")
    with _psl_lock:
        if _psl is None:
            _psl = PublicSuffixList()
    return _psl.privatesuffix(name) or name


def aligned(first: str, second: str, strict: bool = False) -> bool:
    """Identifier alignment (RFC 7489 3.1): the same name, or in relaxed mode the same
    organizational domain."""
    a, b = first.lower().rstrip("."), second.lower().rstrip(".")
    if not a or not b:
        return False
    return a == b if strict else org_domain(a) == org_domain(b)


@dataclass(frozen=True)
class Signature:
    """One DKIM signature's verdict: d=, s= and the result."""

    domain: str
    selector: str
    result: str


@dataclass(frozen=True)
class AuthResults:
    """SPF for the MAIL FROM (or HELO) identity, each DKIM signature, DMARC for the From domain."""

    spf: str = "none"
    spf_domain: str = ""  # the domain SPF was checked for
    spf_scope: str = "mailfrom"  # "helo" when MAIL FROM was <>
    dkim: tuple[Signature, ...] = field(default_factory=tuple)
    dmarc: str = "none"
    dmarc_policy: str = ""  # the policy that applies to the From domain: reject|quarantine|none
    from_domain: str = ""
    # The ARC chain the message arrived with (RFC 8617): none, pass or fail. Our own ARC seal
    # (relay.smtp.arc) carries it on as cv=, so the primary sees what the earlier hops found.
    arc: str = "none"

    def spf_identity(self) -> tuple[str, str, str]:
        """(spf, spf_domain, spf_scope)."""
        return self.spf, self.spf_domain, self.spf_scope

    def to_json(self) -> str:
        """The stored form (messages.auth): a JSON object with these keys."""
        value: dict[str, Any] = {
            "spf": self.spf,
            "spf_domain": self.spf_domain,
            "spf_scope": self.spf_scope,
            "dkim": [
                {"domain": s.domain, "selector": s.selector, "result": s.result} for s in self.dkim
            ],
            "dmarc": self.dmarc,
            "dmarc_policy": self.dmarc_policy,
            "from_domain": self.from_domain,
            "arc": self.arc,
        }
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> AuthResults | None:
        """None for '' (never checked: the checks were off, or the message is older than them)
        and for anything that is not what `to_json` wrote."""
        if not text:
            return None
        try:
            value = json.loads(text)
            return cls(
                spf=str(value["spf"]),
                spf_domain=str(value["spf_domain"]),
                spf_scope=str(value["spf_scope"]),
                dkim=tuple(
                    Signature(str(s["domain"]), str(s["selector"]), str(s["result"]))
                    for s in value["dkim"]
                ),
                dmarc=str(value["dmarc"]),
                dmarc_policy=str(value["dmarc_policy"]),
                from_domain=str(value["from_domain"]),
                arc=str(value.get("arc", "none")),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def authenticated(self, sender: str) -> bool:
        """Whether a DSN to `sender` reaches the real sender: SPF passed for its domain, or a
        DKIM signature of an aligned domain passed (issue 15 part 4). Otherwise the sender may
        be forged, and a bounce to it is backscatter."""
        domain = domain_of(sender).lower() if sender else ""
        if not domain:
            return False
        if self.spf == "pass" and self.spf_scope == "mailfrom" and self.spf_domain == domain:
            return True
        return any(s.result == "pass" and aligned(s.domain, domain) for s in self.dkim)

    def summary(self) -> str:
        """One line for `relay queue show` and the logs: `spf=pass (example.com) dkim=...`."""
        spf = f"spf={self.spf}" + (f" ({self.spf_domain})" if self.spf_domain else "")
        if self.spf_scope == "helo":
            spf += " helo"
        dkim = " ".join(f"dkim={s.result} ({s.domain})" for s in self.dkim) or "dkim=none"
        dmarc = f"dmarc={self.dmarc}" + (f" ({self.from_domain})" if self.from_domain else "")
        if self.dmarc_policy:
            dmarc += f" p={self.dmarc_policy}"
        return f"{spf} {dkim} {dmarc}"

    def header_value(self, authserv_id: str) -> str:
        """The Authentication-Results value (RFC 8601 2.2), our authserv-id first."""
        scope = "smtp.helo" if self.spf_scope == "helo" else "smtp.mailfrom"
        parts = [authserv_id]
        parts.append(f"spf={self.spf} {scope}={_value(self.spf_domain or 'unknown')}")
        for s in self.dkim:
            parts.append(
                f"dkim={s.result} header.d={_value(s.domain or 'unknown')}"
                + (f" header.s={_value(s.selector)}" if s.selector else "")
            )
        if not self.dkim:
            parts.append("dkim=none")
        dmarc = f"dmarc={self.dmarc}"
        if self.dmarc_policy:
            dmarc += f" policy.dmarc={self.dmarc_policy}"
        if self.from_domain:
            dmarc += f" header.from={_value(self.from_domain)}"
        parts.append(dmarc)
        parts.append(f"arc={self.arc}")
        return ";\r\n\t".join(parts)


def _value(text: str) -> str:
    """A property value (RFC 8601 2.2, RFC 2045 token or quoted-string)."""
    if text and all(c.isalnum() or c in "-._@+" for c in text) and text.isascii():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
