"""The SQLite queue: the only module with SQL. Schema, migrations, and every read and write.

Durability rule: a message is acknowledged (250) only after the transaction holding it has been
committed with `synchronous=FULL` in WAL mode, i.e. the WAL has been fsynced. State is kept per
recipient (attempts, last reply, next attempt) so a partial delivery is representable and a bounce
names exactly the recipients that failed. Bodies live in their own table so that listing a queue
of 100,000 messages never reads message bytes.

`Store` is synchronous and owns one connection (used by the CLI and by the writer thread);
`AsyncStore` serialises all server-side access through one writer thread and groups concurrent
writes into one commit (group commit): each caller's future resolves only after the commit that
contains its own work.

The queue file is opened only through SQLite, in every process (see `_restrict_new_file`): the
CLI and the metrics reader run beside the server's writer, and a descriptor closed outside
SQLite would drop the locks that keep one of them from deleting the others' WAL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue as stdlib_queue
import random
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")

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


def address_key(address: str) -> str:
    """How a recipient is remembered: the local part as sent (RFC 5321 2.4: it may be
    case-sensitive), the domain in lower case."""
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"


# The random part keeps apart ids made by different processes; it needs no secrecy (an id gives
# no access to anything), so it comes from a generator seeded once, not a system call per id.
_ID_RANDOM = random.Random(secrets.randbits(128))
_id_lock = threading.Lock()
_last_id_micros = 0


def new_queue_id(now: float | None = None) -> str:
    """A Postfix-style long queue id: time-ordered (sorts by arrival), unique, greppable in logs.

    Unique within the process by construction, as Postfix's are: an id's microsecond stamp is
    never reused, two ids asked for in the same microsecond get consecutive ones. Random digits
    alone collide: 2,000 ids of one instant share a value about once in fourteen runs.
    """
    global _last_id_micros
    micros = int((time.time() if now is None else now) * 1_000_000)
    with _id_lock:
        micros = max(micros, _last_id_micros + 1)
        _last_id_micros = micros
    return _base31(micros) + _base31(_ID_RANDOM.randrange(len(_CROCKFORD) ** 5), width=5)


def _base31(number: int, width: int = 0) -> str:
    """`number` in _CROCKFORD's digits, zero-padded to `width`."""
    digits = ""
    while number:
        number, digit = divmod(number, len(_CROCKFORD))
        digits = _CROCKFORD[digit] + digits
    return digits.rjust(width, _CROCKFORD[0])


# Store.listing's rows: the message's (id, sender, size, received_at, state), then one
# recipient's (address, state, attempts, last_reply, next_attempt_at), all None for a message
# without recipients.
ListingRow = tuple[str, str, int, float, str, Any, Any, Any, Any, Any]


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
        return self.address.rpartition("@")[2].lower()


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
class DestinationState:
    """Up or down since when, as the scheduler last saw a destination domain."""

    domain: str
    up: bool | None
    since: float | None
    last_error: str | None
    last_success: float | None


_MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = []


def _migration(
    fn: Callable[[sqlite_utils.Database], None],
) -> Callable[[sqlite_utils.Database], None]:
    _MIGRATIONS.append(fn)
    return fn


@_migration
def _v1_initial(db: sqlite_utils.Database) -> None:
    db.table("messages").create(
        {
            "id": str,
            "sender": str,
            "size": int,
            "received_at": float,
            "state": str,
            "client_ip": str,
            "helo": str,
            "smtputf8": int,
            "eightbit": int,
            "envid": str,
            "ret": str,
            "warned": int,
        },
        pk="id",
        not_null={"sender", "size", "received_at", "state"},
        defaults={"state": QUEUED, "smtputf8": 0, "eightbit": 0, "warned": 0},
    )
    db.table("bodies").create(
        {"message_id": str, "data": bytes},
        pk="message_id",
        not_null={"data"},
        foreign_keys=[("message_id", "messages", "id")],
    )
    db.table("recipients").create(
        {
            "message_id": str,
            "address": str,
            "domain": str,
            "state": str,
            "attempts": int,
            "last_reply": str,
            "next_attempt_at": float,
            "notify": str,
            "orcpt": str,
            "bounce_requested": int,
        },
        pk=("message_id", "address"),
        not_null={"domain", "state", "attempts", "next_attempt_at"},
        defaults={"state": QUEUED, "attempts": 0, "bounce_requested": 0},
        foreign_keys=[("message_id", "messages", "id")],
    )
    db.table("recipients").create_index(["state", "next_attempt_at"], index_name="recipients_due")
    db.table("recipients").create_index(["domain", "state"], index_name="recipients_domain")
    db.table("attempts").create(
        {"message_id": str, "address": str, "at": float, "host": str, "reply": str},
        not_null={"message_id", "at"},
    )
    db.table("attempts").create_index(["message_id"], index_name="attempts_message")


