"""The bookkeeping of delivery: what each reply means for a recipient, and who hears of it.

Pure decisions, apart from the log lines they write: an outcome per recipient (delivered,
deferred with its backoff, failed), whether a DSN is owed (RFC 3461 NOTIFY, never to the null
sender, a double bounce to the postmaster instead), and the DSN itself (relay.dsn builds it).
The scheduler (relay.delivery) runs sessions and writes what these functions decide; they are
tested without sockets (tests/test_outcomes.py).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from relay.authresults import AuthResults
from relay.config import Config
from relay.delivery import dsn
from relay.envelope import domain_of
from relay.ops import metrics
from relay.ops.logs import fields
from relay.store import (
    DELIVERED,
    FAILED,
    QUEUED,
    MessageRow,
    NewMessage,
    NewRecipient,
    Outcome,
    RecipientRow,
    new_queue_id,
)

# The scheduler's log: these lines are part of its story (docs/operations.md, relay.delivery).
log = logging.getLogger("relay.delivery")

OPERATOR_BOUNCE = "550 5.0.0 Message bounced by the postmaster"
UNAUTHENTICATED = "unauthenticated bounce"  # the hold reason, in `relay queue` and the log
# Recipient state → (relay_deliveries_total result label, log status word, as Postfix says it).
_REPORTED = {
    DELIVERED: ("delivered", "sent"),
    FAILED: ("bounced", "bounced"),
    QUEUED: ("deferred", "deferred"),
}  # consecutive 4xx replies that mean "down again"


@dataclass(frozen=True)
class Plan:
    """One message's outcomes and what they call for, before anything is written."""

    message: MessageRow
    outcomes: Sequence[Outcome]
    body: bytes | None  # the stored message, when the caller has it already
    failed: list[Outcome]
    deferred: list[Outcome]
    warn: bool  # a "delayed" DSN is owed now (retry.warn_after)
    silent: frozenset[str] = frozenset()  # failed, but their DSN is discarded (backscatter)

    @property
    def needs_body(self) -> bool:
        return bool(self.failed or self.warn) and self.body is None

    @property
    def sends_nothing(self) -> bool:
        """Only deferrals and no DSN: losing the write costs no copy of anything."""
        return not self.warn and all(o.state == QUEUED for o in self.outcomes)


def plan(
    config: Config,
    message: MessageRow,
    outcomes: Sequence[Outcome],
    body: bytes | None,
    now: float,
    silent: frozenset[str] = frozenset(),
) -> Plan:
    failed = [o for o in outcomes if o.state == FAILED and o.address not in silent]
    deferred = [o for o in outcomes if o.state == QUEUED and o.held is None]
    warn = needs_delay_warning(config, message, deferred, now)
    return Plan(message, outcomes, body, failed, deferred, warn, silent)


def screen_bounces(
    config: Config, message: MessageRow, outcomes: Sequence[Outcome]
) -> tuple[list[Outcome], frozenset[str]]:
    """The primary's refusals (5xx) of a message whose sender intake did not authenticate:
    a DSN to that sender is likely backscatter (issue 15). Per the recipient domain's
    `bounce_unauthenticated`: "hold" keeps the recipient for an operator (until queue.lifetime,
    then queue.on_expiry), "discard" fails it without a DSN, "send" bounces as always.

    Returns the outcomes to record and the addresses whose DSN is discarded. A null sender
    gets no DSN anyway, so its mail is not screened; nor are operator bounces and expiry,
    which are decided without the primary.
    """
    refused = [o for o in outcomes if o.state == FAILED]
    if not refused or not message.sender:
        return list(outcomes), frozenset()
    results = AuthResults.from_json(message.auth)
    if results is not None and results.authenticated(message.sender):
        return list(outcomes), frozenset()
    screened: list[Outcome] = []
    silent: set[str] = set()
    for outcome in outcomes:
        settings = config.domain(_domain(outcome.address))
        policy = settings.bounce_unauthenticated if settings is not None else "hold"
        if outcome.state != FAILED or policy == "send":
            screened.append(outcome)
            continue
        _log_suppressed(message, outcome, policy, results)
        if policy == "discard":
            silent.add(outcome.address)
            screened.append(outcome)
        else:
            expires = message.received_at + config.queue.lifetime
            screened.append(
                Outcome(
                    outcome.address,
                    QUEUED,
                    outcome.reply,
                    outcome.host,
                    expires,
                    held=UNAUTHENTICATED,
                )
            )
    return screened, frozenset(silent)


