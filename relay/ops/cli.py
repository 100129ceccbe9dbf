"""The `relay` command: presentation only. Library errors become one clean line and an exit code.

Exit codes: 0 success; 1 an operation failed (unknown queue id, queue unreadable); 2 bad usage or
an invalid configuration (click's own convention for usage errors).
"""

from __future__ import annotations

import os
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from relay import config as config_module
from relay.authresults import AuthResults
from relay.config import Config, ConfigError, DomainConfig, parse_hostport
from relay.envelope import domain_of, split
from relay.ops.status import status_report
from relay.smtp import arc as arc_keys
from relay.store import (
    HELD,
    Actor,
    Attempt,
    ListingRow,
    MessageRow,
    Operated,
    Selection,
    StorageError,
    Store,
    UnknownMessage,
    address_key,
)
from relay.store.files import unsafe_queue_files
from relay.tls import TLS_MODES
from relay.words import age, json_text, plural, printable_lines, rfc3339, summarize

T = TypeVar("T")

CONFIG_HELP = "Configuration file (TOML). Default: $RELAY_CONFIG, else /etc/relay/relay.toml."
DEFAULT_CONFIG = "/etc/relay/relay.toml"
ALLOW_ROOT_ENV = "RELAY_ALLOW_ROOT"


def echo(text: str, err: bool = False) -> None:
    """Every line the CLI prints: addresses, HELO names and replies come from strangers, and a
    control character among them would act on the operator's terminal (words.printable)."""
    click.echo(printable_lines(text), err=err)


def _fail(message: str, code: int = 1) -> NoReturn:
    echo(f"relay: {message}", err=True)
    sys.exit(code)


def _load_config(path: str | None) -> tuple[Config, str]:
    chosen = path or config_module.default_path() or DEFAULT_CONFIG
    try:
        return config_module.load(chosen), chosen
    except ConfigError as exc:
        for problem in exc.problems:
            echo(problem, err=True)
        sys.exit(2)


config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None, help=CONFIG_HELP
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="relay", prog_name="relay")
def main() -> None:
    """relay: a backup MX that stores mail for your domains and redelivers it to the primary."""


@main.command()
@config_option
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Log line format (overrides log.format).",
)
@click.option(
    "--allow-root",
    is_flag=True,
    help=f"Run even as root (or {ALLOW_ROOT_ENV}=1 in the environment): for CI only.",
)
def serve(config_path: str | None, log_format: str | None, allow_root: bool) -> None:
    """Run the relay: accept mail for the configured domains and redeliver it."""
    from relay import service
    from relay.ops import logs

    cfg, chosen = _load_config(config_path)
    if root_refused(os.geteuid(), allow_root, os.environ.get(ALLOW_ROOT_ENV, "")):
        _fail(
            "cannot start: refusing to run as root; run as an unprivileged user (the systemd"
            f" unit has User=relay), or pass --allow-root (or set {ALLOW_ROOT_ENV}=1)"
        )
    if unsafe := unsafe_queue_files(cfg.queue.path, os.geteuid()):
        for found in unsafe:
            echo(f"relay: cannot start: {found.message}; fix: {found.fix}", err=True)
        sys.exit(1)
    logs.setup_logging(log_format or cfg.log.format)
    try:
        service.run(service.serve(cfg, chosen))
    except StorageError as exc:
        _fail(f"cannot start: {exc}")
    except OSError as exc:
        _fail(f"cannot start: {exc.strerror or exc}")


def root_refused(euid: int, allow_root: bool, env_value: str) -> bool:
    """A mail server parses hostile input all day: as root, one bug would own the machine.

    Port 25 needs no root: systemd grants CAP_NET_BIND_SERVICE (deploy/systemd/relay.service).
    """
    return euid == 0 and not allow_root and env_value.strip() in ("", "0")


@main.command("check-config")
@config_option
@click.option("--verbose", "-v", is_flag=True, help="List every configured domain, not a summary.")
def check_config(config_path: str | None, verbose: bool) -> None:
    """Validate a configuration file: exit 0, or 2 with one line per problem."""
    cfg, chosen = _load_config(config_path)
    names = [d.name for d in cfg.domains]
    domains = (
        f"{plural(len(names), 'domain')}: {', '.join(names)}"
        if verbose
        else summarize(names, "domain")
    )
    echo(f"{chosen}: ok (hostname {cfg.hostname}; {domains})")


def _open_store(config_path: str | None, cfg: Config | None = None) -> Store:
    if cfg is None:
        cfg, _ = _load_config(config_path)
    if not os.path.exists(cfg.queue.path):
        # Never "Mail queue is empty": a wrong --config or queue.path would then hide a full
        # queue from the operator. Nor create it: a queue owned by whoever ran the command (root,
        # typically) is one the server's own user then cannot open.
        _fail(
            f"queue {cfg.queue.path} does not exist: the server creates it when it first starts"
            " (is this the server's configuration?)"
        )
    try:
        return Store(cfg.queue.path)
    except StorageError as exc:
        _fail(str(exc))


