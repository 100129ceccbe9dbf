"""A private Postfix instance: the one harness the interop suite and the benchmarks share.

Its own config_directory, queue_directory and data_directory under a work directory, logging to
a file through postlogd, no chroot, loopback only, no DNS: never the system instance, never
port 25. Callers add the main.cf settings of their role (a primary that captures mail, a sender
that falls back to the relay, a benchmark peer relaying to a sink) on top of `base_settings`
and, when it should listen, an smtpd line on top of `SERVICES`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])

# master.cf without a listener: every service a relaying instance uses, none chrooted.
SERVICES = """\
pickup     unix  n - n 60   1 pickup
cleanup    unix  n - n -    0 cleanup
qmgr       unix  n - n 300  1 qmgr
rewrite    unix  - - n -    - trivial-rewrite
bounce     unix  - - n -    0 bounce
defer      unix  - - n -    0 bounce
trace      unix  - - n -    0 bounce
verify     unix  - - n -    1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -    - proxymap
proxywrite unix  - - n -    1 proxymap
smtp       unix  - - n -    - smtp
relay      unix  - - n -    - smtp
showq      unix  n - n -    - showq
error      unix  - - n -    - error
retry      unix  - - n -    - error
discard    unix  - - n -    - discard
anvil      unix  - - n -    1 anvil
scache     unix  - - n -    1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


def smtpd_service(address: str, port: int) -> str:
    """The master.cf line of an smtpd listening on one loopback address and port."""
    return f"{address}:{port} inet n - n - - smtpd\n"


def base_settings(directory: Path, hostname: str) -> dict[str, str]:
    """main.cf settings every private instance needs; durability is left as Postfix ships it."""
    return {
        "compatibility_level": "3.6",
        "queue_directory": str(directory / "queue"),
        "data_directory": str(directory / "data"),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": hostname,
        "mydestination": "",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "smtp_dns_support_level": "disabled",
        "alias_maps": "",
        "alias_database": "",
        "biff": "no",
        "maillog_file": str(directory / "maillog"),
        "maillog_file_prefixes": str(directory),
    }


class PostfixControl:
    """Writes an instance's config under `directory` and drives it with postfix(1) -c."""

    def __init__(
        self,
        directory: Path,
        *,
        note: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.directory = directory
        self.config_dir = directory / "config"
        self.queue_dir = directory / "queue"
        self.data_dir = directory / "data"
        self.maillog = directory / "maillog"
        self._note = note  # the benchmark's reaper records every command it runs

    def write(self, settings: dict[str, str], services: str) -> None:
        """main.cf and master.cf; the directories with the owners Postfix's daemons need."""
        for path in (self.config_dir, self.queue_dir, self.data_dir):
            path.mkdir(parents=True, exist_ok=True)
        # The daemons run as the postfix user: they must reach the queue and own data_directory.
        self.directory.chmod(0o755)
        self.data_dir.chmod(0o700)
        os.chown(self.data_dir, _uid("postfix"), -1)
        text = "".join(f"{key} = {value}\n" for key, value in settings.items())
        (self.config_dir / "main.cf").write_text(text)
        (self.config_dir / "master.cf").write_text(services)

    def run(
        self, program: str, *args: str, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """postfix, postqueue, postsuper… with `-c` this instance's config directory."""
        argv = [program, "-c", str(self.config_dir), *args]
        if self._note is not None:
            self._note(argv)
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "PATH": PATH},
        )

    def start(self) -> None:
        started = self.run("postfix", "start")
        if started.returncode != 0:
            raise RuntimeError(f"postfix start failed: {started.stderr}\n{self.log_tail()}")

    def master_pid(self) -> int | None:
        """The master's process id while it runs, else None."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def stop(self) -> None:
        """`postfix stop`; if the master outlives it, `postfix abort`, then SIGKILL by its pid."""
        pid = self.master_pid()
        if pid is None:
            return
        for command, patience in (("stop", 20.0), ("abort", 10.0)):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.run("postfix", command)
            if _exits(pid, patience):
                return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no maillog)"


def _exits(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid
