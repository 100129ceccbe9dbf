"""How the relay counts things in words: one home, so no log or CLI line says "1 recipients"."""

from __future__ import annotations

import json
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


def _escape(char: str) -> str:
    point = ord(char)
    if 0xDC80 <= point <= 0xDCFF:  # an undecodable byte kept by surrogateescape: show the byte
        return f"\\x{point - 0xDC00:02x}"
    if point < 0x100:
        return f"\\x{point:02x}"
    return f"\\u{point:04x}" if point < 0x10000 else f"\\U{point:08x}"


def printable(text: str) -> str:
    """`text` with every character that is not printable written as an escape: ESC as `\\x1b`.

    Addresses, HELO names and remote replies come from strangers and end up in log lines and
    in what `relay queue` prints on the operator's terminal, where ESC ] 0 ; … BEL retitles the
    window, a CR rewrites the line, U+202E reverses it and a line break forges a log line. Every
    text log line and every line of CLI output goes through here (logs.TextFormatter, cli.echo);
    JSON goes through `json_text`. Backslashes stay as they are: text that was printable reads
    the same.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def printable_lines(text: str) -> str:
    """`printable` line by line: text of several lines keeps them (a listing, a traceback)."""
    return "\n".join(printable(line) for line in text.split("\n"))


def _json_escape(char: str) -> str:
    point = ord(char)
    if point < 0x10000:
        return f"\\u{point:04x}"
    point -= 0x10000  # JSON has only \uXXXX: a UTF-16 surrogate pair (RFC 8259 7)
    return f"\\u{0xD800 + (point >> 10):04x}\\u{0xDC00 + (point & 0x3FF):04x}"


def json_text(value: object, indent: int | None = None) -> str:
    """`json.dumps(value)`, every non-printable character in it a \\u escape: the same value.

    json.dumps escapes C0 controls but writes DEL, C1 controls, U+2028 or U+202E as they are
    (with ensure_ascii=False, which keeps names in other scripts readable); a terminal showing
    the JSON would act on them. Outside strings, JSON holds no such character except the
    newlines of `indent`.
    """
    text = json.dumps(value, indent=indent, ensure_ascii=False)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\n" else _json_escape(c) for c in text)