def _with_store(
    config_path: str | None, action: Callable[[Store], T], cfg: Config | None = None
) -> T:
    """Runs `action` on the queue; pass `cfg` when it is loaded already: loading is not free."""
    store = _open_store(config_path, cfg)
    try:
        return action(store)
    except UnknownMessage as exc:
        _fail(f"no such message in the queue: {', '.join(exc.ids)}")
    except StorageError as exc:
        _fail(f"queue error: {exc}")
    finally:
        store.close()


def message_json(row: MessageRow) -> dict[str, Any]:
    """The `relay queue --json` object (a contract: keep the field names).

    A held message has no next attempt: it waits for `relay queue release`, not for a time.
    """
    waiting = row.state != HELD
    return {
        "id": row.id,
        "sender": row.sender,
        "recipients": [
            {
                "address": r.address,
                "state": r.state,
                "attempts": r.attempts,
                "last_reply": r.last_reply,
                "next_attempt_at": (
                    rfc3339(r.next_attempt_at) if r.state == "queued" and waiting else None
                ),
                "notify": r.notify,
                "orcpt": r.orcpt,
                "hold_reason": r.hold_reason,
            }
            for r in row.recipients
        ],
        "size": row.size,
        "received_at": rfc3339(row.received_at),
        "state": row.state,
        "attempts": row.attempt_count,
        "next_attempt_at": rfc3339(row.next_attempt_at) if waiting else None,
        "last_error": row.last_error,
    }


def _listing(rows: Sequence[ListingRow], now: float) -> str:
    """A `mailq`-like listing: '!' marks a held message, as in Postfix.

    Built from Store.listing's plain rows, one per recipient: the listing of a queue of
    100,000 messages takes well under a second of formatting. Ages repeat (two units at most),
    so each is formatted once.
    """
    if not rows:
        return "Mail queue is empty"
    lines = [f"{'-Queue ID-':<20} {'-Age-':>6} {'-Size-':>9}  -Sender/Recipient-"]
    add = lines.append
    ages: dict[int, str] = {}
    indent, reply_indent = " " * 39, " " * 41
    messages = count = total = held = 0
    current = None
    is_held = False
    for (
        message_id,
        sender,
        size,
        received_at,
        state,
        address,
        r_state,
        attempts,
        reply,
        due,
        hold_reason,
    ) in rows:
        if message_id != current:
            if current is not None:
                add("")
            current = message_id
            messages += 1
            is_held = state == HELD
            held += is_held
            total += size
            seconds = int(now - received_at)
            shown = ages.get(seconds) or ages.setdefault(seconds, age(seconds))
            add(
                f"{message_id + ('!' if is_held else ' '):<20} {shown:>6} {size:>9}"
                f"  {sender or '<>'}"
            )
        if address is None:
            continue
        count += 1
        tried = plural(attempts, "attempt")
        if hold_reason:
            add(f"{indent}{address}  (held: {hold_reason}, {tried})")
        elif r_state == "queued" and not is_held and attempts:
            seconds = int(due - now)
            wait = ages.get(seconds) or ages.setdefault(seconds, age(seconds))
            add(f"{indent}{address}  ({r_state}, {tried}, next in {wait})")
        else:
            add(f"{indent}{address}  ({r_state}, {tried})")
        if reply and r_state != "delivered":
            add(reply_indent + reply)
    add("")
    kbytes = (total + 1023) // 1024
    held_text = f" ({held} held)" if held else ""
    add(
        f"-- {kbytes} Kbytes in {plural(messages, 'message')}{held_text},"
        f" {plural(count, 'recipient')}."
    )
    return "\n".join(lines)


@main.group(invoke_without_command=True)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a listing.")
@click.pass_context
def queue(ctx: click.Context, config_path: str | None, as_json: bool) -> None:
    """List the queue like `mailq`, or manage it with a subcommand.

    Works on the queue database whether the server runs or not; a running server picks up
    changes within two seconds.
    """
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    if ctx.invoked_subcommand is not None:
        return
    if as_json:
        rows = _with_store(config_path, lambda store: store.list_messages())
        echo(json_text([message_json(r) for r in rows], indent=2))
    else:
        echo(_listing(_with_store(config_path, lambda store: store.listing()), time.time()))


def _queue_config(ctx: click.Context, config_path: str | None) -> str | None:
    return config_path or ctx.obj.get("config_path")


