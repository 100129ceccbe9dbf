"""Real mail servers as private instances for the interop suite: one loopback address each.

Every server runs from its own directory under a `workdir` (made world-traversable, because
Postfix, Exim, OpenSMTPD and smtp-sink drop privileges to their own users, who cannot enter
pytest's 0700 temporary directories), on a high port, with a config file written here. None of
them is the system instance, none listens on port 25 or on a non-loopback address.

- `SmtpSink`: Postfix's smtp-sink, dumping each transaction to a file (`-d`).
- `PostfixPrimary`: a Postfix instance whose smtpd relays our domains to a pipe that writes
  each message to a file.
- `EximPrimary`: Exim (unpacked by install.sh) delivering to one file per message.
- `OpenSmtpdPrimary`: OpenSMTPD (unpacked by install.sh) delivering to one file per recipient.
  Its spool, helper and socket paths are compiled in, so it runs in a private mount namespace
  where this test's own directories are mounted over them.
- `PostfixSender`: a Postfix instance without listener, fed by `sendmail -C`, that routes
  example.test to a dead primary and falls back to the relay (`smtp_fallback_relay`).
- `Dnsmasq`: MX and A records for the MX routing tests.

What each primary stored is a `Capture`. The primaries all add their own trace header on top
(and OpenSMTPD a Return-Path and Delivered-To before it), and store lines with their own line
ending (Exim: CRLF with `use_crlf`; the others: LF, their queue format). `Capture.delivered`
is what follows the first Received header, and `Capture.expected(body)` writes the bytes the
relay sent with that line ending, so the two compare byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.postfix import SERVICES, PostfixControl, base_settings, smtpd_service

INTEROP_ROOT = Path(os.environ.get("RELAY_INTEROP_ROOT", "/opt/relay-interop"))
EXIM = INTEROP_ROOT / "usr/sbin/exim4"
OPENSMTPD = INTEROP_ROOT / "usr/sbin/smtpd"
OPENSMTPD_LIBEXEC = INTEROP_ROOT / "usr/libexec/opensmtpd"
PRIMARY_HOSTNAME = "primary.test"
START_DEADLINE = 20.0

_TRACE_FIELD = re.compile(rb"^Received:", re.IGNORECASE)


def missing_tools() -> list[str]:
    """The programs of the interop suite that are not installed (tests/interop/install.sh)."""
    wanted = ["postfix", "sendmail", "smtp-sink", "swaks", "dnsmasq", "unshare", "chromium"]
    wanted += ["rspamd", "dovecot"]
    missing = [tool for tool in wanted if shutil.which(tool, path=_PATH) is None]
    missing += [str(path) for path in (EXIM, OPENSMTPD) if not path.exists()]
    return missing


_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def free_port(*addresses: str) -> int:
    """A high port that is free on every one of `addresses` (bound once each, then released)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port: int = probe.getsockname()[1]
        if port < 20000:
            continue
        try:
            for address in addresses[1:]:
                with socket.socket() as other:
                    other.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {addresses}")


