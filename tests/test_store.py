"""The SQLite queue: schema and migrations, durability settings, group commit, operator commands.

Real database files under tmp_path; time comes from an injected clock so "due now" and ages are
exact.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlite_utils

from relay.store import (
    DELIVERED,
    FAILED,
    HELD,
    QUEUED,
    SCHEMA_VERSION,
    Actor,
    AsyncStore,
    NewMessage,
    NewRecipient,
    Operated,
    Outcome,
    Selection,
    StorageError,
    Store,
    new_queue_id,
)
from relay.store import ids as store_ids
from relay.store import schema as store_schema
from tests.conftest import open_store

T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def message(
    queue_id: str,
    *recipients: str,
    received_at: float = T0,
    body: bytes = b"Subject: x\r\n\r\nbody\r\n",
    sender: str = "sender@client.test",
    **fields: object,
) -> NewMessage:
    return NewMessage(
        id=queue_id,
        sender=sender,
        recipients=tuple(NewRecipient(r) for r in recipients or ("bob@example.test",)),
        body=body,
        received_at=received_at,
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    store = Store(str(tmp_path / "spool" / "queue.db"), clock)
    yield store
    store.close()


def table_rows(store: Store, table: str, message_id: str) -> int:
    column = "id" if table == "messages" else "message_id"
    query = f"SELECT COUNT(*) FROM {table} WHERE {column} = ?"
    return int(store.conn.execute(query, (message_id,)).fetchone()[0])


# -- reads and writes -------------------------------------------------------------------------


def test_a_message_is_stored_with_one_row_per_recipient(db: Store) -> None:
    body = b"Received: x\r\n\r\n\x00\xff bytes\r\n"
    db.put(
        NewMessage(
            id="A1",
            sender="sender@client.test",
            recipients=(
                NewRecipient("Alice@Example.TEST", notify="FAILURE", orcpt="rfc822;Alice@X"),
                NewRecipient("bob@other.test"),
            ),
            body=body,
            received_at=T0 - 60,
            client_ip="127.0.0.2",
            helo="client.test",
            smtputf8=True,
            eightbit=True,
            envid="ENV1",
            ret="HDRS",
        )
    )
    row = db.get("A1")
    assert row is not None
    assert (row.id, row.sender, row.size, row.received_at, row.state) == (
        "A1",
        "sender@client.test",
        len(body),
        T0 - 60,
        QUEUED,
    )
    assert (row.client_ip, row.helo, row.smtputf8, row.eightbit, row.envid, row.ret) == (
        "127.0.0.2",
        "client.test",
        True,
        True,
        "ENV1",
        "HDRS",
    )
    assert [(r.address, r.domain, r.state, r.attempts, r.last_reply) for r in row.recipients] == [
        ("Alice@Example.TEST", "example.test", QUEUED, 0, None),
        ("bob@other.test", "other.test", QUEUED, 0, None),
    ]
    assert [(r.notify, r.orcpt) for r in row.recipients] == [
        ("FAILURE", "rfc822;Alice@X"),
        (None, None),
    ]
    # Due at once: the first attempt is at arrival.
    assert [r.next_attempt_at for r in row.recipients] == [T0 - 60, T0 - 60]
    assert db.body("A1") == body
    assert db.get("nope") is None and db.body("nope") is None


def test_the_listing_is_in_arrival_order_and_reads_no_bodies(db: Store) -> None:
    db.put(message("B", received_at=T0 - 10))
    db.put(message("A", received_at=T0 - 20))
    db.put(message("C", received_at=T0 - 5))
    assert [m.id for m in db.list_messages()] == ["A", "B", "C"]


def test_a_duplicate_id_is_a_storage_error_not_an_sqlite_one(db: Store) -> None:
    db.put(message("A"))
    with pytest.raises(StorageError, match="UNIQUE"):
        db.put(message("A", "someone@example.test"))
    assert [r.address for r in db.get("A").recipients] == ["bob@example.test"]  # type: ignore[union-attr]


def test_queue_ids_sort_by_arrival_and_do_not_collide() -> None:
    ids = [new_queue_id(T0 + i / 1000) for i in range(1000)]
    assert ids == sorted(ids)
    same_instant = {new_queue_id(T0) for _ in range(2000)}
    assert len(same_instant) == 2000
    assert set("".join(ids)) <= set(store_ids._CROCKFORD)  # no I, L, O, U: unambiguous


# -- schema, migrations, files ----------------------------------------------------------------


def test_a_new_queue_has_the_current_schema_version(db: Store) -> None:
    assert db.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert set(sqlite_utils.Database(db.conn).table_names()) >= {
        "messages",
        "bodies",
        "recipients",
        "attempts",
        "destinations",
    }


def test_every_connection_is_wal_with_full_sync(db: Store) -> None:
    """What lets us say 250 after COMMIT: the WAL is fsynced before COMMIT returns."""
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_an_old_queue_is_migrated_and_keeps_its_mail(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    conn = sqlite3.connect(path, isolation_level=None)
    store_schema._MIGRATIONS[0](sqlite_utils.Database(conn))
    conn.execute("PRAGMA user_version=1")
    conn.execute(
        "INSERT INTO messages (id, sender, size, received_at, state)"
        " VALUES ('OLD', 's@x', 4, 1, 'queued')"
    )
    conn.execute("INSERT INTO bodies VALUES ('OLD', x'00ff0d0a')")
    conn.execute(
        "INSERT INTO recipients (message_id, address, domain, state, attempts, next_attempt_at)"
        " VALUES ('OLD', 'bob@example.test', 'example.test', 'queued', 3, 5)"
    )
    conn.close()

    with open_store(path) as store:
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert "destinations" in sqlite_utils.Database(store.conn).table_names()
        row = store.get("OLD")
        assert row is not None and row.recipients[0].attempts == 3
        assert store.body("OLD") == b"\x00\xff\r\n"


def test_a_failed_migration_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    conn = sqlite3.connect(path, isolation_level=None)
    store_schema._MIGRATIONS[0](sqlite_utils.Database(conn))
    conn.execute("PRAGMA user_version=1")
    conn.execute("CREATE TABLE destinations (domain TEXT)")  # in the way of migration 2
    conn.close()
    with pytest.raises(StorageError, match=r"cannot open queue .*destinations"):
        Store(str(path))
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        conn.close()


def test_a_queue_from_a_newer_relay_is_refused_clearly_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    Store(str(path)).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StorageError) as caught:
        Store(str(path))
    assert str(caught.value) == (
        f"queue schema version {SCHEMA_VERSION + 1} is newer than this relay understands"
        f" ({SCHEMA_VERSION}): upgrade relay"
    )
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    finally:
        conn.close()


def test_queue_files_are_private_to_the_relay(tmp_path: Path) -> None:
    os.umask(0o022)
    path = tmp_path / "new" / "spool" / "queue.db"
    with open_store(path) as store:
        store.put(message("A"))
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        for name in ("queue.db", "queue.db-wal", "queue.db-shm"):
            assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name


@pytest.mark.parametrize("kind", ["directory", "garbage"])
def test_a_path_that_is_not_a_queue_is_a_storage_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "queue.db"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"this is not an SQLite database, it is a text file" * 100)
    with pytest.raises(StorageError, match=f"cannot open queue {path}: "):
        Store(str(path))


def test_reads_of_a_damaged_queue_are_storage_errors(db: Store) -> None:
    db.put(message("A"))
    other = sqlite3.connect(db.path, isolation_level=None)
    other.execute("DROP TABLE attempts")
    other.execute("DROP TABLE recipients")
    other.close()
    with pytest.raises(StorageError, match="no such table: recipients"):
        db.list_messages()
    with pytest.raises(StorageError):
        db.snapshot()


# -- group commit -----------------------------------------------------------------------------


async def test_many_concurrent_puts_all_succeed_and_are_all_stored(tmp_path: Path) -> None:
    path = str(tmp_path / "queue.db")
    writer = AsyncStore(path)
    try:
        messages = [message(f"M{i:04d}", f"r{i}@example.test") for i in range(300)]
        await asyncio.gather(*(writer.put(m) for m in messages))
    finally:
        writer.close()
    with open_store(path) as store:
        assert sorted(m.id for m in store.list_messages()) == [m.id for m in messages]
        assert store.body("M0299") == messages[-1].body


async def test_a_failing_job_fails_alone_in_a_shared_commit(tmp_path: Path) -> None:
    path = str(tmp_path / "queue.db")
    writer = AsyncStore(path)
    try:
        await writer.put(message("TAKEN", "first@example.test"))
        statements: list[str] = []
        inside, release = threading.Event(), threading.Event()

        def hold_the_writer(store: Store) -> None:
            store.conn.set_trace_callback(statements.append)
            inside.set()
            release.wait(10)

        blocker = asyncio.ensure_future(writer.run(hold_the_writer))
        await asyncio.to_thread(inside.wait, 10)
        # Everything below queues up behind the blocker and goes into the next batch.
        good = [asyncio.ensure_future(writer.put(message(f"G{i:02d}"))) for i in range(20)]
        bad = asyncio.ensure_future(writer.put(message("TAKEN", "second@example.test")))
        more = [asyncio.ensure_future(writer.put(message(f"H{i:02d}"))) for i in range(20)]
        release.set()
        await blocker
        await asyncio.gather(*good, *more)
        with pytest.raises(StorageError, match="UNIQUE"):
            await bad
    finally:
        writer.close()
    assert statements.count("COMMIT") == 2, "the blocker's batch, then one for all 41 puts"
    with open_store(path) as store:
        ids = {m.id for m in store.list_messages()}
        assert ids == {"TAKEN"} | {f"G{i:02d}" for i in range(20)} | {
            f"H{i:02d}" for i in range(20)
        }
        assert [r.address for r in store.get("TAKEN").recipients] == ["first@example.test"]  # type: ignore[union-attr]


async def test_callers_that_give_up_do_not_break_the_writer(tmp_path: Path) -> None:
    """A cancelled caller (a client gone mid-DATA, a scheduler stopping) must not kill the writer.

    A job cancelled before it starts is dropped; one already running is committed anyway (its
    caller just no longer hears about it); either way the next write still goes through.
    """
    path = str(tmp_path / "queue.db")
    writer = AsyncStore(path)
    try:
        inside, release = threading.Event(), threading.Event()

        def running_job(store: Store) -> None:
            store.insert(message("RUNNING"))
            inside.set()
            release.wait(10)

        running = asyncio.ensure_future(writer.run(running_job))
        await asyncio.to_thread(inside.wait, 10)
        waiting = asyncio.ensure_future(writer.put(message("WAITING")))
        await asyncio.sleep(0)  # the put is queued behind the running job
        running.cancel()
        waiting.cancel()
        release.set()
        for task in (running, waiting):
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.wait_for(writer.put(message("AFTER")), 10)
    finally:
        writer.close()
    with open_store(path) as store:
        assert [m.id for m in store.list_messages()] == ["AFTER", "RUNNING"]


async def test_a_queue_that_cannot_be_opened_fails_the_async_store_at_once(tmp_path: Path) -> None:
    (tmp_path / "queue.db").mkdir()
    with pytest.raises(StorageError):
        AsyncStore(str(tmp_path / "queue.db"))


# -- operator commands ------------------------------------------------------------------------


def recipients_of(store: Store, queue_id: str) -> list[tuple[str, str, float, bool]]:
    row = store.get(queue_id)
    assert row is not None
    return [(r.address, r.state, r.next_attempt_at, r.bounce_requested) for r in row.recipients]


def defer(store: Store, queue_id: str, *addresses: str, until: float) -> None:
    outcomes = [Outcome(a, QUEUED, "451 4.4.1 try later", "mx", until) for a in addresses]
    store.transaction(lambda s: s.record(queue_id, outcomes))


def test_hold_keeps_a_message_out_of_delivery_until_released(db: Store, clock: Clock) -> None:
    db.put(message("A", "a@example.test"))
    db.put(message("B", "b@example.test"))
    defer(db, "A", "a@example.test", until=T0 + 3600)
    assert db.hold(["A", "B"]).done == ["A", "B"]
    assert [m.state for m in db.list_messages()] == [HELD, HELD]
    clock.now = T0 + 7200
    assert db.due(clock.now) == [] and db.next_due_at() is None

    clock.now = T0 + 100
    assert db.release(["A"]).done == ["A"]
    # Released means due now, like `postsuper -H`, not at the old retry time.
    assert recipients_of(db, "A") == [("a@example.test", QUEUED, T0 + 100, False)]
    assert [m.id for m in db.due(clock.now)] == ["A"]
    assert db.get("B").state == HELD  # type: ignore[union-attr]


def test_flush_makes_queued_mail_due_now_but_not_held_mail(db: Store, clock: Clock) -> None:
    for queue_id in ("A", "B", "C"):
        db.put(message(queue_id, f"{queue_id.lower()}@example.test"))
        defer(db, queue_id, f"{queue_id.lower()}@example.test", until=T0 + 3600)
    db.hold(["C"])
    clock.now = T0 + 60
    assert db.flush() == Operated(["A", "B"])
    assert [m.id for m in db.due(clock.now)] == ["A", "B"]
    assert recipients_of(db, "C")[0][2] == T0 + 3600

    defer(db, "A", "a@example.test", until=T0 + 7200)
    defer(db, "B", "b@example.test", until=T0 + 7200)
    clock.now = T0 + 120
    assert db.flush(["B"]) == Operated(["B"])
    assert db.flush(["C"]) == Operated([], skipped=["C"])  # held stays held
    assert [m.id for m in db.due(clock.now)] == ["B"]


def test_delete_removes_every_trace_of_a_message(db: Store) -> None:
    db.put(message("A", "a@example.test", "b@example.test"))
    defer(db, "A", "a@example.test", until=T0 + 60)
    db.put(message("B"))
    assert db.delete(["A"]).done == ["A"]
    for table in ("messages", "bodies", "recipients", "attempts"):
        assert table_rows(db, table, "A") == 0, table
    assert [m.id for m in db.list_messages()] == ["B"]


def test_bounce_marks_the_waiting_recipients_and_releases_a_held_message(
    db: Store, clock: Clock
) -> None:
    db.put(message("A", "done@example.test", "wait@example.test"))
    outcomes = [
        Outcome("done@example.test", DELIVERED, "250 ok", "mx"),
        Outcome("wait@example.test", QUEUED, "451 later", "mx", T0 + 3600),
    ]
    db.transaction(lambda s: s.record("A", outcomes))
    db.hold(["A"])
    clock.now = T0 + 5
    assert db.request_bounce(["A"]).done == ["A"]
    assert db.get("A").state == QUEUED  # type: ignore[union-attr]
    assert recipients_of(db, "A") == [
        ("done@example.test", DELIVERED, 0.0, False),
        ("wait@example.test", QUEUED, T0 + 5, True),
    ]


@pytest.mark.parametrize("command", ["hold", "release", "delete", "flush", "request_bounce"])
def test_unknown_ids_are_reported_and_the_known_ones_acted_on(db: Store, command: str) -> None:
    """Like postsuper: a batch with a typo still acts on every id it can find."""
    db.put(message("A"))
    db.put(message("B"))
    db.hold(["A"]) if command == "release" else None
    before = db.get("B")
    done = getattr(db, command)(["A", "NOPE", "ALSO-NOPE"])
    assert done == Operated(["A"], missing=["NOPE", "ALSO-NOPE"])
    assert db.get("B") == before


def _selectable(db: Store, clock: Clock) -> None:
    db.put(message("OLD", "a@example.test", sender="alice@client.test"))
    later = T0 + 3600
    db.put(message("NEW", "b@other.test", "c@example.test", sender="", received_at=later))
    db.put(
        message(
            "DONE",
            "d@example.test",
            "e@other.test",
            sender="Alice@Client.test",
            received_at=later + 1,
        )
    )
    delivered = [Outcome("d@example.test", DELIVERED, "250 ok", "mx")]
    db.transaction(lambda s: s.record("DONE", delivered))


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (Selection(domain="example.test"), ["OLD", "NEW"]),
        (Selection(domain="other.test"), ["NEW", "DONE"]),
        (Selection(sender="alice@client.test"), ["OLD", "DONE"]),
        (Selection(sender=""), ["NEW"]),
        (Selection(recipient="C@example.test"), ["NEW"]),
        (Selection(recipient="d@example.test"), []),  # delivered: no longer waiting there
        (Selection(received_before=T0 + 1800), ["OLD"]),
        (Selection(domain="example.test", sender=""), ["NEW"]),
        (Selection(everything=True), ["OLD", "NEW", "DONE"]),
        (Selection(), []),
    ],
)
def test_selection_matches_every_criterion_given(
    db: Store, clock: Clock, selection: Selection, expected: list[str]
) -> None:
    _selectable(db, clock)
    assert db.select(selection) == expected


def test_a_selected_action_is_audited_in_its_own_transaction(db: Store, clock: Clock) -> None:
    _selectable(db, clock)
    who = Actor(1000, "alice")
    assert db.hold(["NOPE"], Selection(domain="other.test"), who).done == ["NEW", "DONE"]
    db.flush(actor=who)
    [entry, flushed] = db.unlogged_audit()
    assert (entry.uid, entry.user, entry.action, entry.ids) == (
        1000,
        "alice",
        "hold",
        ["NEW", "DONE"],
    )
    assert (flushed.action, flushed.ids) == ("flush", ["OLD"])
    db.transaction(lambda s: s.mark_audit_logged(entry.id, forget_before=0))
    assert [e.action for e in db.unlogged_audit()] == ["flush"]


# -- delivery results and gauges ----------------------------------------------------------------


def test_record_keeps_per_recipient_state_and_deletes_the_message_when_all_are_done(
    db: Store, clock: Clock
) -> None:
    db.put(message("A", "ok@example.test", "later@example.test", "bad@other.test"))
    clock.now = T0 + 10
    left = db.transaction(
        lambda s: s.record(
            "A",
            [
                Outcome("ok@example.test", DELIVERED, "250 2.0.0 accepted", "mx1"),
                Outcome("later@example.test", QUEUED, "451 4.3.0 busy", "mx1", T0 + 600),
                Outcome("bad@other.test", FAILED, "550 5.1.1 no such user", "mx9"),
            ],
        )
    )
    assert left is False
    row = db.get("A")
    assert row is not None
    assert [(r.state, r.attempts, r.last_reply) for r in row.recipients] == [
        (DELIVERED, 1, "250 2.0.0 accepted"),
        (QUEUED, 1, "451 4.3.0 busy"),
        (FAILED, 1, "550 5.1.1 no such user"),
    ]
    assert [(a.at, a.address, a.host) for a in row.attempts] == [
        (T0 + 10, "ok@example.test", "mx1"),
        (T0 + 10, "later@example.test", "mx1"),
        (T0 + 10, "bad@other.test", "mx9"),
    ]
    assert (row.attempt_count, row.next_attempt_at, row.last_error) == (
        1,
        T0 + 600,
        "451 4.3.0 busy",
    )
    assert db.due(T0 + 599) == [] and [m.id for m in db.due(T0 + 600)] == ["A"]

    # A second outcome for a recipient already done changes nothing.
    db.transaction(lambda s: s.record("A", [Outcome("ok@example.test", FAILED, "550 x", "mx")]))
    assert db.get("A").recipients[0].state == DELIVERED  # type: ignore[union-attr]

    gone = db.transaction(
        lambda s: s.record("A", [Outcome("later@example.test", DELIVERED, "250 ok", "mx1")])
    )
    assert gone is True
    for table in ("messages", "bodies", "recipients", "attempts"):
        assert table_rows(db, table, "A") == 0, table


def test_snapshot_counts_messages_by_state_and_waiting_recipients_by_domain(
    db: Store, clock: Clock
) -> None:
    assert (db.snapshot().messages_by_state, db.snapshot().recipients_by_domain) == ({}, {})
    db.put(message("A", "a@example.test", "b@example.test", received_at=T0 - 300))
    db.put(message("B", "c@example.test", "d@other.test", received_at=T0 - 100))
    db.put(message("C", "e@other.test", received_at=T0 - 50))
    db.hold(["C"])
    db.transaction(lambda s: s.record("A", [Outcome("a@example.test", DELIVERED, "250 ok", "mx")]))
    snap = db.snapshot()
    assert snap.messages_by_state == {QUEUED: 2, HELD: 1}
    # Held mail is neither delivered nor expired: it is counted apart, per message.
    assert snap.recipients_by_domain == {"example.test": 2, "other.test": 1}
    assert snap.oldest_age_by_domain == {"example.test": 300.0, "other.test": 100.0}
    assert snap.held_by_domain == {"other.test": 1}


def test_per_message_updates_do_not_scan_the_whole_queue(tmp_path: Path) -> None:
    """Recording one message's outcome must cost the same with 20,000 messages queued as with
    one: SQLite once chose the (state, next_attempt_at) index for "this message's queued
    recipients" and scanned every queued recipient per delivery (quadratic drains)."""
    store = Store(str(tmp_path / "queue.db"))
    now = 1_800_000_000.0

    def fill(s: Store) -> None:
        for n in range(20_000):
            s.insert(
                NewMessage(
                    id=f"M{n:06d}",
                    sender="a@client.test",
                    recipients=(NewRecipient(f"u{n}@example.test"),),
                    body=b"x",
                    received_at=now,
                )
            )

    store.transaction(fill)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    store.conn.set_progress_handler(count, 100)  # called every 100 VM instructions
    outcome = Outcome("u7@example.test", QUEUED, "451 4.3.0 later", "", now + 60)
    store.transaction(lambda s: s.record("M000007", [outcome]))
    store.flush(["M000008"])
    store.request_bounce(["M000009"])
    store.conn.set_progress_handler(None, 0)
    store.close()
    assert steps < 50, f"{steps * 100} VM steps for three one-message updates"


