"""How the relay counts things in words: one home, so no log or CLI line says "1 recipients"."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

# Nouns whose plural is not the singular plus "s"; everything else the relay counts is regular.
_IRREGULAR = {"is": "are", "was": "were", "entry": "entries", "address": "addresses"}


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """`count` and `noun` in agreement, thousands separated: "1 recipient", "10,000 domains"."""
    if count == 1:
        return f"1 {noun}"
    return f"{count:,} {plural_form or _IRREGULAR.get(noun, noun + 's')}"


def summarize(names: Sequence[str], noun: str, shown: int = 5) -> str:
    """A long list cut to its first few names: "10,000 domains: a, b, … (see --verbose)".

    An operator with thousands of customer domains wants to see that the count is right, not
    read every name; a short list is printed whole.
    """
    head = f"{plural(len(names), noun)}: "
    if len(names) <= shown * 2:
        return head + ", ".join(names)
    return head + ", ".join(names[:shown]) + ", … (see --verbose)"


def one_line(text: str) -> str:
    """Any run of whitespace, line breaks included, as one space: a reply or reason on one line."""
    return " ".join(text.split())


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


_AGE_UNITS = (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1))


def age(seconds: float) -> str:
    """Two units at most, like "3d4h" or "4m12s": enough to read at a glance."""
    whole = int(seconds) if seconds > 0 else 0
    if whole < 60:
        return f"{whole}s"
    for unit, size, small_unit, small_size in _AGE_UNITS:
        if whole >= size:
            big, rest = divmod(whole, size)
            rest //= small_size
            return f"{big}{unit}{rest}{small_unit}" if rest else f"{big}{unit}"
    raise AssertionError("unreachable: the last unit is a minute")
