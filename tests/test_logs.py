"""The log writer: every line reaches the stream, in order, and none is formatted on the loop."""

from __future__ import annotations

import io
import logging
import threading

from relay.ops.logs import BackgroundLogWriter, TextFormatter


class ThreadNotingFormatter(TextFormatter):
    """Notes which thread formats each line."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()

    def format(self, record: logging.LogRecord) -> str:
        self.threads.add(threading.current_thread().name)
        return super().format(record)


def test_lines_are_formatted_and_written_by_the_log_thread_in_order() -> None:
    stream = io.StringIO()
    handler = BackgroundLogWriter(stream)
    formatter = ThreadNotingFormatter()
    handler.setFormatter(formatter)
    logger = logging.getLogger("relay.test_logs")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for n in range(2000):
            logger.warning("line %d from <%s>", n, "a\r\nb@example.org")
    finally:
        logger.removeHandler(handler)
        handler.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2000
    assert [line.split(" from ")[0].rsplit(" ", 1)[1] for line in lines] == [
        str(n) for n in range(2000)
    ]
    # What a client sent is escaped there too: no line break of its own in the log.
    assert all(line.endswith("from <a\\x0d\\x0ab@example.org>") for line in lines)
    assert formatter.threads == {"relay-log"}


def test_a_line_that_cannot_be_formatted_does_not_stop_the_others() -> None:
    stream = io.StringIO()
    handler = BackgroundLogWriter(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("relay.test_logs.bad")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("needs %d", "not a number")
        logger.warning("after the bad one")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert stream.getvalue().strip().endswith("after the bad one")