@_migration
def _v2_destinations(db: sqlite_utils.Database) -> None:
    """What the scheduler last knew of each destination, for `relay status` and restarts."""
    db.table("destinations").create(
        {
            "domain": str,
            "up": int,
            "since": float,
            "last_error": str,
            "last_success": float,
            "updated_at": float,
        },
        pk="domain",
    )


@_migration
def _v3_recipient_verdicts(db: sqlite_utils.Database) -> None:
    """What a primary said about each recipient (callouts, deliveries): relay.policy's memory.

    Kept in the queue database so that it survives a restart during an outage, when it matters.
    """
    db.table("recipient_verdicts").create(
        {"address": str, "accepted": int, "checked_at": float},
        pk="address",
        not_null={"accepted", "checked_at"},
    )


@_migration
def _v4_audit(db: sqlite_utils.Database) -> None:
    """Operator actions (relay queue hold, relay recipients import, ...), written by the CLI in
    the same transaction as the action, and logged by the running server (relay.audit)."""
    db.table("audit").create(
        {"id": int, "at": float, "uid": int, "user": str, "action": str, "ids": str, "logged": int},
        pk="id",
        not_null={"at", "uid", "action", "ids", "logged"},
        defaults={"logged": 0},
    )


SCHEMA_VERSION = len(_MIGRATIONS)


def _connect(path: str) -> sqlite3.Connection:
    """Opens the queue with the durability settings every connection must share."""
    target = Path(path)
    creating = str(path) != ":memory:" and not target.exists()
    if creating:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    if creating:
        _restrict_new_file(conn, target)
        # Before the first table, or it takes a VACUUM: pages freed when an outage drains can
        # then be given back to the filesystem a few at a time (AsyncStore.maintain).
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: every commit fsyncs the WAL before returning, which is what lets us say 250.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def _restrict_new_file(conn: sqlite3.Connection, target: Path) -> None:
    """Makes a new queue file 0600 before it holds a byte of mail, through SQLite alone.

    The file is never opened here with `os.open`: closing *any* descriptor of a database file
    drops every POSIX lock the process holds on it, SQLite's included (sqlite.org, "How To
    Corrupt An SQLite Database File", 2.2). In a server whose metrics reader opens a second
    connection next to the writer's, that made the next process to close its connection believe
    it was the last one: it checkpointed and unlinked the WAL the server was still appending to,
    and every 250 after that was lost at the next crash. So: SQLite creates the file (a read of
    the header does it, in the default rollback mode, before any -wal or -shm exists), and the
    mode is set by path; the -wal and -shm files SQLite makes later copy the database's mode.
    """
    conn.execute("PRAGMA schema_version").fetchone()
    os.chmod(target, 0o600)


