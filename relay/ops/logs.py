"""Log lines: their two formats, the thread that writes them, and their structured fields.

Every line is a sentence an operator can grep (`journalctl -g QUEUEID`), in the words Postfix
uses (`to=<…> relay=… delay=… dsn=… status=sent (…)`). A line about mail also carries its facts
as fields (`extra=fields(...)`): the JSON format (`--log-format json`) writes them as keys next
to the sentence, so a log shipper needs no regular expression to find a queue id or a status.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from typing import Any, TextIO

from relay.words import json_text, printable, printable_lines

# The keys a line may carry, a contract with log shippers (docs/operations.md lists them).
FIELDS = (
    "queue_id",
    "event",
    "from",
    "to",
    "relay",
    "dsn",
    "status",
    "delay",
    "client",
    "helo",
    "reason",
    "size",
    "nrcpt",
    "action",
    "uid",
    "user",
    "queue_ids",
)


def fields(**values: Any) -> dict[str, dict[str, Any]]:
    """`log.info(..., extra=fields(queue_id=…, event=…))`; `from_` stands for `from`."""
    if "from_" in values:
        values["from"] = values.pop("from_")
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ValueError(f"undocumented log fields: {sorted(unknown)}")
    return {"fields": values}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (`--log-format json`)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        # Structured fields a line carries (`extra={"fields": {...}}`): queue_id, event, ...
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json_text(entry)


class TextFormatter(logging.Formatter):
    """`2026-01-02 03:04:05,678 relay.intake INFO connect from [192.0.2.1]`.

    The same text as logging's default time format, but the date and time are formatted once
    a second rather than once a line: under load the relay logs thousands of lines a second.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")
        self._second = -1
        self._stamp = ""

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The whole message, line breaks included: an address or a reply quoted in it must not
        # start a line of its own or reach the terminal of whoever tails the log (words.printable).
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return printable_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return printable_lines(super().formatStack(stack_info))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
        return f"{self._stamp},{int(record.msecs):03d}"


class BackgroundLogWriter(logging.Handler):
    """Formats and writes each line from a thread of its own.

    A write to stderr is a system call per line, and formatting (the %-arguments, the time, the
    escaping of what a client sent) was an eighth of the relay's CPU under load: both on the
    event loop that also serves every SMTP session. Here the loop only queues the record; the
    thread formats and writes what has gathered in one call. Arguments are formatted late, so
    a call must not pass an object it changes afterwards (the relay logs strings and numbers).
    At exit (logging.shutdown) every queued line is written before the process ends; a SIGKILL
    loses at most the last few milliseconds of log, never mail.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self._records: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write_lines, name="relay-log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        self._records.put(record)

    def _format(self, record: logging.LogRecord) -> str | None:
        try:
            return self.format(record)
        except Exception:
            self.handleError(record)
            return None

    def _write_lines(self) -> None:
        while True:
            batch = [self._records.get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 1000:
                    batch.append(self._records.get_nowait())
            formatted = [self._format(record) for record in batch if record is not None]
            lines = [line for line in formatted if line is not None]
            if lines:
                with contextlib.suppress(OSError, ValueError):  # stderr gone: nowhere to say so
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
            if None in batch:
                return

    def close(self) -> None:
        if self._thread.is_alive():
            self._records.put(None)
            self._thread.join(timeout=10)
        super().close()


def setup_logging(fmt: str, level: int = logging.INFO) -> None:
    handler = BackgroundLogWriter(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    # Log records need not name the source line, thread or process of each call: looking
    # those up is a third of what a log call costs.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every command line at INFO; our own log lines carry what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def current_format() -> str:
    """The format setup_logging was given ("json" or "text"): what a process the relay starts
    (an SMTP worker, relay.workers) must log in so that its lines read like the relay's."""
    formatters = [handler.formatter for handler in logging.getLogger().handlers]
    return "json" if any(isinstance(f, JsonFormatter) for f in formatters) else "text"