@queue.command()
@click.argument("message_id")
@click.option("--body", is_flag=True, help="Also print the message as stored (like postcat -b).")
@config_option
@click.pass_context
def show(ctx: click.Context, message_id: str, body: bool, config_path: str | None) -> None:
    """Show one message: envelope, per-recipient state, every attempt (like `postcat`)."""

    def read(store: Store) -> tuple[MessageRow, bytes | None]:
        row = store.get(message_id)
        if row is None:
            raise UnknownMessage([message_id])
        return row, store.body(message_id) if body else None

    row, data = _with_store(_queue_config(ctx, config_path), read)
    out = [
        f"id: {row.id}",
        f"state: {row.state}",
        f"sender: <{row.sender}>",
        f"size: {row.size}",
        f"received_at: {rfc3339(row.received_at)}",
        f"client: [{row.client_ip}] helo={row.helo}",
        f"smtputf8: {'yes' if row.smtputf8 else 'no'}",
        f"body: {'8BITMIME' if row.eightbit else '7BIT'}",
    ]
    if row.envid or row.ret:
        out.append(f"dsn: envid={row.envid or '-'} ret={row.ret or '-'}")
    results = AuthResults.from_json(row.auth)
    out.append(f"auth: {results.summary() if results is not None else 'not checked'}")
    out.append("recipients:")
    for r in row.recipients:
        extra = "".join(f" {k}={v}" for k, v in (("notify", r.notify), ("orcpt", r.orcpt)) if v)
        out.append(f"  <{r.address}> {r.state}, attempts={r.attempts}{extra}")
        if r.state == "queued" and r.hold_reason:
            # Such a recipient waits until queue.lifetime: then queue.on_expiry applies.
            out.append(
                f"    held: {r.hold_reason} (relay queue bounce, delete or release;"
                f" queue.on_expiry at {rfc3339(r.next_attempt_at)})"
            )
        elif r.state == "queued":
            out.append(f"    next attempt: {rfc3339(r.next_attempt_at)}")
        if r.last_reply:
            out.append(f"    last reply: {r.last_reply}")
    out.append("attempts:")
    out += [f"  {rfc3339(a.at)} <{a.address}> {attempt_path(a)}: {a.reply}" for a in row.attempts]
    if not row.attempts:
        out.append("  (none yet)")
    echo("\n".join(out))
    if data is not None:
        echo("-" * 20 + " message " + "-" * 20)
        if sys.stdout.isatty():  # read by a person: a header from anyone may carry ESC too
            echo(data.decode("utf-8", "surrogateescape").replace("\r\n", "\n").removesuffix("\n"))
            return
        sys.stdout.flush()  # piped (`> message.eml`): the bytes exactly as stored, like postcat
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


def actor() -> Actor:
    """Who is running this command, for the audit trail: the uid, its name, and the sudo user."""
    uid = os.getuid()
    try:
        import pwd

        user = pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        user = str(uid)
    sudo_user = os.environ.get("SUDO_USER")
    return Actor(uid, f"{user} (sudo from {sudo_user})" if sudo_user else user)


