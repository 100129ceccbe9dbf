"""Queue ids and the key a recipient is remembered by."""

from __future__ import annotations

import random
import secrets
import threading
import time

from relay.envelope import split

_CROCKFORD = "0123456789BCDFGHJKLMNPQRSTVWXYZ"


def address_key(address: str) -> str:
    """How a recipient is remembered: the local part as sent (RFC 5321 2.4: it may be
    case-sensitive), the domain in lower case."""
    local, domain = split(address)
    return f"{local}@{domain.lower()}"


# The random part keeps apart ids made by different processes; it needs no secrecy (an id gives
# no access to anything), so it comes from a generator seeded once, not a system call per id.
_ID_RANDOM = random.Random(secrets.randbits(128))
_id_lock = threading.Lock()
_last_id_micros = 0


def new_queue_id(now: float | None = None) -> str:
    """A Postfix-style long queue id: time-ordered (sorts by arrival), unique, greppable in logs.

    Unique within the process by construction, as Postfix's are: an id's microsecond stamp is
    never reused, two ids asked for in the same microsecond get consecutive ones. Random digits
    alone collide: 2,000 ids of one instant share a value about once in fourteen runs.
    """
    global _last_id_micros
    micros = int((time.time() if now is None else now) * 1_000_000)
    with _id_lock:
        micros = max(micros, _last_id_micros + 1)
        _last_id_micros = micros
    return _base31(micros) + _base31(_ID_RANDOM.randrange(len(_CROCKFORD) ** 5), width=5)


def _base31(number: int, width: int = 0) -> str:
    """`number` in _CROCKFORD's digits, zero-padded to `width`."""
    digits = ""
    while number:
        number, digit = divmod(number, len(_CROCKFORD))
        digits = _CROCKFORD[digit] + digits
    return digits.rjust(width, _CROCKFORD[0])
