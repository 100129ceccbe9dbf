"""Rescue mailboxes: during a long outage, people read the mail held for them over IMAP.

The relay stays the owner of the mail: each copy is a convenience, the queued original is still
delivered to the primary when it returns. Once a domain's primary has been down for
`rescue_after` (or an operator turned rescue on), every message waiting for a recipient the relay
knows exists (listed, imported or accepted by the primary: never a catch-all, never an address
that got 450) also gets a copy in that person's Maildir, `<rescue.path>/<domain>/<local>/`,
written the Maildir way (tmp/, fsync, rename into new/, fsync the directory). Dovecot serves
those Maildirs (deploy/dovecot/); access is a passwd-file the relay writes (`relay rescue
grant`). A copy is removed `rescue_keep` after its original left the queue, so a person reading
during the recovery does not see mail vanish.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from relay.config import Config, DomainConfig
from relay.envelope import split
from relay.ops import metrics
from relay.store import AsyncStore, DomainControl, RescueCopy, StorageError, Store
from relay.words import age, plural

if TYPE_CHECKING:  # annotations only: `relay status` reads `active` without the server's parts
    from relay.delivery.health import DestinationHealth
    from relay.smtp.policy import RecipientPolicy

log = logging.getLogger("relay.rescue")

PASS_INTERVAL = 2.0  # seconds between rescue passes: copies appear within this of a 250
# A local part that is safe as one directory name and that Dovecot's %Ln gives back unchanged.
_SAFE_LOCAL = re.compile(r"[a-z0-9][a-z0-9._+-]{0,63}")
_SAFE_DOMAIN = re.compile(r"[a-z0-9][a-z0-9.-]{0,252}")


def active(
    settings: DomainConfig, control: DomainControl | None, down_since: float | None, now: float
) -> bool:
    """Whether the domain's rescue mailboxes are filled now: by hand (relay rescue on/off), or
    with `rescue = true` once the primary has been down for `rescue_after`."""
    if control is not None and control.rescue is not None:
        return control.rescue == "on"
    return settings.rescue and down_since is not None and now - down_since >= settings.rescue_after


def maildir_of(root: Path, address: str) -> Path | None:
    """`<root>/<domain>/<local>/`, lower case as Dovecot's %Ld/%Ln give them; None for an address
    that is not safe as a path (a slash, a dot first, a quoted local part): no copy for it."""
    local, domain = (part.lower() for part in split(address))
    domain = domain.rstrip(".")
    if not _SAFE_LOCAL.fullmatch(local) or not _SAFE_DOMAIN.fullmatch(domain):
        return None
    if ".." in domain or ".." in local:
        return None
    return root / domain / local


def write_copy(root: Path, maildir: Path, name: str, content: bytes) -> None:
    """Delivers `content` into `maildir` as new/`name`, durably: tmp/, fsync, rename, fsync.

    Run as root (a container), the relay gives what it creates to the owner of the rescue root,
    the user Dovecot's userdb maps people to: Dovecot refuses to serve mail as root.
    """
    owner = _owner(root)
    for folder in (maildir.parent, maildir, *(maildir / sub for sub in ("tmp", "new", "cur"))):
        if not folder.exists():
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if owner is not None:
                os.chown(folder, *owner)
    temporary = maildir / "tmp" / name
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if owner is not None:
            os.fchown(descriptor, *owner)
        os.write(descriptor, content)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.rename(temporary, maildir / "new" / name)
    directory = os.open(maildir / "new", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _owner(root: Path) -> tuple[int, int] | None:
    """(uid, gid) to give new files when running as root and the rescue root is someone else's."""
    if os.geteuid() != 0:
        return None
    root.mkdir(mode=0o750, parents=True, exist_ok=True)
    status = root.stat()
    return (status.st_uid, status.st_gid) if status.st_uid != 0 else None


