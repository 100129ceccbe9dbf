"""The delivery bookkeeping as pure decisions: no sockets, no queue (relay.outcomes)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from relay.config import Config
from relay.delivery import outcomes
from relay.store import DELIVERED, FAILED, QUEUED, MessageRow, Outcome, RecipientRow
from tests.conftest import make_config

T0 = 1_800_000_000.0


def row(
    sender: str = "alice@sender.test", *, warned: bool = False, notify: str | None = None
) -> MessageRow:
    recipient = RecipientRow(
        address="bob@example.test",
        domain="example.test",
        state=QUEUED,
        attempts=1,
        last_reply=None,
        next_attempt_at=T0,
        notify=notify,
        orcpt=None,
    )
    return MessageRow(
        id="M1",
        sender=sender,
        size=10,
        received_at=T0,
        state=QUEUED,
        client_ip="127.0.0.1",
        helo="client.test",
        smtputf8=False,
        eightbit=False,
        envid=None,
        ret=None,
        warned=warned,
        recipients=(recipient,),
    )


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, postmaster="pm@example.test", retry={"warn_after": "4h"})


@pytest.mark.parametrize(
    ("code", "permanent", "state"),
    [(250, False, DELIVERED), (550, True, FAILED), (451, False, QUEUED)],
)
def test_a_reply_becomes_an_outcome(code: int, permanent: bool, state: str) -> None:
    found = outcomes.outcome_for("bob@example.test", code, permanent, f"{code} x", "mx", T0 + 60)
    assert found.state == state
    assert found.next_attempt_at == (T0 + 60 if state == QUEUED else 0.0)


def test_a_failure_owes_the_sender_one_dsn(config: Config) -> None:
    failed = [Outcome("bob@example.test", FAILED, "550 5.1.1 no such user", "mx")]
    [dsn] = outcomes.notices(config, row(), failed, [], b"Subject: x\r\n\r\nhi\r\n", T0)
    assert [r.address for r in dsn.recipients] == ["alice@sender.test"]
    assert dsn.sender == ""


def test_notify_never_owes_nothing(config: Config) -> None:
    failed = [Outcome("bob@example.test", FAILED, "550 5.1.1 no such user", "mx")]
    assert outcomes.notices(config, row(notify="NEVER"), failed, [], b"", T0) == []


def test_a_failed_bounce_goes_to_the_postmaster_but_a_failed_report_to_it_does_not(
    config: Config,
) -> None:
    failed = [Outcome("bob@example.test", FAILED, "550 5.1.1 no such user", "mx")]
    [report] = outcomes.notices(config, row(sender=""), failed, [], b"", T0)
    assert [r.address for r in report.recipients] == ["pm@example.test"]
    to_postmaster = row(sender="")
    recipient = to_postmaster.recipients[0]
    looped = MessageRow(
        **{
            **to_postmaster.__dict__,
            "recipients": (RecipientRow(**{**recipient.__dict__, "address": "pm@example.test"}),),
        }
    )
    again = [Outcome("pm@example.test", FAILED, "550 5.1.1 no such user", "mx")]
    assert outcomes.notices(config, looped, again, [], b"", T0) == []


def test_an_operator_bounce_copies_the_postmaster(config: Config) -> None:
    failed = [Outcome("bob@example.test", FAILED, outcomes.OPERATOR_BOUNCE, "")]
    [dsn] = outcomes.notices(config, row(), failed, [], b"", T0)
    assert [r.address for r in dsn.recipients] == ["alice@sender.test", "pm@example.test"]


def test_a_delay_warning_is_owed_once_after_warn_after(config: Config) -> None:
    deferred = [Outcome("bob@example.test", QUEUED, "451 later", "mx", T0 + 3600)]
    assert not outcomes.plan(config, row(), deferred, None, T0 + 3 * 3600).warn
    due = outcomes.plan(config, row(), deferred, None, T0 + 5 * 3600)
    assert due.warn and due.needs_body and not due.sends_nothing
    assert not outcomes.plan(config, row(warned=True), deferred, None, T0 + 5 * 3600).warn
    assert not outcomes.plan(config, row(sender=""), deferred, None, T0 + 5 * 3600).warn


def test_only_deferrals_send_nothing(config: Config) -> None:
    deferred = [Outcome("bob@example.test", QUEUED, "451 later", "mx", T0 + 60)]
    assert outcomes.plan(config, row(), deferred, None, T0).sends_nothing


@pytest.mark.parametrize(
    ("last_error", "reply"),
    [
        (
            "421 4.4.1 connection refused by mx1",
            "421 4.4.1 delivery temporarily suspended: connection refused by mx1",
        ),
        (None, "421 4.4.1 delivery temporarily suspended: destination down"),
        (
            "550 5.1.2 no such domain",
            "421 4.4.1 delivery temporarily suspended: no such domain",
        ),
    ],
)
def test_a_suspended_deferral_says_so(last_error: str | None, reply: str) -> None:
    assert outcomes.suspended_reply(last_error) == reply


def test_backoff_never_shrinks_and_never_passes_the_cap() -> None:
    rng = random.Random(1)
    delays = [outcomes.backoff(n, 60.0, 600.0, rng) for n in range(1, 12)]
    assert all(48 <= d <= 600 for d in delays)
    assert max(delays[5:]) <= 600 and min(delays[5:]) >= 480