def _log_suppressed(
    message: MessageRow, outcome: Outcome, policy: str, results: AuthResults | None
) -> None:
    domain = _domain(outcome.address)
    metrics.bounces_suppressed.labels(domain).inc()
    found = results.summary() if results is not None else "not checked"
    what = "held" if policy == "hold" else "discarded"
    log.warning(
        "%s: to=<%s> bounce %s: %s: sender <%s> not authenticated (%s)",
        message.id,
        outcome.address,
        what,
        UNAUTHENTICATED,
        message.sender,
        found,
        extra=fields(
            queue_id=message.id,
            event="held" if policy == "hold" else "discarded",
            from_=message.sender,
            to=outcome.address,
            reason=UNAUTHENTICATED,
        ),
    )


def outcome_for(
    address: str, code: int, permanent: bool, text: str, host: str, retry_at: float
) -> Outcome:
    """2xx delivered, 5xx failed, anything else deferred until `retry_at`."""
    if 200 <= code < 300:
        return Outcome(address, DELIVERED, text, host)
    if permanent:
        return Outcome(address, FAILED, text, host)
    return Outcome(address, QUEUED, text, host, retry_at)


def backoff(attempts: int, minimum: float, maximum: float, rng: random.Random) -> float:
    """Seconds until the next try after `attempts` failed tries: exponential, jittered, capped.

    The delay doubles from `minimum` with each attempt (computed in floats, then capped, so it
    never silently stops growing) and is jittered by up to -20 % so that mail deferred together
    does not come back together.
    """
    exponent = min(max(attempts - 1, 0), 60)
    delay = min(maximum, minimum * (2.0**exponent))
    return max(minimum, delay * rng.uniform(0.8, 1.0))


def log_outcomes(
    message: MessageRow,
    outcomes: Sequence[Outcome],
    removed: bool,
    now: float,
    screened: frozenset[str] = frozenset(),
) -> None:
    """One line per recipient, in Postfix's words: delay since arrival, dsn, status. A refusal
    whose bounce was held or discarded (`screened`) had its line already (screen_bounces)."""
    delay = round(max(0.0, now - message.received_at), 2)
    for outcome in outcomes:
        if outcome.held is not None or outcome.address in screened:
            continue
        result, status = _REPORTED[outcome.state]
        metrics.deliveries.labels(_domain(outcome.address), result).inc()
        code = outcome.reply[:3]
        detail = dsn.status_from_reply(int(code) if code.isdigit() else 0, outcome.reply[4:])
        log.info(
            "%s: to=<%s> relay=%s delay=%s dsn=%s status=%s (%s)",
            message.id,
            outcome.address,
            outcome.host or "none",
            delay_text(delay),
            detail,
            status,
            outcome.reply,
            extra=fields(
                queue_id=message.id,
                event=status,
                from_=message.sender,
                to=outcome.address,
                relay=outcome.host or None,
                delay=delay,
                dsn=detail,
                status=status,
                reason=outcome.reply,
            ),
        )
    if removed:
        log.info("%s: removed", message.id, extra=fields(queue_id=message.id, event="removed"))


def needs_delay_warning(
    config: Config, message: MessageRow, deferred: Sequence[Outcome], now: float
) -> bool:
    warn_after = config.retry.warn_after
    return bool(
        warn_after is not None
        and deferred
        and not message.warned
        and message.sender
        and now - message.received_at >= warn_after
    )


def notices(
    config: Config,
    message: MessageRow,
    failed: Sequence[Outcome],
    delayed: Sequence[Outcome],
    body: bytes,
    now: float,
) -> list[NewMessage]:
    by_address = {r.address: r for r in message.recipients}
    notices = []
    for action, outcomes, wanted in (
        (dsn.FAILED, failed, "FAILURE"),
        (dsn.DELAYED, delayed, "DELAY"),
    ):
        reports = [
            report(by_address[o.address], o, action, now)
            for o in outcomes
            if notify_allows(by_address[o.address].notify, wanted)
        ]
        if not reports:
            continue
        if not message.sender:
            # RFC 5321 4.5.5 / RFC 3464: never a DSN to the null reverse-path. A failed
            # bounce is a double bounce: the postmaster hears of it, once (never of a
            # failed double bounce, which would loop).
            for r in reports:
                metrics.bounces_suppressed.labels(_domain(r.address)).inc()
            log.info("%s: %s, no DSN to the null sender", message.id, action)
            postmaster = config.postmaster
            to_postmaster = any(r.address == postmaster for r in reports)
            if action == dsn.FAILED and postmaster and not to_postmaster:
                notice = dsn_message(config, message, reports, body, now, to=(postmaster,))
                log.info("%s: double bounce %s to <%s>", message.id, notice.id, postmaster)
                notices.append(notice)
            continue
        notices.append(dsn_message(config, message, reports, body, now))
    return notices


