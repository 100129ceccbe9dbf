"""The parts of an address and of a host:port, named once (chasquid's envelope package).

Domains compare in lower case; local parts are kept as sent (RFC 5321 2.4: they may be
case-sensitive). The last "@" splits: a quoted local part may contain one.
"""

from __future__ import annotations


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
