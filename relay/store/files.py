"""Who may write the queue's files: checked before the server opens them (`postfix check`).

Whoever can write the queue database, its WAL or the directory holding them can rewrite or drop
mail the relay has answered 250 for, or plant a `-wal` file SQLite would replay into the queue at
the next open. So, like Postfix's `postfix check` for its queue directories, the server refuses
to start when any of them is writable by group or others, or belongs to another user than the
one it runs as. The files are looked at by path (`os.stat`), never opened: see schema.py on why
only SQLite opens the queue file.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

# SQLite's companions of a database in WAL mode: they hold committed mail too.
SIDECARS = ("-wal", "-shm")


@dataclass(frozen=True)
class Unsafe:
    """One queue file or directory that others could change: what is wrong and the command."""

    path: str
    message: str
    fix: str


def queue_paths(queue_path: str) -> list[tuple[str, Path]]:
    """(what, path) for the directory, the database and its sidecars, symlinks resolved."""
    target = Path(queue_path).expanduser().resolve()
    sidecars = [Path(f"{target}{suffix}") for suffix in SIDECARS]
    return [("queue directory", target.parent), *(("queue file", p) for p in [target, *sidecars])]


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def unsafe_queue_files(
    queue_path: str, user: int, role: str = "who runs the server"
) -> list[Unsafe]:
    """Every queue file or directory that exists and that someone besides `user` can write.

    `role` says who `user` is, for the message: the server's user, or the directory's owner.
    Files not there yet are fine: the store creates the directory 0700 and the file 0600.
    """
    found: list[Unsafe] = []
    for what, path in queue_paths(queue_path):
        try:
            info = os.stat(path)
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o022:
            who = {0o020: "group", 0o002: "others", 0o022: "group and others"}[mode & 0o022]
            found.append(
                Unsafe(
                    str(path),
                    f"{what} {path} is writable by {who} (mode {mode:04o}): they could change"
                    " or remove accepted mail",
                    f"chmod go-w {path}",
                )
            )
        if info.st_uid != user:
            owner, runner = user_name(info.st_uid), user_name(user)
            found.append(
                Unsafe(
                    str(path),
                    f"{what} {path} belongs to {owner}, not to {runner} {role}",
                    f"chown {runner} {path}",
                )
            )
    return found
