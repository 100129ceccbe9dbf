"""Editing a message's header section: what the relay's checks add on top, and what they take out.

rspamd's tags and the Authentication-Results of sender checks both rewrite the top of a message
before it is stored. Only the header section is touched, the body never; a value is folded so
that no line a sender or a filter wrote can end the header section or start a field of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from email.header import Header, decode_header, make_header

_CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE = re.compile(rb"[^\n]*\n|[^\n]+")


def fold(name: str, value: str) -> bytes:
    """`Name: value` with CRLF line ends; a continuation line starts with white space (RFC 5322
    2.2.3) whatever the writer sent, so no value can end the header section or start a field."""
    lines = [_CONTROL_BUT_TAB.sub("", line) for line in re.split(r"\r\n|\r|\n", value)]
    lines = [line for line in lines if line.strip()] or [""]
    folded = [f"{name}: {lines[0].strip()}"]
    folded += [line if line[:1] in (" ", "\t") else "\t" + line for line in lines[1:]]
    return "\r\n".join(folded).encode("utf-8") + b"\r\n"


def split(content: bytes) -> tuple[bytes, bytes]:
    """(the header section, each field's line end included; the blank line and the body)."""
    if content.startswith((b"\r\n", b"\n")):
        return b"", content
    match = _HEADER_END.search(content)
    if match is None:
        return content, b""
    head, rest = content[: match.start() + 1], content[match.start() + 1 :]
    if head.endswith(b"\r"):  # the CR of the CRLF that ends the last field
        head, rest = head + b"\n", rest[1:]
    return head, rest


def _encoded_subject(subject: str) -> str:
    """rspamd returns the Subject decoded; RFC 2047 puts non-ASCII back into an ASCII header."""
    if subject.isascii():
        return subject
    return Header(subject, "utf-8").encode()


def fields(head: bytes) -> list[tuple[str, bytes]]:
    """Each field of a header section: (its lower-case name, its lines as sent, continuations
    included)."""
    found: list[tuple[str, bytes]] = []
    for line in _LINE.findall(head):
        if line[:1] in (b" ", b"\t") and found:  # a continuation goes with its field
            name, lines = found[-1]
            found[-1] = (name, lines + line)
        else:
            found.append((line.split(b":", 1)[0].strip().decode("latin-1").lower(), line))
    return found


def edit(
    content: bytes,
    add: Sequence[tuple[str, str]],
    remove: Iterable[str] = (),
    subject: str | None = None,
    remove_if: Callable[[str, bytes], bool] | None = None,
) -> bytes:
    """The message with the fields named in `remove` (and `add`), and those `remove_if(name,
    field)` picks, taken out of its header section, `add` put on top, and the Subject replaced
    when `subject` is given. The body is untouched."""
    head, rest = split(content)
    gone = {name.lower() for name in remove} | {name.lower() for name, _ in add}
    if subject is not None:
        gone.add("subject")
    kept = [
        field
        for name, field in fields(head)
        if name not in gone and not (remove_if is not None and remove_if(name, field))
    ]
    new = [fold(name, value) for name, value in add]
    if subject is not None:
        new.append(fold("Subject", _encoded_subject(subject)))
    return b"".join(new) + b"".join(kept) + rest


def subject_of(content: bytes) -> str:
    """The message's Subject, unfolded and decoded, for a rewrite without rspamd's own text."""
    head, _ = split(content)
    match = re.search(rb"^subject:(.*(?:\r?\n[ \t].*)*)", head, re.IGNORECASE | re.MULTILINE)
    if match is None:
        return ""
    raw = re.sub(rb"\r?\n(?=[ \t])", b"", match.group(1)).strip().decode("utf-8", "replace")
    try:
        return str(make_header(decode_header(raw)))
    except (ValueError, LookupError):  # a malformed or unknown encoded word: keep it as sent
        return raw
