"""README.md cannot go stale either: every key, command, metric and module it names exists.

docs/operations.md is checked by tests/test_docs.py; the README is the first page a new
operator reads, so what it names is checked the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from docs import gen_help
from relay.ops.metrics import metric_names
from tests.test_deploy import DOCUMENTED_KEYS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def readme() -> str:
    return (ROOT / "README.md").read_text("utf-8")


def config_keys(text: str) -> set[str]:
    """Keys named in the first cell of the README's configuration table rows.

    A cell may name two keys ("`retry.min` / `retry.max`", "`[[domain]] verify_positive_ttl` /
    `verify_negative_ttl`"): a bare second name takes the first one's section.
    """
    keys = set()
    for cell in re.findall(r"^\| (`[^|]+`) \|", text, re.M):
        section = ""
        for name in re.findall(r"`([^`]+)`", cell):
            if name.startswith("[[domain]] "):
                section, name = "domain", name.removeprefix("[[domain]] ")
            elif "." in name:
                section, name = name.split(".", 1)
            keys.add(f"{section}.{name}" if section else name)
    return keys


def test_every_config_key_in_the_table_exists(readme: str) -> None:
    named = config_keys(readme)
    assert len(named) > 30, "the configuration table was not found"
    assert named <= DOCUMENTED_KEYS, sorted(named - DOCUMENTED_KEYS)
    assert config_keys("| `smtp.max_conections` | `200` | typo |") - DOCUMENTED_KEYS


def test_every_command_it_shows_exists(readme: str) -> None:
    commands = {" ".join(("relay", *path)) for path, _ in gen_help.commands()}
    shown = set()
    for line in re.findall(r"^(?:\.venv/bin/)?(relay(?: [a-z-]+)*)", readme, re.M):
        words = line.split()
        while len(words) > 1 and " ".join(words) not in commands:
            words.pop()
        shown.add(" ".join(words))
    assert len(shown) > 5
    assert shown <= commands, sorted(shown - commands)


def test_every_metric_it_names_exists(readme: str) -> None:
    named = set(re.findall(r"(?<!\^)\b(relay_[a-z_]+)", readme))  # not "grep ^relay_queue"
    assert named, "no metric named"
    assert named <= metric_names(), sorted(named - metric_names())


def test_every_module_it_names_exists(readme: str) -> None:
    modules = set(re.findall(r"`(relay/(?:[a-z_]+/)?[a-z_]+\.py)`", readme))
    assert len(modules) > 10
    assert all((ROOT / m).exists() for m in modules), [
        m for m in modules if not (ROOT / m).exists()
    ]
    # Every module of the top level and of the journey's stages (smtp/, delivery/, ops/); the
    # store and the adapters are named as packages.
    stages = [ROOT / "relay", *(ROOT / "relay" / stage for stage in ("smtp", "delivery", "ops"))]
    package = {
        str(p.relative_to(ROOT))
        for d in stages
        for p in d.glob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    assert package <= modules, f"modules missing from the Architecture section: {package - modules}"