def _older_than(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return config_module.parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _selection(
    domain: str | None,
    sender: str | None,
    recipient: str | None,
    older_than: float | None,
    everything: bool,
) -> Selection:
    if sender is not None and sender.strip() in ("<>", ""):
        sender = ""
    return Selection(
        domain=domain.lower().rstrip(".") if domain else None,
        sender=sender.strip("<>") if sender else sender,
        recipient=recipient.strip("<>") if recipient else None,
        received_before=None if older_than is None else time.time() - older_than,
        everything=everything,
    )


_SELECTION_HINT = "name queue ids, or select with --domain, --from, --to, --older-than or --all"


def _report(operated: Operated, verb: str, listed: bool) -> None:
    """One line per id the operator named (or a count for a selection), each failure on stderr.

    Exit 1 if any named id was not found, like postsuper: the others were still acted on.
    """
    if listed:
        for message_id in operated.done:
            echo(f"{message_id}: {verb}")
    else:
        phrase = "bounce requested for" if verb == "bounce requested" else verb
        echo(f"{phrase} {plural(len(operated.done), 'message')}")
    for message_id in operated.skipped:
        echo(f"{message_id}: held, not {verb} (release it first)")
    for message_id in operated.missing:
        echo(f"relay: {message_id}: no such message in the queue", err=True)
    if operated.missing:
        sys.exit(1)


def attempt_path(attempt: Attempt) -> str:
    """Where an attempt went: `via` the host that answered, or what happened instead."""
    if attempt.host:
        return f"via {attempt.host}"
    reply = attempt.reply
    if "delivery temporarily suspended" in reply:
        return "not tried (destination down, probing)"
    if reply.startswith("550 5.0.0 Message bounced by the postmaster"):
        return "not tried (bounced by the operator)"
    if "gave up: message too old" in reply or reply.startswith("451 4.4.7"):
        return "not tried (queue.lifetime reached)"
    if reply[4:9] in ("5.1.2", "4.4.3"):
        return "no route"
    if "refused" in reply:
        return "connection refused"
    return "no connection"


_SELECTION_OPTIONS = (
    click.argument("message_ids", nargs=-1),
    click.option("--domain", help="Messages with a recipient waiting in this domain."),
    click.option("--from", "sender", help="Messages from this sender (<> for bounces)."),
    click.option("--to", "recipient", help="Messages with this recipient waiting."),
    click.option(
        "--older-than",
        callback=_older_than,
        help="Messages received longer ago than this (30m, 4h, 2d).",
    ),
    click.option("--all", "everything", is_flag=True, help="Every message in the queue."),
)


def selection_options(command: Callable[..., None]) -> Callable[..., None]:
    """The ways every queue command picks messages: ids, --domain, --from, --to, --older-than,
    --all (like postsuper's and postqueue's selections)."""
    for option in reversed(_SELECTION_OPTIONS):
        command = option(command)
    return command


def _chosen(
    message_ids: tuple[str, ...],
    domain: str | None,
    sender: str | None,
    recipient: str | None,
    older_than: float | None,
    everything: bool,
    required: bool = True,
) -> Selection:
    """The selection the options make; a usage error (exit 2) when they contradict or, with
    `required`, select nothing."""
    selection = _selection(domain, sender, recipient, older_than, everything)
    criteria = not Selection(
        domain=domain, sender=sender, recipient=recipient, received_before=older_than
    ).empty
    if everything and (criteria or message_ids):
        raise click.UsageError("--all selects every message: give it alone")
    if selection.empty and not message_ids and required:
        raise click.UsageError(f"nothing selected: {_SELECTION_HINT}")
    return selection


def _operator_command(
    name: str, help_text: str, action: Callable[..., Operated], verb: str
) -> None:
    @queue.command(name=name, help=help_text)
    @selection_options
    @config_option
    @click.pass_context
    def command(
        ctx: click.Context,
        message_ids: tuple[str, ...],
        domain: str | None,
        sender: str | None,
        recipient: str | None,
        older_than: float | None,
        everything: bool,
        config_path: str | None,
    ) -> None:
        selection = _chosen(
            message_ids, domain, sender, recipient, older_than, everything, name != "flush"
        )
        operated = _with_store(
            _queue_config(ctx, config_path),
            lambda store: action(store, list(message_ids), selection, actor()),
        )
        _report(operated, verb, listed=bool(message_ids) and selection.empty)


_OPERATOR_COMMANDS: tuple[tuple[str, str, Callable[..., Operated], str], ...] = (
    (
        "hold",
        "Put messages on hold: kept, never delivered (like `postsuper -h`).",
        Store.hold,
        "held",
    ),
    (
        "release",
        "Release held messages and make them due now (like `postsuper -H`).",
        Store.release,
        "released",
    ),
    (
        "delete",
        "Delete messages from the queue, without a bounce (like `postsuper -d`).",
        Store.delete,
        "deleted",
    ),
    (
        "flush",
        "Make queued mail due now: all of it, or the selected (like `postqueue -f`/`-i`/`-s`).",
        Store.flush,
        "flushed",
    ),
    (
        "bounce",
        "Fail the remaining recipients of messages; their senders get a DSN.",
        Store.request_bounce,
        "bounce requested",
    ),
)
for _name, _help, _action, _verb in _OPERATOR_COMMANDS:
    _operator_command(_name, _help, _action, _verb)


@queue.command()
@selection_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["eml", "mbox"]),
    default="eml",
    show_default=True,
    help="One .eml file per message (bytes as stored), or one mbox (mboxrd).",
)
@click.option(
    "--output",
    "-o",
    default="-",
    show_default=True,
    help="A directory for .eml files, a file for the mbox, or - for standard output.",
)
@click.option("--force", is_flag=True, help="Overwrite files that exist.")
@config_option
@click.pass_context
def export(
    ctx: click.Context,
    message_ids: tuple[str, ...],
    domain: str | None,
    sender: str | None,
    recipient: str | None,
    older_than: float | None,
    everything: bool,
    fmt: str,
    output: str,
    force: bool,
    config_path: str | None,
) -> None:
    """Copy held mail out of the queue, read-only: the stored bytes, our Received header on top.

    For a person who needs a message now, or to load a domain's held mail into another mail
    system. Selections are those of the other queue commands. The queue is not changed.
    """
    from relay.ops import export as exporting

    selection = _chosen(message_ids, domain, sender, recipient, older_than, everything)
    if fmt == "eml" and output == "-" and (len(message_ids) != 1 or not selection.empty):
        raise click.UsageError("--format eml to standard output takes exactly one queue id")

    def read(store: Store) -> tuple[list[tuple[str, str, float, bytes]], list[str]]:
        found, missing = store.chosen(list(message_ids), selection)
        messages = []
        for message_id in found:
            row, content = store.get(message_id), store.body(message_id)
            if row is not None and content is not None:
                messages.append((message_id, row.sender, row.received_at, content))
        return messages, missing

    messages, missing = _with_store(_queue_config(ctx, config_path), read)
    for message_id in missing:
        echo(f"relay: {message_id}: no such message in the queue", err=True)
    if not messages:
        _fail("no message selected" if not missing else "nothing exported")
    if fmt == "mbox":
        entries = [(s, at, content) for _, s, at, content in messages]
        if output == "-":
            exporting.write_mbox(sys.stdout.buffer, entries)
        else:
            if os.path.exists(output) and not force:
                _fail(f"{output} exists: add --force to overwrite it")
            with open(output, "wb") as out:
                exporting.write_mbox(out, entries)
            echo(f"exported {plural(len(entries), 'message')} to {output}", err=True)
    elif output == "-":
        sys.stdout.buffer.write(messages[0][3])
        sys.stdout.buffer.flush()
    else:
        directory = Path(output)
        if not directory.is_dir():
            _fail(f"{output} is not a directory (--format eml writes one file per message)", 2)
        paths = [exporting.eml_path(directory, m[0]) for m in messages]
        existing = [str(path) for path in paths if path.exists()]
        if existing and not force:
            _fail(f"{summarize(existing, 'file')} exist already: add --force to overwrite them")
        for path, (_, _, _, content) in zip(paths, messages, strict=True):
            exporting.write_eml(path, content)
        echo(f"exported {plural(len(paths), 'message')} to {output}")
    if missing:
        sys.exit(1)


