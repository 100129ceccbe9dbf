"""docs/operations.md cannot go stale: help, metrics, log lines and reply texts are checked here.

The help section is regenerated (docs/gen_help.py) and compared; metrics are compared with what
`relay.metrics` declares, name, type and labels; log formats and reply texts are read from the
source with `ast`, so a new log line or reply without its line in the docs fails here.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from prometheus_client.metrics import MetricWrapperBase

from docs import gen_help
from relay.ops import metrics
from relay.ops.cli import main

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"
LOG_LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
# A reply as the relay writes it: "550 5.7.1 …" (RFC 3463 enhanced code, then text).
_REPLY = re.compile(r"^[2-5]\d\d [2-5]\.\d{1,3}\.\d{1,3} ")
REPLY_MODULES = (
    "workers.py",
    "smtp/intake.py",
    "smtp/limits.py",
    "smtp/policy.py",
    "delivery/scheduler.py",
    "smtp/rspamd.py",
)
# Where the log lines live: the top level and the journey's stages (the store logs nothing).
LOG_DIRECTORIES = ("", "smtp", "delivery", "ops")


@pytest.fixture(scope="module")
def doc() -> str:
    return OPERATIONS.read_text("utf-8")


def test_every_command_and_option_has_help_text() -> None:
    for path, command in gen_help.commands():
        name = " ".join(("relay", *path))
        assert (command.help or "").strip(), f"{name} has no help text"
        for param in command.params:
            if isinstance(param, click.Option):
                assert (param.help or "").strip(), f"{name} {param.opts[0]} has no help text"


def test_every_command_is_in_the_help_reference(doc: str) -> None:
    names = [" ".join(("relay", *path)) for path, _ in gen_help.commands()]
    assert {"relay doctor", "relay queue show", "relay status", "relay serve"} <= set(names)
    for name in names:
        assert f"#### `{name}`" in doc, name
        assert f"$ {name} --help\nUsage: {name} " in doc, name


def test_the_help_in_operations_md_is_the_current_help_output(doc: str) -> None:
    assert gen_help.render(doc) == doc, (
        "docs/operations.md has stale --help output: run .venv/bin/python docs/gen_help.py"
    )


def test_the_help_is_what_the_real_command_prints() -> None:
    result = CliRunner().invoke(main, ["queue", "show", "--help"], prog_name="relay")
    assert result.exit_code == 0
    assert gen_help.help_text(("queue", "show")) == result.output.rstrip("\n")


# -- metrics ----------------------------------------------------------------------------------


def documented_metrics(doc: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{name: (type, labels)} from the rows of the metrics table."""
    section = doc.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(relay_\w+)` \| (\w+) \| ([^|]*) \|", section, re.MULTILINE)
    return {name: (kind, tuple(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


def declared_metrics() -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """(name as exposed, type, labels) of every metric relay.metrics declares."""
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            kind = str(value._type)  # prometheus-client keeps name, type and labels private
            name = value._name + ("_total" if kind == "counter" else "")
            yield name, kind, tuple(value._labelnames)
    collector = metrics.QueueCollector(lambda: metrics.QueueSnapshot({}, {}, {}))
    for family in collector.describe():
        yield family.name, family.type, tuple(getattr(family, "_labelnames", ()))
    yield "relay_smtp_connections_total", "counter", ()


def test_every_metric_is_documented_with_its_type_and_labels(doc: str) -> None:
    documented = documented_metrics(doc)
    declared = {name: (kind, labels) for name, kind, labels in declared_metrics()}
    assert declared == documented


def test_every_exported_sample_name_is_documented(doc: str) -> None:
    documented = set(documented_metrics(doc))
    for name in metrics.metric_names():
        stems = {name, name + "_total"} | {
            name.removesuffix(s) for s in ("_bucket", "_count", "_sum", "_total")
        }
        assert stems & documented, f"{name} is not in the metrics table of operations.md"


# -- log lines and replies --------------------------------------------------------------------


def _calls(path: Path) -> Iterator[ast.Call]:
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Call):
            yield node


def log_formats() -> Iterator[tuple[str, str, str]]:
    """(module, level, format) of every `log.<level>("...", ...)` call in relay/."""
    paths = [p for d in LOG_DIRECTORIES for p in sorted((ROOT / "relay" / d).glob("*.py"))]
    for path in paths:
        for call in _calls(path):
            func = call.func
            if (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and func.value.id == "log"
                and func.attr in LOG_LEVELS
                and call.args
                and isinstance(call.args[0], ast.Constant)
                and isinstance(call.args[0].value, str)
            ):
                yield path.name, func.attr, call.args[0].value


def test_the_log_formats_are_found() -> None:
    formats = {fmt for _, _, fmt in log_formats()}
    assert "%s: to=<%s> relay=%s delay=%s dsn=%s status=%s (%s)" in formats
    assert len(formats) > 30


def test_every_log_line_is_documented(doc: str) -> None:
    missing = [
        f"{module}: log.{level}({fmt!r})"
        for module, level, fmt in log_formats()
        if f"`{fmt}`" not in doc
    ]
    assert not missing, "log lines missing from docs/operations.md:\n" + "\n".join(missing)


def reply_texts() -> Iterator[tuple[str, str]]:
    """(module, text) of every string constant that is an SMTP reply, in the intake modules."""
    for module in REPLY_MODULES:
        tree = ast.parse((ROOT / "relay" / module).read_text("utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and _REPLY.match(node.value)
            ):
                yield module, node.value


def test_the_reply_texts_are_found() -> None:
    texts = {text for _, text in reply_texts()}
    assert "550 5.7.1 <{address}>: Relay access denied" in texts
    assert "452 4.3.1 Insufficient system storage, try again later" in texts


def test_every_smtp_reply_is_documented(doc: str) -> None:
    missing = [f"{module}: {text}" for module, text in reply_texts() if f"`{text}`" not in doc]
    assert not missing, "replies missing from docs/operations.md:\n" + "\n".join(missing)
