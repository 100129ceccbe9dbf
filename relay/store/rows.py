"""The queue's vocabulary: states, errors and the rows every stage reads and writes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from relay.envelope import domain_of

# Message states (the operator's view) and recipient states (the delivery engine's view).
QUEUED, HELD = "queued", "held"
DELIVERED, FAILED = "delivered", "failed"

_CROCKFORD = "0123456789BCDFGHJKLMNPQRSTVWXYZ"


class StorageError(Exception):
    """Any failure of the queue database. Intake answers 451 4.3.0 to it, never 250."""


class UnknownMessage(Exception):
    """Queue ids the operator named that are not in the queue."""

    def __init__(self, ids: Sequence[str]) -> None:
        super().__init__(", ".join(ids))
        self.ids = list(ids)


@dataclass(frozen=True)
class Selection:
    """Which messages an operator command acts on besides named ids (`relay queue hold --domain`).

    Every given criterion must match (AND); `everything` selects every message. A message matches
    `domain` and `recipient` only through a recipient still waiting (queued), like Postfix's
    `postqueue -s`: a delivered recipient no longer makes a message that domain's mail.
    """

    domain: str | None = None
    sender: str | None = None  # "" selects the null sender <>
    recipient: str | None = None
    received_before: float | None = None
    everything: bool = False

    @property
    def empty(self) -> bool:
        return not self.everything and (
            self.domain is None
            and self.sender is None
            and self.recipient is None
            and self.received_before is None
        )


@dataclass(frozen=True)
class Operated:
    """What an operator command did: the ids it acted on, and the named ids it did not find.

    Like postsuper, a batch acts on every id it can and reports each one it cannot.
    """

    done: list[str]
    missing: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # found, but the action does not apply


@dataclass(frozen=True)
class Actor:
    """Who ran an operator command: the audit trail names them, as postsuper's log does."""

    uid: int
    user: str


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    uid: int
    user: str
    action: str
    ids: list[str]


# Store.listing's rows: the message's (id, sender, size, received_at, state), then one
# recipient's (address, state, attempts, last_reply, next_attempt_at), all None for a message
# without recipients.
ListingRow = tuple[str, str, int, float, str, Any, Any, Any, Any, Any, Any]


@dataclass(frozen=True)
class QueueSnapshot:
    """What the queue gauges show (relay.metrics), computed here in one read transaction."""

    messages_by_state: dict[str, int]
    # Waiting recipients of messages that will be delivered or expire (held ones excluded).
    recipients_by_domain: dict[str, int]
    oldest_age_by_domain: dict[str, float]
    # Held messages (on_expiry = "hold", `relay queue hold`) with a recipient in each domain.
    held_by_domain: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class NewRecipient:
    address: str
    notify: str | None = None
    orcpt: str | None = None

    @property
    def domain(self) -> str:
        return domain_of(self.address)


@dataclass(frozen=True)
class NewMessage:
    """A message as accepted at intake, about to be committed."""

    id: str
    sender: str
    recipients: tuple[NewRecipient, ...]
    body: bytes
    received_at: float
    client_ip: str = ""
    helo: str = ""
    smtputf8: bool = False
    eightbit: bool = False
    envid: str | None = None
    ret: str | None = None
    auth: str = ""  # sender authentication results, JSON (relay.authresults); '' = unchecked


@dataclass(frozen=True)
class Attempt:
    at: float
    address: str
    host: str
    reply: str


@dataclass(frozen=True)
class RecipientRow:
    address: str
    domain: str
    state: str
    attempts: int
    last_reply: str | None
    next_attempt_at: float
    notify: str | None
    orcpt: str | None
    bounce_requested: bool = False
    hold_reason: str | None = None  # waits for an operator: "unauthenticated bounce"


@dataclass(frozen=True)
class MessageRow:
    id: str
    sender: str
    size: int
    received_at: float
    state: str
    client_ip: str
    helo: str
    smtputf8: bool
    eightbit: bool
    envid: str | None
    ret: str | None
    warned: bool
    recipients: tuple[RecipientRow, ...]
    attempts: tuple[Attempt, ...] = ()
    auth: str = ""  # as stored at intake (relay.authresults)

    @property
    def pending(self) -> tuple[RecipientRow, ...]:
        return tuple(r for r in self.recipients if r.state == QUEUED)

    @property
    def attempt_count(self) -> int:
        return max((r.attempts for r in self.recipients), default=0)

    @property
    def next_attempt_at(self) -> float | None:
        return min((r.next_attempt_at for r in self.pending), default=None)

    @property
    def last_error(self) -> str | None:
        replies = [r.last_reply for r in self.pending if r.last_reply]
        return replies[-1] if replies else None


@dataclass(frozen=True)
class Outcome:
    """The result of one delivery attempt for one recipient, as the scheduler decided it."""

    address: str
    state: str  # QUEUED (deferred), DELIVERED or FAILED
    reply: str
    host: str = ""
    next_attempt_at: float = 0.0
    held: str | None = None  # QUEUED, but for an operator (the hold reason), not for a retry


@dataclass(frozen=True)
class FileStats:
    page_size: int
    pages: int
    free_pages: int
    incremental: bool  # auto_vacuum = INCREMENTAL: free pages can be returned step by step

    @property
    def size(self) -> int:
        return self.page_size * self.pages

    @property
    def free_share(self) -> float:
        return self.free_pages / self.pages if self.pages else 0.0


@dataclass
class DomainSummary:
    """One domain's line of `relay status`: waiting mail, and held mail apart from it."""

    messages: int = 0
    recipients: int = 0
    oldest: float | None = None  # arrival of the oldest waiting (not held) message
    held_messages: int = 0


@dataclass(frozen=True)
class DomainControl:
    """An operator's run-time steering of one domain: delivery paused, or sent elsewhere."""

    domain: str
    paused_at: float | None = None  # paused since then (relay domain pause), else None
    reroute: str | None = None  # "host[:port]" instead of the primary (relay domain reroute)
    reroute_tls: str | None = None  # the tls mode for the reroute target; None: the domain's
    rerouted_at: float | None = None
    rescue: str | None = None  # "on" or "off" by hand (relay rescue on/off); None: automatic

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    @property
    def state(self) -> str:
        """`paused`, `rerouted` or `normal` (relay_domain_state's label)."""
        if self.paused:
            return "paused"
        return "rerouted" if self.reroute else "normal"


@dataclass(frozen=True)
class RescueCopy:
    """One rescue Maildir copy of a queued message for one recipient (relay.rescue)."""

    message_id: str
    address: str
    domain: str
    file: str  # the Maildir base name (before any ":2,flags" Dovecot adds)


@dataclass(frozen=True)
class DestinationState:
    """Up or down since when, as the scheduler last saw a destination domain."""

    domain: str
    up: bool | None
    since: float | None
    last_error: str | None
    last_success: float | None
