"""The parts of an address and of a host:port, named once (chasquid's envelope package).

Domains compare in lower case; local parts are kept as sent (RFC 5321 2.4: they may be
case-sensitive). The last "@" splits: a quoted local part may contain one.
"""

from __future__ import annotations

import re


def split(address: str) -> tuple[str, str]:
    """(local part, domain) of `address`; the domain is "" when there is no "@"."""
    local, at, domain = address.rpartition("@")
    return (local, domain) if at else (address, "")


def domain_of(address: str) -> str:
    """The domain of `address`, lower case, without a final dot."""
    return split(address)[1].lower().rstrip(".")


def hostport(host: str, port: int) -> str:
    """`host:port`, an IPv6 address in brackets: `[2001:db8::1]:25`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# C0 controls and DEL: SMTP cannot carry them in an address (RFC 5321 4.1.2 allows only
# printable characters, RFC 6531 adds UTF-8 but no controls); C1 controls (U+0080-U+009F) are
# not valid in RFC 6531's UTF8-non-ascii either.
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x80-\x9f]")
MAX_LOCAL_PART = 64  # octets, RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # octets, RFC 5321 4.5.3.1.2


def address_problem(address: str) -> str | None:
    """Why `address` cannot be passed on over SMTP, or None.

    Intake refuses such an address at MAIL or RCPT, and the courier checks the same before
    writing one out: one function, so that they can never disagree and intake can never accept
    what delivery would refuse later (that refusal would become a DSN to a forged sender).
    """
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:  # aiosmtpd keeps invalid UTF-8 as surrogates
        return "not valid UTF-8"
    if _CONTROL.search(address):
        return "control character"
    local, domain = split(address)
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        return f"local part longer than {MAX_LOCAL_PART} octets"
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        return f"domain longer than {MAX_DOMAIN} octets"
    return None