def remove_copy(maildir: Path, name: str) -> bool:
    """Removes the copy wherever the reader's client moved it (new/, or cur/ with flags)."""
    removed = False
    for sub in ("new", "cur"):
        folder = maildir / sub
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(folder):
                if entry.name == name or entry.name.startswith(name + ":"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed = True
    return removed


def copy_name(message_id: str, hostname: str) -> str:
    """A Maildir unique name: time, our queue id and a random part, our host name."""
    return f"{int(time.time())}.{message_id}_{secrets.token_hex(4)}.{hostname}"


@dataclass
class Rescuer:
    """The server's rescue pass, every PASS_INTERVAL: copies in, expired copies out, gauges."""

    get_config: Callable[[], Config]
    store: AsyncStore
    health: DestinationHealth
    policy: RecipientPolicy
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self.controls: dict[str, DomainControl] = {}
        self._task: asyncio.Task[None] | None = None
        self._active: dict[str, bool] = {}
        self.passes = 0  # tests wait on it instead of on the clock
        self._copies_left = True  # until the first pass has counted them

    @property
    def root(self) -> Path:
        return Path(self.get_config().rescue.path)

    def is_active(self, settings: DomainConfig, now: float) -> bool:
        control = self.controls.get(settings.name)
        return active(settings, control, self.health.down_since(settings.name), now)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except StorageError as exc:
                log.warning("rescue pass skipped: queue not readable: %s", exc)
            except OSError as exc:
                log.error("rescue pass failed: %s", exc)
            self.passes += 1
            await asyncio.sleep(PASS_INTERVAL)

    def _in_use(self, config: Config) -> bool:
        """Whether a pass has anything to do: a domain with rescue on (by config or by hand),
        copies still to expire, or a domain whose rescue just stopped. A relay that does not
        use rescue mailboxes costs no query every two seconds, whatever its domain count."""
        return (
            self._copies_left
            or any(self._active.values())
            or any(settings.rescue for settings in config.domains)
            or any(control.rescue == "on" for control in self.controls.values())
        )

    async def run_once(self) -> None:
        now = self.clock()
        config = self.get_config()
        if not self._in_use(config):
            return
        await self.store.run(lambda s: s.note_rescued_gone(now))
        for settings in config.domains:
            is_active = self.is_active(settings, now)
            self._announce(settings.name, is_active)
            if is_active:
                await self._copy_waiting(settings)
        await self._remove_expired(config, now)
        counts = await self.store.run(Store.rescue_counts)
        self._copies_left = bool(counts)
        for settings in config.domains:
            if settings.rescue or settings.name in counts or self._active.get(settings.name):
                metrics.rescue_messages.labels(settings.name).set(counts.get(settings.name, 0))
                metrics.rescue_active.labels(settings.name).set(int(self._active[settings.name]))

    def _announce(self, domain: str, is_active: bool) -> None:
        if self._active.get(domain, False) != is_active:
            state = "active: held mail is copied to rescue mailboxes" if is_active else "stopped"
            log.warning("%s: rescue mailboxes %s", domain, state)
        self._active[domain] = is_active

    async def _copy_waiting(self, settings: DomainConfig) -> None:
        candidates = await self.store.run(lambda s: s.rescue_candidates(settings.name))
        hostname = self.get_config().hostname
        copied = 0
        for message_id, address in candidates:
            maildir = maildir_of(self.root, address)
            if maildir is None or not self.policy.exists(address):
                continue  # only people the relay knows exist, at a path that is theirs alone
            content = await self.store.run(functools.partial(Store.body, message_id=message_id))
            if content is None:
                continue  # delivered or deleted since the candidates were read
            name = copy_name(message_id, hostname)
            await asyncio.to_thread(write_copy, self.root, maildir, name, content)
            copy = RescueCopy(message_id, address, settings.name, name)
            save = functools.partial(Store.save_rescue_copy, copy=copy, now=self.clock())
            await self.store.run(save)
            copied += 1
        if copied:
            log.info("%s: %s copied to rescue mailboxes", settings.name, plural(copied, "message"))

    async def _remove_expired(self, config: Config, now: float) -> None:
        """Copies whose original left more than their domain's rescue_keep ago: one query for
        all domains, then the files, then the rows, one log line per domain."""
        gone = await self.store.run(Store.rescue_copies_gone)
        expired: dict[str, list[RescueCopy]] = {}
        for copy, gone_at in gone:
            keep = (config.domain(copy.domain) or DomainConfig(copy.domain)).rescue_keep
            if now - gone_at >= keep:
                expired.setdefault(copy.domain, []).append(copy)
        for domain, copies in expired.items():
            for copy in copies:
                maildir = maildir_of(self.root, copy.address)
                if maildir is not None:
                    await asyncio.to_thread(remove_copy, maildir, copy.file)
            await self.store.run(functools.partial(Store.forget_rescue_copies, copies=copies))
            keep = (config.domain(domain) or DomainConfig(domain)).rescue_keep
            log.info(
                "%s: %s removed from rescue mailboxes (delivered over %s ago)",
                domain,
                plural(len(copies), "copy", "copies"),
                age(keep),
            )


# -- access: Dovecot's passwd-file ----------------------------------------------------------------

SCHEME = "{BLF-CRYPT}"  # bcrypt, which Dovecot 2.3 verifies through crypt(3)


def passwd_path(cfg: Config) -> Path:
    return Path(cfg.rescue.path) / "passwd"


def read_access(path: Path) -> dict[str, str]:
    """address → password hash, from the passwd-file (absent: nobody has access)."""
    entries: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text("utf-8").splitlines():
            user, _, rest = line.partition(":")
            if user and not user.startswith("#"):
                entries[user] = rest.split(":", 1)[0]
    return entries


def write_access(path: Path, entries: dict[str, str]) -> None:
    """The passwd-file, replaced atomically (Dovecot may read it at any moment), mode 0640,
    owned like the rescue tree (run as root, the command gives it to the tree's owner, the user
    Dovecot runs as)."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    owner = _owner(path.parent)
    temporary = path.with_name(path.name + ".new")
    lines = "".join(f"{user}:{secret}::::::\n" for user, secret in sorted(entries.items()))
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        if owner is not None:
            os.fchown(descriptor, *owner)
        os.write(descriptor, lines.encode("utf-8"))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)


def new_password() -> tuple[str, str]:
    """(a generated password to tell the person once, its hash for the passwd-file)."""
    import bcrypt

    password = secrets.token_urlsafe(12)
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
    return password, SCHEME + hashed


# Dovecot's successful IMAP login line, in its own log file or in syslog's mail log:
# "Dec 05 12:08:55 imap-login: Info: Login: user=<bob@example.org>, method=PLAIN, ..."
_LOGIN = re.compile(
    r"^(?P<when>\w{3} [ \d]\d \d\d:\d\d:\d\d)\b.*imap-login: .*Login: user=<(?P<user>[^>]+)>"
)


def last_logins(lines: Iterable[str]) -> dict[str, str]:
    """address → the time of its last successful IMAP login, as Dovecot's log writes it."""
    seen: dict[str, str] = {}
    for line in lines:
        match = _LOGIN.match(line)
        if match is not None:
            seen[match.group("user").lower()] = match.group("when")
    return seen


def count_messages(maildir: Path) -> int:
    total = 0
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError):
            total += sum(1 for entry in os.scandir(maildir / sub) if entry.is_file())
    return total