# -- relay recipients ---------------------------------------------------------------------------


@main.group()
def recipients() -> None:
    """The mailboxes the relay knows exist (verify = "callout"): import, list, forget.

    Installed during an outage, a callout relay knows nobody and tempfails every recipient;
    `relay recipients import` gives it the list the primary cannot. Entries live where callout
    answers do, and count down their TTL only while the primary can be asked.
    """


def _parse_import(lines: Sequence[str], cfg: Config) -> tuple[list[str], list[str]]:
    """(addresses to import, one problem per refused line)."""
    good: list[str] = []
    problems: list[str] = []
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip().strip("<>")
        if not line:
            continue
        local, domain = split(line)
        settings = cfg.domain(domain_of(line)) if domain else None
        if not local or not domain or any(c.isspace() for c in line):
            problems.append(f"line {number}: {raw.strip()!r} is not an address (local@domain)")
        elif settings is None:
            problems.append(f"line {number}: {line}: {domain} is not a configured domain")
        elif settings.verify != "callout":
            problems.append(
                f'line {number}: {line}: {settings.name} does not use verify = "callout"'
                " (list its mailboxes in recipients or recipients_file instead)"
            )
        else:
            good.append(address_key(line))
    return list(dict.fromkeys(good)), problems


@recipients.command("import")
@click.argument("source", type=click.File("r", encoding="utf-8"))
@config_option
def recipients_import(source: Any, config_path: str | None) -> None:
    """Remember addresses as existing mailboxes: one per line from FILE, or - for stdin.

    Lines may carry # comments. A line that is not an address of a configured callout domain is
    named on stderr and skipped; the exit code is then 1.
    """
    cfg, _ = _load_config(config_path)
    addresses, problems = _parse_import(source.read().splitlines(), cfg)
    now = time.time()

    def remember(store: Store) -> None:
        store.save_verdicts([(address, True, now) for address in addresses])
        if addresses:
            store.audit("import", addresses, actor())

    _with_store(config_path, lambda store: store.transaction(remember), cfg)
    echo(f"imported {plural(len(addresses), 'address')}")
    for problem in problems:
        echo(f"relay: {problem}", err=True)
    if problems:
        sys.exit(1)