def accepts(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


def wait_until(condition: object, what: str, timeout: float = START_DEADLINE) -> None:
    """Polls `condition()` until true; raises TimeoutError naming `what` at the deadline."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def workspace(directory: Path, *, owner: str | None = None, mode: int = 0o755) -> Path:
    """A directory the servers' unprivileged users can reach (and, with `owner`, write)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(mode)
    if owner is not None:
        shutil.chown(directory, owner, owner if owner != "nobody" else "nogroup")
    return directory


# -- what a primary stored --------------------------------------------------------------------


@dataclass(frozen=True)
class Capture:
    """One message as a primary stored it, with the line ending it stores lines with."""

    name: str
    raw: bytes
    newline: bytes
    mail_args: str = ""  # smtp-sink only: the MAIL FROM arguments as received
    rcpt_args: tuple[str, ...] = ()  # smtp-sink only: each RCPT TO's arguments

    @property
    def delivered(self) -> bytes:
        """What follows the first Received header: the bytes the relay sent, as stored."""
        lines = self.raw.split(self.newline)
        for index, line in enumerate(lines):
            if _TRACE_FIELD.match(line):
                end = index + 1
                while end < len(lines) and lines[end][:1] in (b" ", b"\t"):
                    end += 1
                return self.newline.join(lines[end:])
        raise AssertionError(f"{self.name}: no Received header in {self.raw[:300]!r}")

    def expected(self, body: bytes) -> bytes:
        """`body` (CRLF lines, as the relay sends it) written with this primary's line ending."""
        return body.replace(b"\r\n", self.newline)


class Server:
    """A server process with a log file; a context manager that stops it."""

    name = "server"

    def __init__(self, workdir: Path, address: str, port: int) -> None:
        self.workdir = workspace(workdir)
        self.address = address
        self.port = port
        self.log_path = workdir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def hostport(self) -> str:
        return f"{self.address}:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Writes config files and directories; called by start()."""

    def start(self) -> Server:
        self.prepare()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PATH": _PATH},
            )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log()}")
            return accepts(self.address, self.port)

        wait_until(ready, f"{self.name} on {self.hostport}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def captures(self) -> list[Capture]:
        raise NotImplementedError

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.exists() else []


# -- smtp-sink --------------------------------------------------------------------------------


class SmtpSink(Server):
    """Postfix's smtp-sink with `-d`: one dump file per transaction.

    smtp-sink offers SIZE-less ESMTP with PIPELINING, 8BITMIME, DSN and ENHANCEDSTATUSCODES, but
    not SMTPUTF8. `options` are extra smtp-sink flags, e.g. ("-f", "RCPT", "-B", "550 5.1.1 …")
    to refuse every recipient.
    """

    name = "smtp-sink"
    smtputf8 = False

    def __init__(self, workdir: Path, address: str, port: int, options: Sequence[str] = ()) -> None:
        super().__init__(workdir, address, port)
        self.options = tuple(options)
        self.dumps = workdir / "dumps"

    def prepare(self) -> None:
        workspace(self.dumps, owner="nobody")

    def command(self) -> list[str]:
        return [
            "smtp-sink",
            "-v",
            "-u",
            "nobody",
            "-h",
            PRIMARY_HOSTNAME,
            "-d",
            f"{self.dumps}/%Y%m%d%H%M%S.",
            *self.options,
            self.hostport,
            "256",
        ]

    def captures(self) -> list[Capture]:
        found = []
        for path in _files(self.dumps):
            raw = path.read_bytes()
            head, _, _ = raw.partition(b"\nReceived: ")
            fields = [line.decode("utf-8", "replace") for line in head.split(b"\n")]
            mail = [f.partition(": ")[2] for f in fields if f.startswith("X-Mail-Args: ")]
            rcpts = [f.partition(": ")[2] for f in fields if f.startswith("X-Rcpt-Args: ")]
            # The dump format ends every message with one empty line of its own.
            assert raw.endswith(b"\n\n"), f"{path}: incomplete dump"
            found.append(Capture(path.name, raw[:-1], b"\n", mail[0] if mail else "", tuple(rcpts)))
        return found


# -- Postfix ----------------------------------------------------------------------------------


class PostfixInstance(Server):
    """A private Postfix (tests/postfix.py, shared with the benchmarks): its own config, queue
    and data directories and maillog under `workdir`. Subclasses add main.cf settings and
    master.cf services."""

    name = "postfix"
    hostname = "postfix.test"

    def __init__(self, workdir: Path, address: str, port: int) -> None:
        super().__init__(workdir, address, port)
        self.control = PostfixControl(workdir)
        self.config = self.control.config_dir
        self.log_path = self.control.maillog

    def main_cf(self) -> dict[str, str]:
        return {
            **base_settings(self.workdir, self.hostname),
            "meta_directory": "/etc/postfix",
            "mydomain": self.hostname,
            "myorigin": self.hostname,
            "relay_domains": "",
        }

    def master_cf(self) -> str:
        return SERVICES

    def prepare(self) -> None:
        self.control.write(self.main_cf(), self.master_cf())

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.control.run("postfix", *args)

    def start(self) -> PostfixInstance:
        self.prepare()
        self.control.start()
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        wait_until(lambda: self.control.master_pid() is not None, "the Postfix master")

    def master_pid(self) -> int | None:
        return self.control.master_pid()

    def stop(self) -> None:
        self.control.stop()

    def queue_listing(self) -> str:
        return self.control.run("postqueue", "-p", timeout=30).stdout


class PostfixPrimary(PostfixInstance):
    """Postfix as the primary: smtpd on `address:port` relays our domains to a pipe(8) service
    that writes each message, as Postfix queued it, to mail/QUEUE_ID. `refuse` recipients are
    rejected at RCPT with a 5xx (an access(5) REJECT)."""

    name = "postfix"
    hostname = PRIMARY_HOSTNAME
    smtputf8 = True

    def __init__(
        self,
        workdir: Path,
        address: str,
        port: int,
        domains: Sequence[str],
        refuse: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir, address, port)
        self.domains = tuple(domains)
        self.refuse = tuple(refuse)
        self.mail = workdir / "mail"

    def main_cf(self) -> dict[str, str]:
        # inline:{ {key=value with spaces} } (Postfix 3.0 table syntax).
        refused = ", ".join(f"{{{r}=REJECT no such user here}}" for r in self.refuse)
        restrictions = [f"check_recipient_access inline:{{ {refused} }}"] if refused else []
        return {
            **super().main_cf(),
            "relay_domains": ", ".join(self.domains),
            "relay_transport": "capture",
            "smtpd_recipient_restrictions": ", ".join(
                [*restrictions, "permit_auth_destination", "reject"]
            ),
            "smtpd_relay_restrictions": "permit_auth_destination, reject",
            "smtpd_peername_lookup": "no",
            # No header fix-ups for a client on our own interfaces: what arrives is stored.
            "local_header_rewrite_clients": "",
            "smtputf8_enable": "yes",
            "message_size_limit": str(50 * 1024 * 1024),
        }

    def master_cf(self) -> str:
        return (
            SERVICES
            + smtpd_service(self.address, self.port)
            + "capture unix - n n - - pipe user=nobody"
            + f" argv=/usr/bin/dd of={self.mail}/${{queue_id}} status=none\n"
        )

    def prepare(self) -> None:
        super().prepare()
        workspace(self.mail, owner="nobody")

    def wait_ready(self) -> None:
        super().wait_ready()
        wait_until(lambda: accepts(self.address, self.port), f"Postfix smtpd on {self.hostport}")

    def captures(self) -> list[Capture]:
        return [Capture(path.name, path.read_bytes(), b"\n") for path in _files(self.mail)]


class PostfixSender(PostfixInstance):
    """Postfix as the sending MTA: example.test goes to `dead_primary` (where nothing listens),
    and `smtp_fallback_relay` is the relay. Mail comes in with `sendmail -C`."""

    name = "postfix-sender"
    hostname = "sender.test"

    def __init__(
        self, workdir: Path, address: str, dead_primary: str, fallback: str, domain: str
    ) -> None:
        super().__init__(workdir, address, 0)
        self.dead_primary = dead_primary
        self.fallback = fallback
        self.domain = domain

    def main_cf(self) -> dict[str, str]:
        return {
            **super().main_cf(),
            "transport_maps": f"inline:{{ {self.domain}=smtp:{bracketed(self.dead_primary)} }}",
            "smtp_fallback_relay": bracketed(self.fallback),
            "smtp_bind_address": self.address,
            "smtputf8_enable": "yes",
        }

    def sendmail(self, sender: str, recipients: Sequence[str], content: bytes) -> None:
        done = subprocess.run(
            ["sendmail", "-C", str(self.config), "-i", "-f", sender, "--", *recipients],
            input=content,
            capture_output=True,
            timeout=60,
            check=False,
            env={**os.environ, "PATH": _PATH},
        )
        assert done.returncode == 0, done.stderr.decode("utf-8", "replace")


def bracketed(hostport: str) -> str:
    """ "[127.0.0.1]:2525" from "127.0.0.1:2525": Postfix's literal next hop, no MX lookup."""
    host, _, port = hostport.rpartition(":")
    return f"[{host}]:{port}"


# -- Exim -------------------------------------------------------------------------------------


class EximPrimary(Server):
    """Exim (`exim4 -C FILE -bdf`): accepts `domains`, refuses `refuse` at RCPT with 550, and
    writes each message once (batched over its recipients) to mail/MESSAGE_ID with CRLF line
    endings and nothing added but its Received header."""

    name = "exim"
    smtputf8 = True

    def __init__(
        self,
        workdir: Path,
        address: str,
        port: int,
        domains: Sequence[str],
        refuse: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir, address, port)
        self.domains = tuple(domains)
        self.refuse = tuple(refuse)
        self.mail = workdir / "mail"
        self.config = workdir / "exim.conf"

    def prepare(self) -> None:
        for name in ("spool", "log", "mail"):
            workspace(self.workdir / name, owner="Debian-exim", mode=0o750)
        self.mail.chmod(0o755)
        refused = " : ".join(self.refuse) or "!*"
        self.config.write_text(
            textwrap.dedent(f"""\
            exim_path = {EXIM}
            spool_directory = {self.workdir}/spool
            log_file_path = {self.workdir}/log/%slog
            pid_file_path = {self.workdir}/exim.pid
            primary_hostname = {PRIMARY_HOSTNAME}
            daemon_smtp_ports = {self.port}
            local_interfaces = {self.address}
            disable_ipv6 = true
            domainlist relay_to = {" : ".join(self.domains)}
            acl_smtp_rcpt = acl_rcpt
            smtputf8_advertise_hosts = *
            dsn_advertise_hosts = *
            pipelining_advertise_hosts = *
            chunking_advertise_hosts =
            tls_advertise_hosts =
            host_lookup =
            rfc1413_hosts =
            message_size_limit = 50M
            keep_environment =
            begin acl
            acl_rcpt:
              deny recipients = {refused}
                   message = 5.1.1 no such user here
              accept domains = +relay_to
              deny message = 5.7.1 relaying denied
            begin routers
            capture:
              driver = accept
              domains = +relay_to
              transport = capture_file
            begin transports
            capture_file:
              driver = appendfile
              file = {self.mail}/${{message_exim_id}}
              batch_max = 100
              user = Debian-exim
              use_crlf = true
              message_prefix =
              message_suffix =
              check_string =
              escape_string =
              mode = 0644
              use_lockfile = false
            """)
        )

    def command(self) -> list[str]:
        return [str(EXIM), "-C", str(self.config), "-bdf", "-q5s"]

    def log(self) -> str:
        main = self.workdir / "log" / "mainlog"
        return super().log() + (main.read_text("utf-8", "replace") if main.exists() else "")

    def captures(self) -> list[Capture]:
        return [Capture(path.name, path.read_bytes(), b"\r\n") for path in _files(self.mail)]


# -- OpenSMTPD --------------------------------------------------------------------------------


class OpenSmtpdPrimary(Server):
    """OpenSMTPD (`smtpd -d -f FILE`) in a private mount namespace: this test's spool over
    /var/spool/smtpd, the unpacked helpers over /usr/libexec/opensmtpd, a fresh /run for its
    control socket. Accepts `domains` for a virtual user, refuses `refuse` at RCPT, and writes
    each recipient's copy to mail/RECIPIENT (LF line endings, with Return-Path, Delivered-To and
    its Received header on top). It offers no SMTPUTF8."""

    name = "opensmtpd"
    smtputf8 = False

    def __init__(
        self,
        workdir: Path,
        address: str,
        port: int,
        domains: Sequence[str],
        refuse: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir, address, port)
        self.domains = tuple(domains)
        self.refuse = tuple(refuse)
        self.mail = workdir / "mail"
        self.config = workdir / "smtpd.conf"

    def prepare(self) -> None:
        workspace(self.workdir / "spool", mode=0o711)  # smtpd insists on exactly 711
        workspace(self.mail, mode=0o1777)
        domains = ", ".join(f'"{d}"' for d in self.domains)
        lines = [
            'table vusers { "@" = "nobody" }',
            f"listen on {self.address} port {self.port} hostname {PRIMARY_HOSTNAME}",
            f'action "capture" mda "cat > {self.mail}/%{{rcpt}}" virtual <vusers>',
        ]
        if self.refuse:
            refused = ", ".join(f'"{r}"' for r in self.refuse)
            lines.append(
                f"match from any for domain {{ {domains} }} rcpt-to {{ {refused} }} reject"
            )
        lines.append(f'match from any for domain {{ {domains} }} action "capture"')
        self.config.write_text("\n".join(lines) + "\n")
        self.config.chmod(0o644)
        checked = subprocess.run(
            [str(OPENSMTPD), "-n", "-f", str(self.config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if checked.returncode != 0:
            raise RuntimeError(f"bad smtpd.conf: {checked.stderr}{checked.stdout}")

    def command(self) -> list[str]:
        script = " && ".join(
            [
                "mount --make-rprivate /",
                f"mount --bind {self.workdir}/spool /var/spool/smtpd",
                f"mount --bind {OPENSMTPD_LIBEXEC} /usr/libexec/opensmtpd",
                "mount -t tmpfs tmpfs /run",
                f"exec {OPENSMTPD} -d -f {self.config}",
            ]
        )
        return ["unshare", "--mount", "sh", "-c", script]

    def captures(self) -> list[Capture]:
        return [Capture(path.name, path.read_bytes(), b"\n") for path in _files(self.mail)]


# -- Dovecot ------------------------------------------------------------------------------------

SHIPPED_DOVECOT_CONF = Path(__file__).resolve().parents[2] / "deploy" / "dovecot" / "dovecot.conf"


class DovecotImap(Server):
    """Dovecot (`dovecot -F -c FILE`) with the shipped deploy/dovecot/dovecot.conf, only its
    machine-specific values changed: the rescue tree, the user (nobody: Dovecot will not serve
    mail as root, and the relay under test runs as root), the ports, the certificate, the log
    file, and private run and state directories."""

    name = "dovecot"

    def __init__(
        self, workdir: Path, address: str, port: int, rescue: Path, cert: Path, key: Path
    ) -> None:
        super().__init__(workdir, address, port)
        self.rescue = rescue
        self.cert, self.key = cert, key
        self.config = workdir / "dovecot.conf"
        self.log_path = workdir / "dovecot.log"

    def prepare(self) -> None:
        for name in ("run", "state"):
            workspace(self.workdir / name)
        changes = {
            "/var/lib/relay/rescue": str(self.rescue),
            "uid=relay gid=relay": "uid=nobody gid=nogroup",
            "mail_uid = relay": "mail_uid = nobody",
            "mail_gid = relay": "mail_gid = nogroup",
            "default_internal_user = relay": "default_internal_user = nobody",
            "listen = *, ::": f"listen = {self.address}",
            "port = 143": f"port = {self.port}",
            "port = 993": "port = 0",
            "</etc/relay/tls/cert.pem": f"<{self.cert}",
            "</etc/relay/tls/key.pem": f"<{self.key}",
            "log_path = syslog": f"log_path = {self.log_path}",
        }
        text = SHIPPED_DOVECOT_CONF.read_text()
        for shipped, here in changes.items():
            assert shipped in text, f"deploy/dovecot/dovecot.conf no longer says {shipped!r}"
            text = text.replace(shipped, here)
        text += f"base_dir = {self.workdir / 'run'}\nstate_dir = {self.workdir / 'state'}\n"
        self.config.write_text(text)

    def command(self) -> list[str]:
        return ["dovecot", "-F", "-c", str(self.config)]


# -- DNS --------------------------------------------------------------------------------------


class Dnsmasq(Server):
    """dnsmasq answering only from the records given (`--no-resolv --no-hosts`), on
    127.0.0.1:port (`--bind-interfaces`: nothing else). `mx` is [(domain, host, preference)],
    `hosts` is {host: address}; names under `local` that have no record are NODATA/NXDOMAIN
    rather than REFUSED."""

    name = "dnsmasq"

    def __init__(
        self,
        workdir: Path,
        port: int,
        mx: Sequence[tuple[str, str, int]],
        hosts: dict[str, str],
        local: str,
    ) -> None:
        super().__init__(workdir, "127.0.0.1", port)
        self.mx = tuple(mx)
        self.hosts = dict(hosts)
        self.local = local

    def command(self) -> list[str]:
        return [
            "dnsmasq",
            "-k",
            "--conf-file=/dev/null",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--pid-file=",
            "--user=nobody",
            "--group=nogroup",
            "--log-queries",
            "--log-facility=-",
            f"--local=/{self.local}/",
            *(f"--mx-host={domain},{host},{pref}" for domain, host, pref in self.mx),
            *(f"--host-record={host},{address}" for host, address in self.hosts.items()),
        ]

    def wait_ready(self) -> None:
        wait_until(lambda: b"started" in self.log_path.read_bytes(), "dnsmasq to start")

    def queries(self) -> list[str]:
        return [line for line in self.log().splitlines() if "query[" in line]


@contextlib.contextmanager
def running(*servers: Server) -> Iterator[None]:
    """Starts the servers in order and stops all of them, whatever happens."""
    started: list[Server] = []
    try:
        for server in servers:
            server.start()
            started.append(server)
        yield
    finally:
        for server in reversed(started):
            server.stop()
