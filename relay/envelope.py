"""The parts of an address and of a host:port, named once (chasquid's envelope package).

Domains compare in lower case; local parts are kept as sent (RFC 5321 2.4: they may be
case-sensitive). The last "@" splits: a quoted local part may contain one.
"""

from __future__ import annotations

import functools
import re
import string

import idna


def split(address: str) -> tuple[str, str]:
    """(local part, domain) of `address`; the domain is "" when there is no "@"."""
    local, at, domain = address.rpartition("@")
    return (local, domain) if at else (address, "")


def domain_of(address: str) -> str:
    """The domain of `address` as `domain_key` gives it: what configured names are matched with."""
    return domain_key(split(address)[1])


def domain_key(domain: str) -> str:
    """`domain` in A-labels, ASCII letters in lower case, without a final dot.

    Domains compare ASCII case-insensitively (RFC 5321 2.4), and an internationalized name as
    its A-labels (RFC 5890): `müller.test` is `xn--mller-kva.test`. Never `str.lower()` on the
    rest of Unicode: it folds the Kelvin sign to "k", so `ban\u212a.test` would be taken for
    `bank.test`. A name that is not valid IDNA 2008 is returned as it is (ASCII lowered), which
    no configured name can equal; `address_problem` refuses it.
    """
    name = domain.rstrip(".")
    if name.isascii():
        return name.lower()
    return _a_labels(_ascii_lower(name)) or _ascii_lower(name)


_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _ascii_lower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


@functools.lru_cache(maxsize=4096)
def _a_labels(name: str) -> str | None:
    """The A-label form of `name` (IDNA 2008, no UTS 46 mapping), or None when invalid."""
    labels = []
    for label in name.split("."):
        if label.isascii():
            labels.append(label)
            continue
        try:
            labels.append(idna.alabel(label).decode("ascii"))
        except (idna.IDNAError, UnicodeError):
            return None
    return ".".join(labels)


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
    if not domain.isascii() and _a_labels(_ascii_lower(domain.rstrip("."))) is None:
        return "domain is not a valid internationalized name (IDNA 2008)"
    return None