@recipients.command("list")
@click.option("--domain", help="Only this domain's addresses.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@config_option
def recipients_list(domain: str | None, as_json: bool, config_path: str | None) -> None:
    """Every remembered address: exists or refused, and when the primary (or an import) said so."""
    rows = _with_store(config_path, lambda store: store.verdicts())
    if domain:
        suffix = "@" + domain.lower().rstrip(".")
        rows = [r for r in rows if r[0].endswith(suffix)]
    rows.sort()
    if as_json:
        listing = [{"address": a, "exists": ok, "checked_at": rfc3339(at)} for a, ok, at in rows]
        echo(json_text(listing, indent=2))
        return
    for address, accepted, at in rows:
        echo(f"{address}  {'exists' if accepted else 'refused'}  {rfc3339(at)}")
    echo(f"-- {plural(len(rows), 'address')}")


@recipients.command("forget")
@click.argument("addresses", nargs=-1, required=True)
@config_option
def recipients_forget(addresses: tuple[str, ...], config_path: str | None) -> None:
    """Drop what is remembered of ADDRESSES: the next RCPT asks the primary again."""

    def forget(store: Store) -> list[str]:
        known = store.forget_addresses(addresses)
        if known:
            store.audit("forget", known, actor())
        return known

    known = _with_store(config_path, lambda store: store.transaction(forget))
    for key in known:
        echo(f"{key}: forgotten")
    missing = [a for a in addresses if address_key(a) not in known]
    for address in missing:
        echo(f"relay: {address}: not remembered", err=True)
    if missing:
        sys.exit(1)


# -- relay domain ----------------------------------------------------------------------------


@main.group()
def arc() -> None:
    """The ARC seal: the key that signs our Authentication-Results for the primary.

    The relay seals every message it accepts (RFC 8617) when [arc] key, selector and domain are
    set; the primary trusts the seal's domain (docs/deploy.md) and the key published in the DNS.
    """


def _arc_settings(config_path: str | None) -> dict[str, Any]:
    """[arc] as written in the config file, read without the full validation: before keygen
    the key it names does not exist yet, which the loader rightly calls an error."""
    chosen = config_path or config_module.default_path() or DEFAULT_CONFIG
    try:
        with open(chosen, "rb") as source:
            data = tomllib.load(source)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        _fail(f"{chosen}: {exc}", 2)
    settings = data.get("arc", {})
    return settings if isinstance(settings, dict) else {}


@arc.command("keygen")
@click.option(
    "--selector",
    required=True,
    help="The DNS selector: the key is published at SELECTOR._domainkey.DOMAIN.",
)
@click.option("--key", "key_path", default=None, help="Where to write the key. Default: [arc] key.")
@click.option(
    "--domain",
    "signing_domain",
    default=None,
    help="The signing domain (d=). Default: [arc] domain.",
)
@click.option("--force", is_flag=True, help="Replace a key that exists (and then its DNS record).")
@config_option
def arc_keygen(
    selector: str,
    key_path: str | None,
    signing_domain: str | None,
    force: bool,
    config_path: str | None,
) -> None:
    """Write a new RSA 2048 key (mode 0600) and print the DNS TXT record that publishes it.

    Publish the record, then set [arc] key, selector and domain and reload. A key that exists
    is kept unless --force: the record in the DNS belongs to it.
    """
    settings = _arc_settings(config_path)
    path = key_path or str(settings.get("key") or "")
    domain_name = signing_domain or str(settings.get("domain") or "")
    if not path:
        raise click.UsageError("no key path: give --key PATH or set [arc] key in the config")
    if not domain_name:
        raise click.UsageError("no signing domain: give --domain or set [arc] domain")
    if not arc_keys.NAME.fullmatch(selector):
        raise click.BadParameter(f"{selector!r} is not a DNS label", param_hint="--selector")
    try:
        pem = arc_keys.generate_key(path, force=force)
    except FileExistsError:
        _fail(f"{path} exists: add --force to replace it (and its DNS record)")
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}")
    echo(f"wrote {path} (RSA {arc_keys.KEY_BITS}, mode 0600); publish this record:", err=True)
    echo(arc_keys.txt_record(selector, domain_name, pem))


@main.group()
def domain() -> None:
    """Steer a domain at run time: send its mail elsewhere, or pause delivery to its primary.

    Kept in the queue database (a restart keeps it), shown by `relay status` and the metric
    relay_domain_state, logged by the server, and taken up by a running relay within 2 seconds.
    """


def _configured_domain(cfg: Config, name: str) -> str:
    settings = cfg.domain(name.lower().rstrip("."))
    if settings is None:
        configured = ", ".join(d.name for d in cfg.domains)
        raise click.BadParameter(f"{name} is not a configured domain ({configured})")
    return settings.name


def _reroute_target(cfg: Config, value: str) -> str:
    """HOST[:PORT] (port 25 when left out), never this relay itself (RFC 5321 5.1)."""
    try:
        host, port = parse_hostport(value, default_port=cfg.delivery.mx_port)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--to") from exc
    ours = {cfg.hostname.lower().rstrip(".")} | {h for h, p in cfg.smtp.listen if p == port}
    if host.lower().rstrip(".") in ours or (
        host in ("127.0.0.1", "::1", "localhost") and any(p == port for _, p in cfg.smtp.listen)
    ):
        raise click.BadParameter(
            f"{value} is this relay itself: mail sent there would loop", param_hint="--to"
        )
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@domain.command("reroute")
@click.argument("name", metavar="DOMAIN")
@click.option("--to", "target", metavar="HOST[:PORT]", help="Where DOMAIN's mail goes instead.")
@click.option(
    "--tls",
    type=click.Choice(TLS_MODES),
    default=None,
    help="TLS towards that host (default: the domain's `tls` setting).",
)
@click.option("--clear", is_flag=True, help="Send DOMAIN's mail to its primary again.")
@config_option
def domain_reroute(
    name: str, target: str | None, tls: str | None, clear: bool, config_path: str | None
) -> None:
    """Send DOMAIN's mail (queued and new) to HOST[:PORT] until --clear.

    For a primary gone for days: a temporary mailbox at another provider takes the mail. The
    target is tried like a configured primary (its addresses in order, never this relay), with
    the domain's retry and bounce rules; the primary's up/down state is left alone.
    """
    cfg, _ = _load_config(config_path)
    if clear == (target is not None):
        raise click.UsageError("give either --to HOST[:PORT] or --clear")
    if clear and tls is not None:
        raise click.UsageError("--tls goes with --to")
    name = _configured_domain(cfg, name)
    where = None if clear else _reroute_target(cfg, target or "")
    changed = _with_store(
        config_path, lambda store: store.set_reroute(name, where, tls, actor()), cfg
    )
    if where is None:
        echo(f"{name}: mail goes to its primary{'' if changed else ' (already)'}")
    else:
        suffix = f" (tls {tls})" if tls else ""
        echo(f"{name}: mail goes to {where}{suffix}{'' if changed else ' (already)'}")