# -- space comes back --------------------------------------------------------------------------


def _fill(store: Store, count: int, size: int) -> list[str]:
    ids = [f"BIG{n:04d}" for n in range(count)]
    for queue_id in ids:
        store.put(
            message(queue_id, body=b"Subject: big\r\n\r\n" + os.urandom(size // 2).hex().encode())
        )
    return ids


@pytest.mark.parametrize("old_file", [False, True], ids=["incremental", "from-before-auto-vacuum"])
async def test_a_drained_queue_gives_its_space_back(tmp_path: Path, old_file: bool) -> None:
    """After an outage drains, the file shrinks: step by step on a queue made with auto_vacuum,
    by one VACUUM (which converts it) on a queue file made before that."""
    path = str(tmp_path / "queue.db")
    with open_store(path) as store:
        assert store.file_stats().incremental
        if old_file:
            store.conn.execute("PRAGMA auto_vacuum=NONE")
            store.conn.execute("VACUUM")
            assert not store.file_stats().incremental
        ids = _fill(store, 120, 100_000)
        store.put(message("KEEP"))
        full = store.file_stats()
        assert full.size > 10 * 2**20
        assert store.delete(ids).done == ids
        assert store.file_stats().free_share > 0.9
    writer = AsyncStore(path)
    try:
        line = await writer.maintain()
        assert line is not None and line.startswith("queue file ")
        assert await writer.maintain() is None  # nothing left to give back
    finally:
        writer.close()
    with open_store(path) as store:
        after = store.file_stats()
        assert after.incremental and after.size < 2**20 and after.free_pages < 100
        assert [m.id for m in store.list_messages()] == ["KEEP"]
    # The file itself, once checkpointed at close:
    assert await asyncio.to_thread(os.path.getsize, path) < 2**20


async def test_a_queue_with_little_free_space_is_left_alone(tmp_path: Path) -> None:
    path = str(tmp_path / "queue.db")
    with open_store(path) as store:
        ids = _fill(store, 40, 100_000)
        store.delete(ids[:10])
        before = store.file_stats()
    writer = AsyncStore(path)
    try:
        assert await writer.maintain() is None
    finally:
        writer.close()
    with open_store(path) as store:
        assert store.file_stats().pages == before.pages
