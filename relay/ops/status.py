"""What people see of the relay's state: `relay status` for the operator, /status for everyone.

One report, read from the queue database (the running server's state is kept there), feeds
both. The page is for the people waiting for their mail during an outage: it says whether
their provider's server is up, how much mail is held safely and since when, and names no
address, subject or internal host (no error texts, no reroute targets).
"""

from __future__ import annotations

import html
from typing import Any

from relay.config import Config
from relay.ops.rescue import active as rescue_active
from relay.store import DomainSummary, Store
from relay.words import age, plural, rfc3339

# Seconds between the page's own refreshes (a meta refresh: no JavaScript needed).
REFRESH = 30


def status_report(cfg: Config, store: Store, now: float) -> list[dict[str, Any]]:
    """Per configured domain, and any other with mail waiting (bounces): the operator's view."""
    summary = store.domain_summary()
    states = store.destinations()
    controls = store.domain_controls()
    names = [d.name for d in cfg.domains] + sorted(set(summary) - {d.name for d in cfg.domains})
    report = []
    for name in names:
        waiting = summary.get(name) or DomainSummary()
        state = states.get(name)
        up = None if state is None else state.up
        control = controls.get(name)
        settings = cfg.domain(name)
        down_since = state.since if state is not None and up is False else None
        rescuing = settings is not None and rescue_active(settings, control, down_since, now)
        report.append(
            {
                "domain": name,
                "configured": cfg.domain(name) is not None,
                "queued_messages": waiting.messages,
                "queued_recipients": waiting.recipients,
                "held_messages": waiting.held_messages,
                "oldest_age_seconds": (
                    round(now - waiting.oldest, 1) if waiting.oldest is not None else 0
                ),
                "primary": "unknown" if up is None else ("up" if up else "down"),
                "since": rfc3339(state.since) if state else None,
                "last_success": rfc3339(state.last_success) if state else None,
                "last_error": state.last_error if state and up is False else None,
                "delivery": control.state if control else "normal",
                "paused_since": rfc3339(control.paused_at) if control else None,
                "rerouted_to": control.reroute if control else None,
                "rerouted_tls": control.reroute_tls if control else None,
                "rerouted_since": rfc3339(control.rerouted_at) if control else None,
                "rescue_active": rescuing,
            }
        )
    return report


def render_page(report: list[dict[str, Any]], hostname: str, now: float) -> bytes:
    """The /status page: one section per configured domain, in plain HTML that refreshes."""
    sections = "\n".join(_section(row, now) for row in report if row["configured"])
    generated = rfc3339(now)
    document = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Mail status: {html.escape(hostname)}</title>
<style>
body {{ font-family: sans-serif; max-width: 42em; margin: 2em auto; padding: 0 1em; }}
section {{ border: 1px solid #ccc; border-radius: 6px; padding: 0.5em 1em; margin: 1em 0; }}
.down {{ color: #a00; }} .up {{ color: #070; }} dt {{ font-weight: bold; }}
</style>
</head>
<body>
<h1>Mail status</h1>
<p>This is the backup mail server {html.escape(hostname)}. When a domain's own mail server is
down, mail sent to it is kept here, safely, and delivered as soon as that server is back.</p>
{sections}
<p><small>Updated {generated}; this page refreshes itself every {REFRESH} seconds.</small></p>
</body>
</html>
"""
    return document.encode("utf-8")


def _section(row: dict[str, Any], now: float) -> str:
    name = html.escape(row["domain"])
    primary = row["primary"]
    since = row["since"]
    if primary == "down":
        state = f'<span class="down">down</span> since {since}' if since else "down"
    elif primary == "up":
        state = '<span class="up">up</span>' + (f" since {since}" if since else "")
    else:
        state = "not checked yet"
    held = row["queued_messages"] + row["held_messages"]
    oldest = f"{age(row['oldest_age_seconds'])} ago" if row["queued_messages"] else "none waiting"
    lines = [
        ("Mail server of the domain", state),
        ("Mail held here now", plural(held, "message")),
        ("Oldest waiting message", oldest),
        ("Last delivery to it", row["last_success"] or "none recorded"),
    ]
    if row["delivery"] == "paused":
        lines.append(("Delivery", "paused by the operator; mail is kept here meanwhile"))
    elif row["delivery"] == "rerouted":
        lines.append(("Delivery", "to a temporary mail server chosen by the operator"))
    if row["rescue_active"]:
        lines.append(
            ("Rescue mailbox", "active: read the mail held for you over IMAP (ask for access)")
        )
    items = "\n".join(f"<dt>{title}</dt><dd>{value}</dd>" for title, value in lines)
    return f"<section>\n<h2>{name}</h2>\n<dl>\n{items}\n</dl>\n</section>"