def report(
    recipient: RecipientRow, outcome: Outcome, action: str, now: float
) -> dsn.RecipientReport:
    code, _, text = outcome.reply.partition(" ")
    code_number = int(code) if code.isdigit() else (500 if action == dsn.FAILED else 400)
    return dsn.RecipientReport(
        address=recipient.address,
        original_recipient=recipient.orcpt,
        action=action,
        status=dsn.status_from_reply(code_number, text),
        diagnostic=outcome.reply,
        remote_mta=outcome.host or None,
        last_attempt=datetime.fromtimestamp(now, UTC),
    )


def dsn_message(
    config: Config,
    message: MessageRow,
    reports: list[dsn.RecipientReport],
    body: bytes,
    now: float,
    to: Sequence[str] = (),
) -> NewMessage:
    """The DSN to the sender (or to `to`); an operator bounce also copies the postmaster,
    who then sees what was bounced by hand, as Postfix's notify_classes = bounce does."""
    hostname = config.hostname
    postmaster = config.postmaster
    queue_id = new_queue_id(now)
    recipients = list(to) or [message.sender]
    by_operator = any(r.diagnostic == OPERATOR_BOUNCE for r in reports)
    if by_operator and postmaster and postmaster not in recipients:
        recipients.append(postmaster)
    data = dsn.build_dsn(
        reporting_mta=hostname,
        original_sender=message.sender,
        original_message=body,
        reports=reports,
        arrival=datetime.fromtimestamp(message.received_at, UTC),
        now=datetime.fromtimestamp(now, UTC),
        envid=message.envid,
        ret=message.ret,
        message_id=f"<{queue_id}@{hostname}>",
        postmaster=postmaster,
        to=recipients[0],
    )
    if not to:
        log.info(
            "%s: sender DSN %s to <%s>",
            message.id,
            queue_id,
            message.sender,
            extra=fields(queue_id=message.id, event="dsn", to=message.sender),
        )
    if len(recipients) > 1:
        log.info("%s: copy of the operator bounce %s to <%s>", message.id, queue_id, postmaster)
    return NewMessage(
        id=queue_id,
        sender="",
        recipients=tuple(NewRecipient(address) for address in recipients),
        body=data,
        received_at=now,
        smtputf8=not all(address.isascii() for address in recipients),
        eightbit=not data.isascii(),
    )


def delay_text(seconds: float) -> str:
    """Postfix's way: `delay=0.19` under ten seconds, whole seconds above (`delay=3602`)."""
    return f"{seconds:.2f}".rstrip("0").rstrip(".") if seconds < 10 else str(int(seconds))


def _domain(address: str) -> str:
    return domain_of(address)


def notify_allows(notify: str | None, event: str) -> bool:
    """RFC 3461 4.1: no NOTIFY means FAILURE (and, at our discretion, DELAY); NEVER means none."""
    if notify is None:
        return event in ("FAILURE", "DELAY")
    return event in notify.split(",")


SUSPENDED = "delivery temporarily suspended"


def suspended_reply(last_error: str | None) -> str:
    """A deferral decided without connecting, because the destination is down, in Postfix's
    words: "421 4.4.1 delivery temporarily suspended: connection refused by …". `relay queue
    show` can then tell it from an attempt that was really made."""
    code, _, rest = (last_error or "421 4.4.1 destination down").partition(" ")
    status, _, text = rest.partition(" ") if rest[:1].isdigit() else ("4.4.1", "", rest)
    if not code.startswith("4"):
        code, status = "421", "4.4.1"
    return f"{code} {status} {SUSPENDED}: {text or 'destination down'}"


def expiry_reply(last_reply: str | None) -> str:
    """The bounce reason for mail that outlived queue.lifetime: the last error we saw."""
    if last_reply and last_reply[:1] in "45":
        return f"{last_reply} (gave up: message too old)"
    return "451 4.4.7 Delivery time expired"
