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

from relay.store.ids import address_key, new_queue_id
from relay.store.queries import Store
from relay.store.rows import (
    DELIVERED,
    FAILED,
    HELD,
    QUEUED,
    Actor,
    Attempt,
    AuditEntry,
    DestinationState,
    DomainControl,
    DomainSummary,
    FileStats,
    ListingRow,
    MessageRow,
    NewMessage,
    NewRecipient,
    Operated,
    Outcome,
    QueueSnapshot,
    RecipientRow,
    RescueCopy,
    Selection,
    StorageError,
    UnknownMessage,
)
from relay.store.schema import SCHEMA_VERSION
from relay.store.writer import AsyncStore

__all__ = [
    "DELIVERED",
    "FAILED",
    "HELD",
    "QUEUED",
    "SCHEMA_VERSION",
    "Actor",
    "AsyncStore",
    "Attempt",
    "AuditEntry",
    "DestinationState",
    "DomainControl",
    "DomainSummary",
    "FileStats",
    "ListingRow",
    "MessageRow",
    "NewMessage",
    "NewRecipient",
    "Operated",
    "Outcome",
    "QueueSnapshot",
    "RecipientRow",
    "RescueCopy",
    "Selection",
    "StorageError",
    "Store",
    "UnknownMessage",
    "address_key",
    "new_queue_id",
]