@domain.command("pause")
@click.argument("name", metavar="DOMAIN")
@config_option
def domain_pause(name: str, config_path: str | None) -> None:
    """Stop delivering DOMAIN's mail; it stays queued (not held), accepted as before.

    For a primary that answers but is not to be trusted yet (a migration in progress). Unlike
    `relay queue hold`, mail arriving meanwhile is kept back too; `relay domain resume` lets it
    all go.
    """
    cfg, _ = _load_config(config_path)
    name = _configured_domain(cfg, name)
    changed = _with_store(config_path, lambda store: store.set_paused(name, True, actor()), cfg)
    echo(f"{name}: delivery paused{'' if changed else ' (already)'}")


@domain.command("resume")
@click.argument("name", metavar="DOMAIN")
@config_option
def domain_resume(name: str, config_path: str | None) -> None:
    """Deliver DOMAIN's mail again after `relay domain pause`."""
    cfg, _ = _load_config(config_path)
    name = _configured_domain(cfg, name)
    changed = _with_store(config_path, lambda store: store.set_paused(name, False, actor()), cfg)
    echo(f"{name}: delivery resumed{'' if changed else ' (was not paused)'}")


# -- relay rescue ------------------------------------------------------------------------------


@main.group()
def rescue() -> None:
    """Rescue mailboxes: people read the mail held for them over IMAP (Dovecot) during an outage.

    Copies appear once a domain with `rescue = true` has had its primary down for `rescue_after`
    (or after `relay rescue on`); the originals are still delivered to the primary.
    """


def _rescue_address(cfg: Config, address: str) -> tuple[str, DomainConfig]:
    from relay.ops import rescue as rescue_module

    address = address.strip().strip("<>")
    local, domain = split(address)
    settings = cfg.domain(domain_of(address)) if local and domain else None
    if settings is None:
        raise click.BadParameter(f"{address} is not an address of a configured domain")
    if rescue_module.maildir_of(Path(cfg.rescue.path), address) is None:
        raise click.BadParameter(
            f"{address} cannot have a rescue mailbox: only letters, digits and . _ + - in the"
            " local part (it names a directory)"
        )
    return address.lower(), settings


@rescue.command("grant")
@click.argument("address")
@config_option
def rescue_grant(address: str, config_path: str | None) -> None:
    """Give ADDRESS access to its rescue mailbox, or reset it: prints a new password, once."""
    from relay.ops import rescue as rescue_module

    cfg, _ = _load_config(config_path)
    address, settings = _rescue_address(cfg, address)
    path = rescue_module.passwd_path(cfg)
    entries = rescue_module.read_access(path)
    password, hashed = rescue_module.new_password()
    renewed = address in entries
    entries[address] = hashed
    rescue_module.write_access(path, entries)
    echo(f"{address}: {'password reset' if renewed else 'access granted'}")
    echo(f"password: {password}")
    echo(f"IMAP user name: {address} (see docs/operations.md, 'A long outage')")
    if not settings.rescue:
        echo(
            f"relay: note: rescue is off for {settings.name}: set rescue = true, or run"
            f" relay rescue on {settings.name}",
            err=True,
        )


@rescue.command("revoke")
@click.argument("address")
@config_option
def rescue_revoke(address: str, config_path: str | None) -> None:
    """Take ADDRESS's access away (its copies stay until they expire)."""
    from relay.ops import rescue as rescue_module

    cfg, _ = _load_config(config_path)
    address, _settings = _rescue_address(cfg, address)
    path = rescue_module.passwd_path(cfg)
    entries = rescue_module.read_access(path)
    if entries.pop(address, None) is None:
        _fail(f"{address} has no access")
    rescue_module.write_access(path, entries)
    echo(f"{address}: access revoked")