def _migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"queue schema version {version} is newer than this relay understands "
            f"({SCHEMA_VERSION}): upgrade relay"
        )
    if version == SCHEMA_VERSION:
        return  # the usual case: no sqlite-utils needed, and every `relay queue` opens a Store
    import sqlite_utils

    db = sqlite_utils.Database(conn)
    for number in range(version, SCHEMA_VERSION):
        db.execute("BEGIN IMMEDIATE")
        try:
            _MIGRATIONS[number](db)
            db.execute(f"PRAGMA user_version={number + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def _translated(method: Callable[P, T]) -> Callable[P, T]:
    """Reads outside `transaction` get the same boundary: no sqlite3 error leaves this module."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from exc

    return wrapper


class Store:
    """Synchronous access to the queue over one connection. Not shared between threads."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        try:
            self.conn = _connect(path)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open queue {path}: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"cannot open queue {path}: {exc.strerror or exc}") from exc
        try:
            _migrate(self.conn)
        except sqlite3.Error as exc:
            self.conn.close()
            raise StorageError(f"cannot open queue {path}: {exc}") from exc
        except BaseException:
            self.conn.close()  # a queue too new for us: do not leak the connection
            raise

    def close(self) -> None:
        self.conn.close()

    # -- transactions -------------------------------------------------------------------------

    def transaction(self, work: Callable[[Store], T]) -> T:
        """Runs `work` in one IMMEDIATE transaction and commits it durably."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(self)
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from exc
        return result

    # -- intake -------------------------------------------------------------------------------

    def insert(self, message: NewMessage) -> None:
        """Adds a message and its recipients; call inside a transaction."""
        self.conn.execute(
            "INSERT INTO messages (id, sender, size, received_at, state, client_ip, helo,"
            " smtputf8, eightbit, envid, ret, warned) VALUES (?,?,?,?,?,?,?,?,?,?,?,0)",
            (
                message.id,
                message.sender,
                len(message.body),
                message.received_at,
                QUEUED,
                message.client_ip,
                message.helo,
                int(message.smtputf8),
                int(message.eightbit),
                message.envid,
                message.ret,
            ),
        )
        self.conn.execute(
            "INSERT INTO bodies (message_id, data) VALUES (?, ?)", (message.id, message.body)
        )
        self.conn.executemany(
            "INSERT INTO recipients (message_id, address, domain, state, attempts,"
            " next_attempt_at, notify, orcpt) VALUES (?,?,?,?,0,?,?,?)",
            [
                (message.id, r.address, r.domain, QUEUED, message.received_at, r.notify, r.orcpt)
                for r in message.recipients
            ],
        )

    def put(self, message: NewMessage) -> None:
        self.transaction(lambda store: store.insert(message))

    # -- reads --------------------------------------------------------------------------------

    def _messages(self, where: str, params: Sequence[Any], *, attempts: bool) -> list[MessageRow]:
        rows = self.conn.execute(
            "SELECT id, sender, size, received_at, state, client_ip, helo, smtputf8, eightbit,"
            f" envid, ret, warned FROM messages {where} ORDER BY received_at, id",
            params,
        ).fetchall()
        if not rows:
            return []
        ids = [row[0] for row in rows]
        recipients: dict[str, list[RecipientRow]] = {i: [] for i in ids}
        for chunk in _chunks(ids, 500):
            marks = ",".join("?" * len(chunk))
            for r in self.conn.execute(
                "SELECT message_id, address, domain, state, attempts, last_reply, next_attempt_at,"
                f" notify, orcpt, bounce_requested FROM recipients WHERE message_id IN ({marks})"
                " ORDER BY rowid",
                chunk,
            ):
                recipients[r[0]].append(
                    RecipientRow(
                        address=r[1],
                        domain=r[2],
                        state=r[3],
                        attempts=r[4],
                        last_reply=r[5],
                        next_attempt_at=r[6],
                        notify=r[7],
                        orcpt=r[8],
                        bounce_requested=bool(r[9]),
                    )
                )
        history: dict[str, list[Attempt]] = {i: [] for i in ids}
        if attempts:
            for chunk in _chunks(ids, 500):
                marks = ",".join("?" * len(chunk))
                for a in self.conn.execute(
                    "SELECT message_id, at, address, host, reply FROM attempts"
                    f" WHERE message_id IN ({marks}) ORDER BY at, rowid",
                    chunk,
                ):
                    history[a[0]].append(Attempt(*a[1:]))
        return [
            MessageRow(
                id=row[0],
                sender=row[1],
                size=row[2],
                received_at=row[3],
                state=row[4],
                client_ip=row[5] or "",
                helo=row[6] or "",
                smtputf8=bool(row[7]),
                eightbit=bool(row[8]),
                envid=row[9],
                ret=row[10],
                warned=bool(row[11]),
                recipients=tuple(recipients[row[0]]),
                attempts=tuple(history[row[0]]),
            )
            for row in rows
        ]

    @_translated
    def list_messages(self) -> list[MessageRow]:
        return self._messages("", (), attempts=False)

    @_translated
    def listing(self) -> list[ListingRow]:
        """One plain row per recipient, messages in arrival order, for `relay queue`.

        No MessageRow objects: building those for a 100,000-message queue took two seconds, and
        an operator lists the queue in the middle of an outage, exactly when it is long. One
        JOIN sorted by SQLite also beats two scans grouped in Python (0.65 s against 1.1 s for
        the whole listing of 100,000 messages, measured on the bench machine).
        """
        rows: list[ListingRow] = self.conn.execute(
            "SELECT m.id, m.sender, m.size, m.received_at, m.state, r.address, r.state,"
            " r.attempts, r.last_reply, r.next_attempt_at"
            " FROM messages m LEFT JOIN recipients r ON r.message_id = m.id"
            " ORDER BY m.received_at, m.id, r.rowid"
        ).fetchall()
        return rows

    @_translated
    def get(self, message_id: str, *, attempts: bool = True) -> MessageRow | None:
        found = self._messages("WHERE id = ?", (message_id,), attempts=attempts)
        return found[0] if found else None

    @_translated
    def body(self, message_id: str, *, unless_held: bool = False) -> bytes | None:
        """The stored message; with `unless_held`, None for a held one too: the scheduler reads
        the body last thing before sending, so an operator's hold stops even a message that was
        already found due (only a transaction already under way can still finish)."""
        sql = "SELECT data FROM bodies WHERE message_id = ?"
        if unless_held:
            sql += " AND message_id IN (SELECT id FROM messages WHERE id = ? AND state != ?)"
        params = (message_id, message_id, HELD) if unless_held else (message_id,)
        row = self.conn.execute(sql, params).fetchone()
        return bytes(row[0]) if row else None

    @_translated
    def due(self, now: float, limit: int = 500, exclude: Iterable[str] = ()) -> list[MessageRow]:
        """Messages with at least one recipient due now, oldest first; held messages never."""
        skip = set(exclude)
        ids: list[str] = []
        for (message_id,) in self.conn.execute(
            "SELECT DISTINCT r.message_id FROM recipients r JOIN messages m ON m.id = r.message_id"
            " WHERE r.state = ? AND r.next_attempt_at <= ? AND m.state = ?"
            " ORDER BY r.next_attempt_at LIMIT ?",
            (QUEUED, now, QUEUED, limit + len(skip)),
        ):
            if message_id not in skip:
                ids.append(message_id)
            if len(ids) >= limit:
                break
        found: list[MessageRow] = []
        for chunk in _chunks(ids, 500):
            marks = ",".join("?" * len(chunk))
            found += self._messages(f"WHERE id IN ({marks})", chunk, attempts=False)
        return found

    @_translated
    def next_due_at(self) -> float | None:
        row = self.conn.execute(
            "SELECT MIN(r.next_attempt_at) FROM recipients r JOIN messages m ON m.id = r.message_id"
            " WHERE r.state = ? AND m.state = ?",
            (QUEUED, QUEUED),
        ).fetchone()
        return row[0] if row else None

    @_translated
    def snapshot(self) -> QueueSnapshot:
        """The queue gauges, read in one transaction so they agree with each other."""
        now = self.clock()
        by_domain: dict[str, int] = {}
        oldest: dict[str, float] = {}
        held: dict[str, int] = {}
        # A savepoint is a read transaction outside one and a no-op nesting inside one, so the
        # two queries see the same commit either way.
        self.conn.execute("SAVEPOINT snapshot")
        try:
            by_state = dict(
                self.conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state")
            )
            for domain, state, count, messages, first in self.conn.execute(
                "SELECT r.domain, m.state, COUNT(*), COUNT(DISTINCT m.id), MIN(m.received_at)"
                " FROM recipients r JOIN messages m ON m.id = r.message_id WHERE r.state = ?"
                " GROUP BY r.domain, m.state",
                (QUEUED,),
            ):
                if state == HELD:
                    held[domain] = messages
                    continue
                by_domain[domain] = count
                oldest[domain] = max(0.0, now - first)
        finally:
            self.conn.execute("RELEASE snapshot")
        return QueueSnapshot(by_state, by_domain, oldest, held)

    @_translated
    def domain_summary(self) -> dict[str, DomainSummary]:
        """Per recipient domain: mail waiting (held apart) and the oldest waiting arrival."""
        found: dict[str, DomainSummary] = {}
        for domain, state, messages, recipients, first in self.conn.execute(
            "SELECT r.domain, m.state, COUNT(DISTINCT r.message_id), COUNT(*), MIN(m.received_at)"
            " FROM recipients r JOIN messages m ON m.id = r.message_id"
            " WHERE r.state = ? GROUP BY r.domain, m.state",
            (QUEUED,),
        ):
            summary = found.setdefault(domain, DomainSummary())
            if state == HELD:
                summary.held_messages = messages
            else:
                summary.messages, summary.recipients, summary.oldest = messages, recipients, first
        return found

    def save_destination(self, state: DestinationState) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO destinations (domain, up, since, last_error, last_success,"
            " updated_at) VALUES (?,?,?,?,?,?)",
            (
                state.domain,
                None if state.up is None else int(state.up),
                state.since,
                state.last_error,
                state.last_success,
                self.clock(),
            ),
        )

    @_translated
    def destinations(self) -> dict[str, DestinationState]:
        return {
            row[0]: DestinationState(
                domain=row[0],
                up=None if row[1] is None else bool(row[1]),
                since=row[2],
                last_error=row[3],
                last_success=row[4],
            )
            for row in self.conn.execute(
                "SELECT domain, up, since, last_error, last_success FROM destinations"
            )
        }

    # -- recipient verdicts (relay.policy) -----------------------------------------------------

    @_translated
    def verdicts(self) -> list[tuple[str, bool, float]]:
        """Every remembered answer: (address, accepted, checked_at)."""
        rows = self.conn.execute("SELECT address, accepted, checked_at FROM recipient_verdicts")
        return [(str(a), bool(ok), float(at)) for a, ok, at in rows]

    def save_verdicts(self, verdicts: Sequence[tuple[str, bool, float]]) -> None:
        """Remembers (address, accepted, checked_at) answers; call inside a transaction."""
        self.conn.executemany(
            "INSERT OR REPLACE INTO recipient_verdicts (address, accepted, checked_at)"
            " VALUES (?,?,?)",
            [(address, int(accepted), at) for address, accepted, at in verdicts],
        )

    def forget_addresses(self, addresses: Sequence[str]) -> list[str]:
        """Drops what is remembered of `addresses`; returns those that were known. In a
        transaction."""
        known = []
        for address in addresses:
            key = address_key(address)
            cursor = self.conn.execute("DELETE FROM recipient_verdicts WHERE address = ?", (key,))
            if cursor.rowcount:
                known.append(key)
        return known

    @_translated
    def file_stats(self) -> FileStats:
        """The queue file's size and how much of it is free pages (for `relay status`)."""
        page_size = int(self.conn.execute("PRAGMA page_size").fetchone()[0])
        pages = int(self.conn.execute("PRAGMA page_count").fetchone()[0])
        free = int(self.conn.execute("PRAGMA freelist_count").fetchone()[0])
        mode = int(self.conn.execute("PRAGMA auto_vacuum").fetchone()[0])
        return FileStats(page_size, pages, free, mode == 2)

    @_translated
    def data_version(self) -> int:
        """Changes when another connection (the CLI) commits: the server's cue to look again."""
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    # -- delivery results ---------------------------------------------------------------------

    def record(self, message_id: str, outcomes: Sequence[Outcome]) -> bool:
        """Stores one attempt's outcomes; deletes the message once no recipient is left queued.

        Returns True when the message left the queue. Call inside a transaction. A message the
        operator deleted meanwhile is simply gone: its outcomes are dropped.
        """
        now = self.clock()
        for outcome in outcomes:
            self.conn.execute(
                "UPDATE recipients SET state = ?, attempts = attempts + 1, last_reply = ?,"
                " next_attempt_at = ?, bounce_requested = 0"
                " WHERE message_id = ? AND address = ? AND state = ?",
                (
                    outcome.state,
                    outcome.reply,
                    outcome.next_attempt_at,
                    message_id,
                    outcome.address,
                    QUEUED,
                ),
            )
            self.conn.execute(
                "INSERT INTO attempts (message_id, address, at, host, reply) VALUES (?,?,?,?,?)",
                (message_id, outcome.address, now, outcome.host, outcome.reply),
            )
        return self.remove_if_done(message_id)

    def remove_if_done(self, message_id: str) -> bool:
        left = self.conn.execute(
            "SELECT COUNT(*) FROM recipients WHERE message_id = ? AND +state = ?",
            (message_id, QUEUED),
        ).fetchone()[0]
        if left:
            return False
        self._delete(message_id)
        return True

    def mark_warned(self, message_id: str) -> None:
        self.conn.execute("UPDATE messages SET warned = 1 WHERE id = ?", (message_id,))

    def reschedule(self, domain: str | None, when: float) -> int:
        """Makes every queued recipient (of one domain, or all) due at `when`: recovery, ETRN."""
        sql = "UPDATE recipients SET next_attempt_at = ? WHERE state = ? AND next_attempt_at > ?"
        params: list[Any] = [when, QUEUED, when]
        if domain is not None:
            sql += " AND domain = ?"
            params.append(domain.lower())
        return self.conn.execute(sql, params).rowcount

    def set_state(self, message_id: str, state: str) -> None:
        self.conn.execute("UPDATE messages SET state = ? WHERE id = ?", (state, message_id))

    # -- operator commands (each one transaction, audited in it; unknown ids are reported) --

    def select(self, selection: Selection) -> list[str]:
        """The ids of the messages `selection` matches, oldest first."""
        where: list[str] = []
        params: list[Any] = []
        if selection.domain is not None:
            where.append(
                "EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id"
                " AND r.domain = ? AND r.state = ?)"
            )
            params += [selection.domain.lower(), QUEUED]
        if selection.recipient is not None:
            where.append(
                "EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id"
                " AND r.address = ? COLLATE NOCASE AND r.state = ?)"
            )
            params += [selection.recipient, QUEUED]
        if selection.sender is not None:
            where.append("m.sender = ? COLLATE NOCASE")
            params.append(selection.sender)
        if selection.received_before is not None:
            where.append("m.received_at < ?")
            params.append(selection.received_before)
        if not where and not selection.everything:
            return []
        sql = "SELECT m.id FROM messages m"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [row[0] for row in self.conn.execute(sql + " ORDER BY m.received_at, m.id", params)]

    def _existing(self, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        found: list[str] = []
        missing: list[str] = []
        for message_id in dict.fromkeys(ids):
            row = self.conn.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,))
            (found if row.fetchone() else missing).append(message_id)
        return found, missing

    def _delete(self, message_id: str) -> None:
        for table in ("attempts", "recipients", "bodies"):
            column = "message_id"
            self.conn.execute(f"DELETE FROM {table} WHERE {column} = ?", (message_id,))
        self.conn.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def audit(self, action: str, ids: Sequence[str], actor: Actor) -> None:
        """Notes an operator action for the server's log; call inside the action's transaction."""
        self.conn.execute(
            "INSERT INTO audit (at, uid, user, action, ids, logged) VALUES (?,?,?,?,?,0)",
            (self.clock(), actor.uid, actor.user, action, " ".join(ids)),
        )

    def unlogged_audit(self) -> list[AuditEntry]:
        """Operator actions the server has not logged yet, oldest first."""
        rows = self.conn.execute(
            "SELECT id, at, uid, user, action, ids FROM audit WHERE logged = 0 ORDER BY id"
        ).fetchall()
        return [AuditEntry(r[0], r[1], r[2], r[3] or "", r[4], r[5].split()) for r in rows]

    def mark_audit_logged(self, last_id: int, forget_before: float) -> None:
        """Call inside a transaction: entries up to `last_id` are in the log; old ones go."""
        self.conn.execute("UPDATE audit SET logged = 1 WHERE id <= ? AND logged = 0", (last_id,))
        self.conn.execute("DELETE FROM audit WHERE logged = 1 AND at < ?", (forget_before,))

    def _operate(
        self,
        action: str,
        ids: Sequence[str],
        selection: Selection | None,
        actor: Actor | None,
        work: Callable[[str], bool | None],
    ) -> Operated:
        """Runs `work` on each named and selected id; `work` returning False skips that id.

        Only a named id is reported as skipped: `flush` of the whole queue need not list every
        held message.
        """

        def run(store: Store) -> Operated:
            named, missing = store._existing(ids)
            found = named
            if selection is not None and not selection.empty:
                found = list(dict.fromkeys([*named, *store.select(selection)]))
            done: list[str] = []
            skipped: list[str] = []
            for message_id in found:
                if work(message_id) is not False:
                    done.append(message_id)
                elif message_id in named:
                    skipped.append(message_id)
            if done and actor is not None:
                store.audit(action, done, actor)
            return Operated(done, missing, skipped)

        return self.transaction(run)

    def hold(
        self, ids: Sequence[str], selection: Selection | None = None, actor: Actor | None = None
    ) -> Operated:
        return self._operate("hold", ids, selection, actor, lambda i: self.set_state(i, HELD))

    def release(
        self, ids: Sequence[str], selection: Selection | None = None, actor: Actor | None = None
    ) -> Operated:
        """Back to the active queue, due now (like `postsuper -H`, which also requeues)."""

        def release_one(message_id: str) -> None:
            self.set_state(message_id, QUEUED)
            self._make_due(message_id)

        return self._operate("release", ids, selection, actor, release_one)

    def delete(
        self, ids: Sequence[str], selection: Selection | None = None, actor: Actor | None = None
    ) -> Operated:
        return self._operate("delete", ids, selection, actor, self._delete)

    def _make_due(self, message_id: str) -> None:
        self.conn.execute(
            "UPDATE recipients SET next_attempt_at = ? WHERE message_id = ? AND +state = ?",
            (self.clock(), message_id, QUEUED),
        )

    def flush(
        self,
        ids: Sequence[str] = (),
        selection: Selection | None = None,
        actor: Actor | None = None,
    ) -> Operated:
        """Makes queued (not held) mail due now, like `postqueue -f` / `postqueue -i ID`.

        With neither ids nor a selection: every queued message (postqueue -f). Held messages
        stay held: flushing is not releasing.
        """
        if not ids and (selection is None or selection.empty):
            selection = Selection(everything=True)

        def flush_one(message_id: str) -> bool:
            held = self.conn.execute(
                "SELECT 1 FROM messages WHERE id = ? AND state = ?", (message_id, HELD)
            ).fetchone()
            if held:
                return False
            self._make_due(message_id)
            return True

        return self._operate("flush", ids, selection, actor, flush_one)

    def request_bounce(
        self, ids: Sequence[str], selection: Selection | None = None, actor: Actor | None = None
    ) -> Operated:
        """Marks the remaining recipients to be failed (with a DSN) by the delivery engine."""

        def mark(message_id: str) -> None:
            self.conn.execute(
                "UPDATE recipients SET bounce_requested = 1, next_attempt_at = ?"
                " WHERE message_id = ? AND +state = ?",
                (self.clock(), message_id, QUEUED),
            )
            self.set_state(message_id, QUEUED)

        return self._operate("bounce", ids, selection, actor, mark)


