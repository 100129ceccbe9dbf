"""`relay queue export`: held mail as files a person or another program can open, read-only.

The stored bytes are what the primary will get: our Received header on top, the message exactly
as it arrived. `.eml` files keep them exactly (CRLF line ends, as SMTP carries them); an mbox
uses the format's own LF line ends and mboxrd quoting (a line matching `>*From ` gets one more
`>`, so a reader can undo it exactly), each message after a `From ` line naming the envelope
sender and the arrival time, like Postfix's and mutt's.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)


def mbox_entry(sender: str, received_at: float, content: bytes) -> bytes:
    """One message in mboxrd form, the blank line that ends it included."""
    when = time.asctime(time.gmtime(received_at))
    envelope = (sender or "MAILER-DAEMON").replace(" ", "_")
    body = content.replace(b"\r\n", b"\n")
    body = _FROM_LINE.sub(rb">\1", body)
    if not body.endswith(b"\n"):
        body += b"\n"
    return f"From {envelope} {when}\n".encode("utf-8", "surrogateescape") + body + b"\n"


def write_mbox(out: BinaryIO, messages: Iterable[tuple[str, float, bytes]]) -> int:
    count = 0
    for sender, received_at, content in messages:
        out.write(mbox_entry(sender, received_at, content))
        count += 1
    out.flush()
    return count


def eml_path(directory: Path, message_id: str) -> Path:
    return directory / f"{message_id}.eml"


def write_eml(path: Path, content: bytes) -> None:
    """The stored bytes, written whole or not at all (a temporary name, then a rename)."""
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(descriptor, content)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