@rescue.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@click.option(
    "--dovecot-log",
    type=click.File("r", encoding="utf-8", errors="replace"),
    help="Dovecot's log (log_path, or the mail log): adds each person's last IMAP login.",
)
@config_option
def rescue_list(as_json: bool, dovecot_log: Any, config_path: str | None) -> None:
    """Who has access to a rescue mailbox, how many messages it holds, and their last login."""
    from relay.ops import rescue as rescue_module

    cfg, _ = _load_config(config_path)
    root = Path(cfg.rescue.path)
    logins = rescue_module.last_logins(dovecot_log) if dovecot_log is not None else {}
    rows: list[tuple[str, int, str | None]] = []
    for address in sorted(rescue_module.read_access(rescue_module.passwd_path(cfg))):
        maildir = rescue_module.maildir_of(root, address)
        count = rescue_module.count_messages(maildir) if maildir else 0
        rows.append((address, count, logins.get(address)))
    if as_json:
        listing = [
            {"address": address, "messages": count, "last_login": login}
            for address, count, login in rows
        ]
        echo(json_text(listing, indent=2))
        return
    for address, count, login in rows:
        seen = f"  last login {login}" if login else ("  never logged in" if dovecot_log else "")
        echo(f"{address}  {plural(count, 'message')}{seen}")
    echo(f"-- {plural(len(rows), 'person', 'people')} with access")


def _rescue_mode(name: str, mode: str | None, config_path: str | None) -> None:
    cfg, _ = _load_config(config_path)
    name = _configured_domain(cfg, name)
    changed = _with_store(config_path, lambda store: store.set_rescue(name, mode, actor()), cfg)
    said = {"on": "on, by hand", "off": "off, by hand", None: "automatic (rescue_after)"}[mode]
    echo(f"{name}: rescue mailboxes {said}{'' if changed else ' (already)'}")


@rescue.command("on")
@click.argument("name", metavar="DOMAIN")
@config_option
def rescue_on(name: str, config_path: str | None) -> None:
    """Fill DOMAIN's rescue mailboxes now, whatever rescue_after says."""
    _rescue_mode(name, "on", config_path)


@rescue.command("off")
@click.argument("name", metavar="DOMAIN")
@config_option
def rescue_off(name: str, config_path: str | None) -> None:
    """Stop copying DOMAIN's mail to rescue mailboxes (copies made stay until they expire)."""
    _rescue_mode(name, "off", config_path)


@rescue.command("auto")
@click.argument("name", metavar="DOMAIN")
@config_option
def rescue_auto(name: str, config_path: str | None) -> None:
    """Back to the rule: rescue = true and the primary down for rescue_after."""
    _rescue_mode(name, None, config_path)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(config_path: str | None, as_json: bool) -> None:
    """Per domain: queued mail, oldest age, primary up or down since when, last error."""
    cfg, _ = _load_config(config_path)
    report, stats = _with_store(
        config_path,
        lambda store: (status_report(cfg, store, time.time()), store.file_stats()),
        cfg,
    )
    if as_json:
        echo(json_text(report, indent=2))
        return
    echo(f"{'DOMAIN':<28} {'MSGS':>6} {'RCPTS':>6} {'OLDEST':>7} {'HELD':>5}  PRIMARY")
    for row in report:
        oldest = age(row["oldest_age_seconds"]) if row["queued_messages"] else "-"
        primary = row["primary"] + (f" since {row['since']}" if row["since"] else "")
        echo(
            f"{row['domain']:<28} {row['queued_messages']:>6} {row['queued_recipients']:>6}"
            f" {oldest:>7} {row['held_messages']:>5}  {primary}"
        )
        if row["last_error"]:
            echo(f"{'':<28} last error: {row['last_error']}")
        if row["paused_since"]:
            echo(f"{'':<28} delivery paused since {row['paused_since']} (relay domain resume)")
            echo(f"{'':<28} delivery paused since {row['paused_since']} (relay domain resume)")
        if row["rescue_active"]:
            echo(f"{'':<28} rescue mailboxes active (relay rescue list)")
        if row["rerouted_to"]:
            tls = f", tls {row['rerouted_tls']}" if row["rerouted_tls"] else ""
            echo(f"{'':<28} rerouted to {row['rerouted_to']}{tls} since {row['rerouted_since']}")
    echo(
        f"queue {cfg.queue.path}: {stats.size / 2**20:.1f} MB,"
        f" {plural(stats.free_pages, 'free page')} ({stats.free_share:.0%})"
    )


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def doctor(config_path: str | None, as_json: bool) -> None:
    """Check the deployment: MX records, our address, the primary, TLS and MTA-STS.

    Prints each finding (ok, warning or problem) with its fix; exits 1 if any is a problem.
    """
    from relay.ops import doctor as checks

    cfg, _ = _load_config(config_path)
    import asyncio  # here, not at the top: `relay queue` starts faster without it

    findings = asyncio.run(checks.diagnose(cfg))
    echo(checks.report_json(findings) if as_json else checks.report_text(findings))
    sys.exit(checks.exit_code(findings))