# Space comes back after an outage drains: when at least this many pages (4 KiB each) and this
# share of the file are free, VACUUM_STEP pages at a time.
VACUUM_MIN_PAGES = 2560
VACUUM_FREE_SHARE = 0.5
VACUUM_STEP = 2048
FULL_VACUUM_LIMIT = 64 * 2**20


def _vacuum_step(store: Store) -> FileStats:
    store.conn.execute(f"PRAGMA incremental_vacuum({VACUUM_STEP})").fetchall()
    return store.file_stats()


def _convert_to_incremental(store: Store) -> None:
    store.conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    store.conn.execute("VACUUM")


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class _Job:
    work: Callable[[Store], Any]
    future: Future[Any] = field(default_factory=Future)
    # A job whose success becomes a 250 to a client: refused once the queue file is gone.
    acknowledges: bool = False
    # Runs alone and outside any transaction (VACUUM cannot run inside one).
    bare: bool = False


def _is_storage_fault(exc: BaseException) -> bool:
    """A failure of the disk or the file (full, I/O error, read-only), not of our own SQL."""
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.IntegrityError | sqlite3.ProgrammingError
    )


def _file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file `path` names now; None when no file is there.

    os.stat on the path, never a descriptor: closing one would drop SQLite's locks.
    """
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


class AsyncStore:
    """The server's handle on the queue: one writer thread, group commit, asyncio futures.

    SQLite allows one writer at a time and every commit costs an fsync, so concurrent SMTP
    sessions hand their work to one thread that runs everything waiting in one transaction (each
    job in its own savepoint, so one job's failure does not fail the others) and commits once.
    A job's future resolves only after that commit returned: a client's 250 always follows its
    own durable commit.
    """

    MAX_BATCH = 256

    def __init__(
        self,
        path: str,
        clock: Callable[[], float] = time.time,
        on_write_error: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.clock = clock
        self.on_write_error = on_write_error
        # The last write fault (disk full, I/O error, read-only), until a commit succeeds again.
        self.write_fault: str | None = None
        # Set for good once the queue file was deleted or replaced under the running server.
        self.detached: str | None = None
        self._identity: tuple[int, int] | None = None
        self._jobs: stdlib_queue.SimpleQueue[_Job | None] = stdlib_queue.SimpleQueue()
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name="relay-store", daemon=True)
        self._thread.start()
        self._ready.result()  # re-raises StorageError from opening the queue

    async def run(self, work: Callable[[Store], T]) -> T:
        """Runs `work(store)` in the writer thread within a committed transaction."""
        job = _Job(work)
        self._jobs.put(job)
        return await asyncio.wrap_future(job.future)

    async def maintain(self) -> str | None:
        """Gives free pages back to the filesystem once most of the file is free (an outage
        drained); a line for the log when it did, else None.

        Incremental: at most VACUUM_STEP pages per writer turn, so a session waiting for its
        commit waits one step (milliseconds), not for the whole file. A queue file from before
        auto_vacuum was set needs one full VACUUM to convert; that is done only while the live
        data is small (FULL_VACUUM_LIMIT), when copying it is quick.
        """
        stats = await self.run(Store.file_stats)
        if stats.free_pages < VACUUM_MIN_PAGES or stats.free_share < VACUUM_FREE_SHARE:
            return None
        started, before = time.monotonic(), stats.size
        if not stats.incremental:
            if stats.size - stats.free_pages * stats.page_size > FULL_VACUUM_LIMIT:
                return None
            job = _Job(_convert_to_incremental, bare=True)
            self._jobs.put(job)
            await asyncio.wrap_future(job.future)
        else:
            while stats.free_pages:
                stats = await self.run(_vacuum_step)
        after = (await self.run(Store.file_stats)).size
        seconds = time.monotonic() - started
        return f"queue file {before / 2**20:.1f} MB -> {after / 2**20:.1f} MB in {seconds:.2f} s"

    async def put(self, message: NewMessage) -> None:
        """Queues a message; returns once it is durable (the caller may then say 250)."""
        job = _Job(lambda store: store.insert(message), acknowledges=True)
        self._jobs.put(job)
        await asyncio.wrap_future(job.future)

    def problems(self) -> list[str]:
        """Why the queue cannot be trusted right now (for /healthz); empty when it can."""
        found = [self.detached] if self.detached else []
        if self.write_fault:
            found.append(f"queue write failed: {self.write_fault}")
        return found

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            store = Store(self.path, self.clock)
        except StorageError as exc:
            self._ready.set_exception(exc)
            return
        if self.path != ":memory:":
            self._identity = _file_identity(self.path)
        self._ready.set_result(None)
        try:
            while (job := self._jobs.get()) is not None:
                if job.bare:
                    self._run_bare(store, job)
                    continue
                batch = [job]
                while len(batch) < self.MAX_BATCH:
                    try:
                        more = self._jobs.get_nowait()
                    except stdlib_queue.Empty:
                        break
                    if more is None or more.bare:
                        self._jobs.put(more)  # after this batch (order kept for None)
                        break
                    batch.append(more)
                # A caller that gave up (cancelled) before its job started loses nothing: drop
                # the job. Once running, a job can no longer be cancelled, so its result is
                # always set: cancelling a done future here used to kill this thread.
                batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
                batch = self._refuse_if_detached(batch)
                if batch:
                    self._commit_or_fail(store, batch)
        finally:
            store.close()

    def _run_bare(self, store: Store, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.work(store))
        except Exception as exc:
            job.future.set_exception(StorageError(str(exc)))

    def _refuse_if_detached(self, batch: list[_Job]) -> list[_Job]:
        """Fails the jobs that would become a 250 once the queue file is no longer at its path.

        After `rm queue.db*` (or a file copied over it) SQLite keeps writing to the unlinked
        file, and everything acknowledged since would vanish at the next start. Checked before
        every group commit: one stat of the path. Deliveries of the mail already in the open
        file go on (it is the only copy left); new mail gets 451 until a restart.
        """
        if self._identity is None:
            return batch
        if self.detached is None and _file_identity(self.path) != self._identity:
            self.detached = f"queue file {self.path} was deleted or replaced while in use"
            log.error("%s: refusing new mail until relay is restarted", self.detached)
        if self.detached is None:
            return batch
        kept = []
        for job in batch:
            if job.acknowledges:
                job.future.set_exception(StorageError(self.detached))
            else:
                kept.append(job)
        return kept

    def _fault(self, exc: BaseException) -> None:
        if self.on_write_error is not None:
            self.on_write_error()
        self.write_fault = str(exc)

    def _commit_or_fail(self, store: Store, batch: list[_Job]) -> None:
        """Any surprise fails this batch's callers and keeps the writer (the queue) alive."""
        try:
            self._commit(store, batch)
        except Exception as exc:
            log.exception("queue writer error")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(StorageError(f"queue writer error: {exc}"))

    def _commit(self, store: Store, batch: list[_Job]) -> None:
        results: list[tuple[_Job, bool, Any]] = []
        faulted = False
        conn = store.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    results.append((job, True, job.work(store)))
                    conn.execute("RELEASE job")
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    if _is_storage_fault(exc):
                        self._fault(exc)
                        faulted = True
                    if isinstance(exc, sqlite3.Error):
                        exc = StorageError(str(exc))
                    results.append((job, False, exc))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("queue commit failed: %s", exc)
            self._fault(exc)
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("rollback failed")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(StorageError(str(exc)))
            return
        if not faulted:
            self.write_fault = None
        for job, ok, value in results:
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)
