"""The queue's schema, its migrations, and how every connection opens the file.

The queue file is opened only through SQLite, in every process (see `_restrict_new_file`): the
CLI and the metrics reader run beside the server's writer, and a descriptor closed outside
SQLite would drop the locks that keep one of them from deleting the others' WAL.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from relay.store.rows import QUEUED, StorageError

if TYPE_CHECKING:
    import sqlite_utils

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


@_migration
def _v5_domain_controls(db: sqlite_utils.Database) -> None:
    """What an operator decided for a domain at run time (relay domain reroute / pause): kept
    with the queue, so a restart keeps steering the mail the same way."""
    db.table("domain_controls").create(
        {
            "domain": str,
            "paused": int,
            "paused_at": float,
            "reroute": str,
            "reroute_tls": str,
            "rerouted_at": float,
        },
        pk="domain",
        not_null={"paused"},
        defaults={"paused": 0},
    )


@_migration
def _v6_rescue(db: sqlite_utils.Database) -> None:
    """Rescue mailboxes (relay.rescue): which copies exist, and when their original left."""
    db.table("domain_controls").add_column("rescue", str)  # "on", "off" or NULL (automatic)
    db.table("rescue_copies").create(
        {
            "message_id": str,
            "address": str,
            "domain": str,
            "file": str,
            "written_at": float,
            "gone_at": float,
        },
        pk=("message_id", "address"),
        not_null={"domain", "file", "written_at"},
    )
    db.table("rescue_copies").create_index(["domain"], index_name="rescue_copies_domain")


@_migration
def _v7_auth(db: sqlite_utils.Database) -> None:
    """What sender authentication found at intake (relay.authresults, JSON): a DSN goes only to
    an authenticated sender. '' for mail accepted before the checks existed, or with them off."""
    db.execute("ALTER TABLE messages ADD COLUMN auth TEXT NOT NULL DEFAULT ''")
    # Why a recipient waits for an operator rather than for the primary: "unauthenticated
    # bounce" (the primary refused it for good, and a DSN to an unauthenticated sender would be
    # backscatter). NULL for every recipient that waits for a delivery.
    db.execute("ALTER TABLE recipients ADD COLUMN hold_reason TEXT")


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
