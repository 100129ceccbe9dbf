"""Every Prometheus metric the relay exports, declared in one place.

The names are a contract with dashboards and alert rules (deploy/): add metrics, never rename them.
Queue gauges are not kept here as running counts: `QueueCollector` reads them from the database at
scrape time, so they are right from the first scrape after a restart and can never drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.store import QueueSnapshot as QueueSnapshot  # re-exported: the gauges' input

# `_created` series double the exposition for no dashboard's benefit.
disable_created_metrics()  # type: ignore[no-untyped-call]

# auto_describe stays off: `relay_smtp_connections` (gauge) and `relay_smtp_connections_total`
# (counter) are both contract names, which prometheus-client's name-clash check would refuse.
REGISTRY = CollectorRegistry(auto_describe=False)

messages_accepted = Counter(
    "relay_messages_accepted",
    "Messages accepted and committed to the queue, by recipient domain.",
    ["domain"],
    registry=REGISTRY,
)
messages_rejected = Counter(
    "relay_messages_rejected",
    "Transactions or recipients refused at intake, by reason.",
    ["reason"],
    registry=REGISTRY,
)
arc_seals = Counter(
    "relay_arc_seals",
    "Messages given our ARC seal (sealed), or stored without it because sealing failed (failed).",
    ["result"],
    registry=REGISTRY,
)
spam_check_duration = Histogram(
    "relay_spam_check_duration_seconds",
    "Time a spam check took, answered or not: dnsbl (every list of one client, asked at"
    " connect) or rspamd (one message, at the end of DATA).",
    ["check"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
spam_checks = Counter(
    "relay_spam_checks",
    "Messages checked for spam, by check and result: the action it answered, or timeout/error.",
    ["check", "result"],
    registry=REGISTRY,
)
deliveries = Counter(
    "relay_deliveries",
    "Per-recipient delivery outcomes: delivered, deferred or bounced.",
    ["domain", "result"],
    registry=REGISTRY,
)
delivery_duration = Histogram(
    "relay_delivery_duration_seconds",
    "Time from the start of an outbound SMTP transaction to its final reply.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
bounces = Counter(
    "relay_bounces",
    "Delivery status notifications generated (failed and delayed).",
    registry=REGISTRY,
)
bounces_suppressed = Counter(
    "relay_bounces_suppressed",
    "DSNs not sent, by the failed recipient's domain: the sender was the null reverse-path"
    " (RFC 5321 4.5.5), or intake did not authenticate it (bounce_unauthenticated).",
    ["domain"],
    registry=REGISTRY,
)
queue_write_errors = Counter(
    "relay_queue_write_errors",
    "Queue writes that failed for the disk or the file (full, I/O error, read-only).",
    registry=REGISTRY,
)
routing_failures = Counter(
    "relay_routing_failures",
    "Routing lookups that found no usable next hop, by kind (e.g. no_preferred_mx).",
    ["domain", "kind"],
    registry=REGISTRY,
)
primary_up = Gauge(
    "relay_primary_up",
    "1 while the last probe or delivery to the domain's primary succeeded, 0 while it fails.",
    ["domain"],
    registry=REGISTRY,
)
destination_transitions = Counter(
    "relay_primary_transitions",
    "Changes of a domain's primary between up and down (relay.health), by the state entered.",
    ["domain", "state"],
    registry=REGISTRY,
)
primary_last_success = Gauge(
    "relay_primary_last_success_timestamp_seconds",
    "Unix time of the last successful probe or delivery to the domain's primary.",
    ["domain"],
    registry=REGISTRY,
)
queue_lifetime = Gauge(
    "relay_queue_lifetime_seconds",
    "queue.lifetime: how old waiting mail gets before queue.on_expiry applies to it.",
    registry=REGISTRY,
)
queue_bounces_on_expiry = Gauge(
    "relay_queue_bounces_on_expiry",
    '1 when queue.on_expiry = "bounce", 0 when "hold": whether expiry loses mail to a DSN.',
    registry=REGISTRY,
)
smtp_connections = Gauge(
    "relay_smtp_connections",
    "Inbound SMTP connections open now.",
    registry=REGISTRY,
)
domain_state = Gauge(
    "relay_domain_state",
    "1 for the state an operator set for the domain (relay domain pause / reroute):"
    " normal, paused or rerouted; 0 for the other two.",
    ["domain", "state"],
    registry=REGISTRY,
)
DOMAIN_STATES = ("normal", "paused", "rerouted")


def set_domain_states(states: dict[str, str]) -> None:
    """Series for the domains an operator paused or rerouted, and none for the others: like
    every per-domain series, a domain nobody touched costs nothing (many domains, one relay)."""
    domain_state.clear()
    for domain, current in states.items():
        for state in DOMAIN_STATES:
            domain_state.labels(domain, state).set(int(state == current))


rescue_messages = Gauge(
    "relay_rescue_messages",
    "Copies in the domain's rescue mailboxes (relay rescue): their originals still waiting, or"
    " delivered less than rescue_keep ago.",
    ["domain"],
    registry=REGISTRY,
)
rescue_active = Gauge(
    "relay_rescue_active",
    "1 while held mail for the domain is copied to rescue mailboxes (the primary down for"
    " rescue_after, or relay rescue on).",
    ["domain"],
    registry=REGISTRY,
)
smtp_stress = Gauge(
    "relay_smtp_stress",
    "1 while more than 80 % of smtp.max_connections are in use: timeouts are"
    " smtp.stress_timeout and junk commands no longer keep a session alive.",
    registry=REGISTRY,
)


class _ConnectionsTotal(Collector):
    """`relay_smtp_connections_total`, a counter sharing its stem with the gauge above."""

    def __init__(self) -> None:
        self._value = 0

    def inc(self) -> None:
        self._value += 1

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "relay_smtp_connections", "Inbound SMTP connections accepted since start."
        )
        family.add_metric([], self._value)
        yield family


smtp_connections_total = _ConnectionsTotal()
REGISTRY.register(smtp_connections_total)


class QueueCollector(Collector):
    """Reads the queue gauges from the database at scrape time (exact, restart-proof).

    Per-domain series exist only for domains with mail waiting or held, or whose primary is
    down (`active`): an operator with 10,000 customer domains scrapes 3 series per domain in
    trouble, not 20,000 zeros. Alert rules compare values, so a series that is absent (nothing
    queued) fires nothing, as a zero would not.
    """

    def __init__(
        self,
        snapshot: Callable[[], QueueSnapshot],
        active: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self._snapshot = snapshot
        self._active = active

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        messages = GaugeMetricFamily(
            "relay_queue_messages", "Messages in the queue, by state.", labels=["state"]
        )
        for state in ("queued", "held"):
            messages.add_metric([state], snap.messages_by_state.get(state, 0))
        recipients = GaugeMetricFamily(
            "relay_queue_recipients",
            "Recipients waiting for delivery (or expiry), by domain; held messages excluded.",
            labels=["domain"],
        )
        oldest = GaugeMetricFamily(
            "relay_queue_oldest_message_age_seconds",
            "Age of the oldest message with a recipient waiting, by domain; held ones excluded.",
            labels=["domain"],
        )
        held = GaugeMetricFamily(
            "relay_queue_held_messages",
            "Held messages with a recipient in the domain: kept until an operator acts.",
            labels=["domain"],
        )
        domains = sorted(
            set(self._active()) | set(snap.recipients_by_domain) | set(snap.held_by_domain)
        )
        for domain in domains:
            recipients.add_metric([domain], snap.recipients_by_domain.get(domain, 0))
            oldest.add_metric([domain], snap.oldest_age_by_domain.get(domain, 0.0))
            held.add_metric([domain], snap.held_by_domain.get(domain, 0))
        yield messages
        yield recipients
        yield oldest
        yield held

    def describe(self) -> Iterable[Metric]:
        """Declares the names up front so that name clashes show at registration."""
        yield GaugeMetricFamily("relay_queue_messages", "", labels=["state"])
        yield GaugeMetricFamily("relay_queue_recipients", "", labels=["domain"])
        yield GaugeMetricFamily("relay_queue_oldest_message_age_seconds", "", labels=["domain"])
        yield GaugeMetricFamily("relay_queue_held_messages", "", labels=["domain"])


def metric_names() -> set[str]:
    """Every sample name the relay can export (for tests of dashboards and alert rules)."""
    names = {
        "relay_queue_messages",
        "relay_queue_recipients",
        "relay_queue_oldest_message_age_seconds",
        "relay_queue_held_messages",
    }
    for family in REGISTRY.collect():
        for sample in family.samples:
            names.add(sample.name)
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_count", "_sum"))
    return names
