"""The words operators read: counts agree with their nouns, comments quote real replies.

Small things, but each is the first thing a postmaster notices ("1 recipients due now", a
config comment promising a reply the relay never sends) and each costs the project trust.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from relay.words import plural
from tests.test_docs import reply_texts

ROOT = Path(__file__).resolve().parent.parent
# A number written straight before a plural noun: "%d recipients", "{count} messages".
_COUNTED = re.compile(
    r"(%d|\{[^{}]+\}) (recipients|messages|attempts|entries|addresses|answers|domains"
    r"|mailboxes|hops|copies|commands|connections)\b"
)
# A reply quoted in a comment: code and enhanced status, or a bare code (which the test refuses).
_CODES = "421|45[0-59]|50[0-4]|521|530|55[0-6]"  # RFC 5321 4.2.3, RFC 1985, RFC 7504
_QUOTED = re.compile(
    rf"(?<![\w.])({_CODES})(/({_CODES}))?(?: ([45]\.\d{{1,3}}\.\d{{1,3}}))?(?!\w|\.\d)"
)


def counted_strings() -> list[tuple[str, int, str]]:
    found = []
    for path in sorted((ROOT / "relay").rglob("*.py")):
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            elif isinstance(node, ast.JoinedStr):
                text = ast.unparse(node)
            else:
                continue
            if _COUNTED.search(text):
                found.append((path.name, node.lineno, text))
    return found


def test_no_count_is_written_before_a_noun_by_hand() -> None:
    """Every line that counts goes through relay.words.plural: never "1 recipients"."""
    assert counted_strings() == []


@pytest.mark.parametrize(
    ("count", "noun", "text"),
    [
        (1, "recipient", "1 recipient"),
        (2, "entry", "2 entries"),
        (10_000, "domain", "10,000 domains"),
    ],
)
def test_plural_agrees(count: int, noun: str, text: str) -> None:
    assert plural(count, noun) == text


def quoted_replies(text: str) -> list[tuple[int, str]]:
    """(line number, quoted reply) for each SMTP reply a comment of deploy/relay.toml quotes."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            found += [(number, m.group(0)) for m in _QUOTED.finditer(line)]
    return found


def test_the_config_comments_quote_replies_the_relay_really_sends() -> None:
    """A comment that promises `450 4.7.0` must match a reply in the code, code and status both:
    a bare or slashed code ("421/450") is too vague to check, so it is refused as well."""
    sent = {text[:9] for _, text in reply_texts()}
    quoted = quoted_replies((ROOT / "deploy" / "relay.toml").read_text("utf-8"))
    assert len(quoted) >= 8
    wrong = [(n, q) for n, q in quoted if q not in sent]
    assert wrong == [], f"deploy/relay.toml quotes replies the relay does not send: {wrong}"


def test_the_comment_check_catches_a_vague_or_wrong_reply() -> None:
    sent = {text[:9] for _, text in reply_texts()}
    stale = '# "when_primary_down" answers 421/450 while the primary is up\n# gets 552 5.3.4\n'
    assert [q for _, q in quoted_replies(stale) if q not in sent] == ["421/450"]
