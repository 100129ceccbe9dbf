"""Checks of deploy/ that need no external tool: what promtool and systemd-analyze cannot see.

The metric names are a contract (relay/ops/metrics.py): a dashboard panel or an alert naming a
metric the relay does not export shows "no data" or never fires, silently. So every PromQL
expression in the dashboard and the alert rules is checked against `metric_names()`. The
production config must be accepted by the real loader with its documented defaults, and the
files docker-compose.yml mounts must exist and agree with each other, or `docker compose up`
would not show the dashboard.

PyYAML is not a dependency, so the YAML files are read with small line-based parsers of the subset
they use; deploy/check.sh runs promtool on the same files, which parses them fully.
"""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields, is_dataclass, replace
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from relay import config
from relay.ops.metrics import metric_names

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"

# Every key of the configuration contract, as documented for operators, by section.
_DOCUMENTED = {
    "": ("hostname", "postmaster"),
    "smtp": (
        "listen",
        "max_message_size",
        "max_recipients",
        "max_hops",
        "etrn_clients",
        "max_connections",
        "max_connections_per_ip",
        "max_messages_per_session",
        "max_unknown_recipients",
        "rate_per_ip",
        "command_timeout",
        "data_timeout",
        "min_data_rate",
        "max_junk_commands",
        "stress_timeout",
        "max_line_length",
        "max_inflight_bytes",
        "workers",
    ),
    "tls": ("cert", "key"),
    "queue": ("path", "lifetime", "on_expiry", "min_free_space"),
    # cafile is not in the first list of keys, but relay/config.py accepts it (tls = "verify"
    # towards a primary whose certificate comes from a private CA).
    "delivery": (
        "concurrency",
        "per_host_concurrency",
        "probe_interval",
        "mx_port",
        "timeout",
        "cafile",
    ),
    "retry": ("min", "max", "warn_after"),
    "metrics": ("listen",),
    "status": ("listen", "public"),
    "spam": (
        *("dnsbl", "dnsbl_threshold", "dnsbl_action", "dnsbl_timeout", "greet_delay"),
        *("rspamd", "rspamd_failure", "rspamd_timeout", "auth", "auth_timeout"),
    ),
    "arc": (
        "key",
        "selector",
        "domain",
    ),
    "rescue": ("path",),
    "dns": ("nameservers",),
    "log": ("format",),
    "domain": (
        "name",
        "primary",
        "tls",
        "recipients",
        "recipients_file",
        "verify",
        "verify_positive_ttl",
        "verify_negative_ttl",
        "verify_unknown_while_down",
        "accept",
        "rescue",
        "rescue_after",
        "rescue_keep",
        "spf_fail",
        "dmarc_reject",
        "bounce_unauthenticated",
    ),
}
DOCUMENTED_KEYS = {f"{s}.{k}" if s else k for s, keys in _DOCUMENTED.items() for k in keys}

REQUIRED_ALERTS = {
    "RelayDown",
    "RelayPrimaryDown",
    "RelayQueueGrowing",
    "RelayQueueOldMessage",
    "RelayQueueMessageNearExpiry",
    "RelayDeliveriesBouncing",
}

# --- PromQL: the metric names an expression reads -----------------------------------------------

_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions or keywords.

    Strings, label matchers, ranges and grouping label lists are removed first, since the names
    inside them are labels or durations, not metrics.
    """
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, is_call = match.group(1), match.group(2)
        if not is_call and name.lower() not in _PROMQL_KEYWORDS:
            names.add(name)
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('up{job="relay"} == 0', {"up"}),
        ("deriv(relay_queue_recipients[10m]) > 0", {"relay_queue_recipients"}),
        (
            "histogram_quantile(0.9, sum by (le) (rate(relay_delivery_duration_seconds_bucket"
            '{instance=~"$instance"}[$__rate_interval])))',
            {"relay_delivery_duration_seconds_bucket"},
        ),
        (
            'sum without (result) (increase(x_total{result="bounced"}[30m])) > 0.1 * '
            "sum(y) or vector(0) unless on (domain) z offset 5m",
            {"x_total", "y", "z"},
        ),
        (
            "time() - max by (domain) (relay_primary_last_success_timestamp_seconds)",
            {"relay_primary_last_success_timestamp_seconds"},
        ),
        ('relay_queue_messag{state="held"} > 4 * 86400', {"relay_queue_messag"}),
    ],
)
def test_promql_metric_names_finds_metrics_and_skips_functions_labels_and_keywords(
    expr: str, names: set[str]
) -> None:
    assert promql_metric_names(expr) == names


def exported_names() -> set[str]:
    """What a Prometheus scraping the relay can query: our samples, plus its own `up`."""
    return metric_names() | {"up"}


# --- Grafana dashboard ----------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEPLOY / "grafana" / "relay-dashboard.json").read_text())
    return data


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard_panels(dashboard) for t in p.get("targets", [])]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    """The metric selector of each `label_values(selector, label)` variable query."""
    selectors = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
        assert match, f"variable {variable['name']}: unexpected query {query!r}"
        selectors.append(match.group(1))
    return selectors


def test_dashboard_queries_name_only_exported_metrics() -> None:
    dashboard = load_dashboard()
    exprs = dashboard_exprs(dashboard) + variable_queries(dashboard)
    assert len(exprs) > 10
    for expr in exprs:
        unknown = promql_metric_names(expr) - exported_names()
        assert not unknown, f"{expr!r} names metrics the relay does not export: {unknown}"


def test_dashboard_shows_queue_age_flow_primary_rejections_and_latency() -> None:
    exprs = dashboard_exprs(load_dashboard())
    used = set().union(*(promql_metric_names(e) for e in exprs))
    assert {
        "relay_queue_recipients",
        "relay_queue_oldest_message_age_seconds",
        "relay_messages_accepted_total",
        "relay_deliveries_total",
        "relay_bounces_total",
        "relay_primary_up",
        "relay_messages_rejected_total",
        "relay_delivery_duration_seconds_bucket",
    } <= used
    assert any("histogram_quantile(" in e for e in exprs)
    assert any('result="bounced"' in e or "by (result)" in e for e in exprs)


def test_dashboard_variables_are_defined_and_panels_use_the_datasource_variable() -> None:
    dashboard = load_dashboard()
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in defined
    for expr in dashboard_exprs(dashboard) + variable_queries(dashboard):
        for name in re.findall(r"\$(\w+)", expr):
            assert name in defined or name.startswith("__"), f"{expr!r}: ${name} is not defined"
    for panel in dashboard_panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = list(dashboard_panels(load_dashboard()))
    assert len({p["id"] for p in panels}) == len(panels)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


# --- Prometheus alert rules -----------------------------------------------------------------------


def parse_alert_rules(text: str) -> dict[str, dict[str, str]]:
    """alert name → {"expr", "for", "severity"} from alerts.yml (plain or `|` block scalars)."""
    rules: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if match := re.match(r"\s*- alert:\s*(\S+)\s*$", line):
            current = rules.setdefault(match.group(1), {})
        elif current is not None and (match := re.match(r"(\s*)expr:\s*(.*)$", line)):
            indent, value = len(match.group(1)), match.group(2).strip()
            if value in ("|", "|-", ">", ">-"):
                block = []
                for following in lines[i + 1 :]:
                    if following.strip() and len(following) - len(following.lstrip()) <= indent:
                        break
                    block.append(following.strip())
                value = " ".join(part for part in block if part)
            current["expr"] = value
        elif current is not None and (match := re.match(r"\s*(for|severity):\s*(\S+)", line)):
            current[match.group(1)] = match.group(2)
    return rules


def load_alert_rules() -> dict[str, dict[str, str]]:
    text = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    rules = parse_alert_rules(text)
    assert len(rules) == text.count("- alert:") == len(re.findall(r"^\s*expr:", text, re.M))
    return rules


def test_alerts_cover_outage_queue_age_bounces_and_relay_down() -> None:
    rules = load_alert_rules()
    assert set(rules) >= REQUIRED_ALERTS
    assert rules["RelayPrimaryDown"]["for"] == "10m"
    assert rules["RelayQueueGrowing"]["for"] == "30m"
    assert rules["RelayQueueOldMessage"]["severity"] == "warning"
    assert rules["RelayQueueMessageNearExpiry"]["severity"] == "critical"
    for name, rule in rules.items():
        assert rule.get("severity") in ("warning", "critical"), name


def test_alert_expressions_name_only_exported_metrics() -> None:
    for name, rule in load_alert_rules().items():
        unknown = promql_metric_names(rule["expr"]) - exported_names()
        assert not unknown, f"{name}: {rule['expr']!r} names unknown metrics {unknown}"


def parse_alert_test_outcomes(text: str) -> dict[str, set[str]]:
    """alert name → {"fires", "silent"}: the outcomes alerts_test.yml expects for it somewhere."""
    outcomes: dict[str, set[str]] = {}
    alertname = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if match := re.match(r"\s*alertname:\s*(\S+)", line):
            alertname = match.group(1)
        elif alertname and (match := re.match(r"\s*exp_alerts:\s*(.*)$", line)):
            silent = match.group(1).strip() == "[]"
            if not silent:
                following = next(f for f in lines[i + 1 :] if f.strip())
                assert following.strip().startswith("- exp_labels:"), following
            outcomes.setdefault(alertname, set()).add("silent" if silent else "fires")
            alertname = None
    return outcomes


def test_every_alert_has_unit_tests_that_fire_it_and_keep_it_silent() -> None:
    outcomes = parse_alert_test_outcomes((DEPLOY / "prometheus" / "alerts_test.yml").read_text())
    for name in load_alert_rules():
        assert outcomes.get(name) == {"fires", "silent"}, name


def test_prometheus_config_loads_the_alert_rules_and_scrapes_job_relay() -> None:
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    assert re.search(r"^rule_files:\n\s+- alerts\.yml$", text, re.M)
    assert re.search(r"- job_name: relay$", text, re.M)
    # RelayDown and RelayNotScraped select job="relay": a renamed job would silence them.
    assert 'up{job="relay"}' in load_alert_rules()["RelayDown"]["expr"]


# --- relay.toml -----------------------------------------------------------------------------------


def flat_keys(data: dict[str, Any]) -> set[str]:
    keys = set()
    for key, value in data.items():
        if key == "domain":
            keys |= {f"domain.{k}" for entry in value for k in entry}
        elif isinstance(value, dict):
            keys |= {f"{key}.{k}" for k in value}
        else:
            keys.add(key)
    return keys


def test_production_config_sets_every_documented_key_and_no_other() -> None:
    data = tomllib.loads((DEPLOY / "relay.toml").read_text())
    assert flat_keys(data) == DOCUMENTED_KEYS


def loader_keys() -> set[str]:
    """Every key relay/config.py reads, from its dataclasses (field names are the TOML keys)."""
    keys = set()
    for section in fields(config.Config):
        if is_dataclass(factory := section.default_factory):
            keys |= {f"{section.name}.{f.name}" for f in fields(factory)}
        elif section.init and section.name not in ("domains", "source"):
            keys.add(section.name)  # a top-level key such as hostname
    keys |= {f"domain.{f.name}" for f in fields(config.DomainConfig)}
    return keys


def test_documented_keys_are_exactly_the_keys_the_loader_reads() -> None:
    # A key added to relay/config.py must be documented in deploy/relay.toml, and vice versa.
    assert loader_keys() == DOCUMENTED_KEYS


def key_comments(text: str) -> Iterator[tuple[str, str, str]]:
    """(key, value text, the comment block right above it) for each `key = value` line."""
    comment: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            comment.append(line.lstrip("# "))
        elif match := re.match(r"(\w+) = (.*)$", line):
            yield match.group(1), match.group(2), " ".join(comment)
            comment = []
        else:
            comment = []


def test_production_config_comments_every_key_with_its_default() -> None:
    for key, value, comment in key_comments((DEPLOY / "relay.toml").read_text()):
        assert comment, f"{key} has no comment"
        if key == "name":  # a domain's name has no default
            continue
        assert "Default:" in comment, key
        if "CHANGE" not in comment:
            assert f"Default: {value}" in comment, f"{key}: value is not the stated default"


def load_with_local_paths(path: Path, tmp_path: Path) -> config.Config:
    """Validates a deploy config with the real loader, its machine paths moved under tmp_path."""
    data = tomllib.loads(path.read_text())
    data.setdefault("queue", {})["path"] = str(tmp_path / "queue" / "queue.db")
    for name in ("cert", "key"):
        if data.get("tls", {}).get(name):
            pem = tmp_path / f"{name}.pem"
            pem.write_text("placeholder: the loader only checks that it is readable\n")
            data["tls"][name] = str(pem)
    return config.from_mapping(data, str(path))


def test_production_config_is_valid_and_its_unchanged_keys_are_the_loader_defaults(
    tmp_path: Path,
) -> None:
    loaded = load_with_local_paths(DEPLOY / "relay.toml", tmp_path)
    assert loaded.hostname == "mx2.example.org"
    assert loaded.tls.enabled
    assert loaded.smtp == config.SmtpConfig()
    assert loaded.queue == replace(config.QueueConfig(), path=str(tmp_path / "queue" / "queue.db"))
    assert loaded.delivery == config.DeliveryConfig()
    assert loaded.retry == config.RetryConfig()
    assert loaded.metrics == config.MetricsConfig()
    assert loaded.spam == config.SpamConfig()
    assert loaded.dns == config.DnsConfig()
    assert loaded.log == config.LogConfig()
    assert loaded.domains == (config.DomainConfig(name="example.org", verify="callout"),)


# --- systemd --------------------------------------------------------------------------------------


def unit_directives(text: str) -> dict[str, list[str]]:
    """ "Section.Key" → values, in order, from a systemd unit file."""
    directives: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives.setdefault(f"{section}.{key}", []).append(value)
    return directives


def test_systemd_unit_runs_unprivileged_hardened_and_reloads_on_sighup() -> None:
    unit = unit_directives((DEPLOY / "systemd" / "relay.service").read_text())
    required = {
        "Service.User": "relay",
        "Service.Group": "relay",
        "Service.StateDirectory": "relay",
        "Service.AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "Service.CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "Service.NoNewPrivileges": "yes",
        "Service.ProtectSystem": "strict",
        "Service.ProtectHome": "yes",
        "Service.PrivateTmp": "yes",
        "Service.Restart": "on-failure",
        "Service.ExecReload": "/bin/kill -HUP $MAINPID",
        "Service.ExecStart": "/usr/local/bin/relay serve --config /etc/relay/relay.toml",
        "Install.WantedBy": "multi-user.target",
    }
    for directive, value in required.items():
        assert unit.get(directive) == [value], directive
    assert unit["Service.Environment"] == ["RELAY_CONFIG=/etc/relay/relay.toml"]


def test_sysusers_creates_the_user_the_unit_runs_as_with_the_state_directory_as_home() -> None:
    lines = [
        line.split()
        for line in (DEPLOY / "systemd" / "relay.sysusers").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(lines) == 1
    assert lines[0][:2] == ["u", "relay"]
    assert lines[0][-2:] == ["/var/lib/relay", "/usr/sbin/nologin"]


# --- Docker ---------------------------------------------------------------------------------------


def dockerfile_healthcheck() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M)
    assert match, "no HEALTHCHECK with an exec-form CMD"
    command: list[str] = json.loads(match.group(1))
    return command


def test_dockerfile_is_slim_non_root_keeps_the_queue_on_a_volume_and_checks_health() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert stages and all(s == "python:3.11-slim" for s in stages)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^VOLUME /var/lib/relay$", text, re.M)
    instructions = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert "curl" not in instructions and "wget" not in instructions
    assert "/healthz" in " ".join(dockerfile_healthcheck())
    # The build context is filtered by an allowlist: each COPY source must exist and be let through.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    assert "*" in ignore
    for source in re.findall(r"^COPY (?!--)(.*) \S+$", text, re.M):
        for path in source.split():
            assert (DEPLOY.parent / path).exists(), f"COPY source {path} does not exist"
            assert any(path == a or path.startswith(f"{a}/") for a in allowed), path


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_docker_healthcheck_command_passes_only_when_healthz_answers_200(
    status: int, healthy: bool
) -> None:
    handler = type("Handler", (_Health,), {"status": status})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        command = [
            arg.replace("127.0.0.1:9325", f"127.0.0.1:{server.server_port}")
            for arg in dockerfile_healthcheck()
        ]
        assert command[0] == "python"
        result = subprocess.run([sys.executable, *command[1:]], capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert (result.returncode == 0) is healthy, result.stderr


def compose_services() -> dict[str, list[str]]:
    """service → its lines, from docker-compose.yml (services are the 2-space keys under it)."""
    services: dict[str, list[str]] = {}
    current = None
    in_services = False
    for line in (DEPLOY / "docker-compose.yml").read_text().splitlines():
        if re.match(r"^\S", line):
            in_services = line.startswith("services:")
            current = None
        elif in_services and (match := re.match(r"^  (\w[\w-]*):\s*$", line)):
            current = services.setdefault(match.group(1), [])
        elif current is not None:
            current.append(line)
    return services


def bind_mounts(lines: list[str]) -> dict[str, Path]:
    """container path → host file for each `- ./host:/container[:ro]` volume."""
    mounts = {}
    for line in lines:
        if match := re.match(r"^\s+- (\./[^:]+):(/[^:]+)(:ro)?$", line):
            mounts[match.group(2)] = DEPLOY / match.group(1)
    return mounts


def test_compose_mounts_existing_files_and_they_agree_with_each_other(tmp_path: Path) -> None:
    services = compose_services()
    assert set(services) == {"relay", "dovecot", "prometheus", "grafana"}
    for name, lines in services.items():
        for target, source in bind_mounts(lines).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
    relay_lines = "\n".join(services["relay"])
    assert "dockerfile: deploy/Dockerfile" in relay_lines and "context: .." in relay_lines

    # The relay: its config loads, and its ports are the ones published, scraped and health-checked.
    relay_config = bind_mounts(services["relay"])["/etc/relay/relay.toml"]
    loaded = load_with_local_paths(relay_config, tmp_path)
    smtp_port = loaded.smtp.listen[0][1]
    assert f'"25:{smtp_port}"' in relay_lines
    assert loaded.metrics.listen == ("0.0.0.0", 9325)
    assert "http://127.0.0.1:9325/healthz" in " ".join(dockerfile_healthcheck())

    # Dovecot: the relay's volume at the path the shipped config serves, the image built from the
    # shipped config, the certificate where that config reads it.
    dovecot_lines = "\n".join(services["dovecot"])
    assert "relay-queue:/var/lib/relay" in dovecot_lines
    assert "dockerfile: deploy/dovecot/Dockerfile" in dovecot_lines
    dockerfile = (DEPLOY / "dovecot" / "Dockerfile").read_text()
    assert "COPY deploy/dovecot/dovecot.conf /etc/relay/dovecot.conf" in dockerfile
    assert "--uid 999" in dockerfile and "--uid 999" in (DEPLOY / "Dockerfile").read_text()
    conf = (DEPLOY / "dovecot" / "dovecot.conf").read_text()
    assert bind_mounts(services["dovecot"])["/etc/relay/tls"].is_dir()
    assert "ssl_cert = </etc/relay/tls/cert.pem" in conf
    queue_path = tomllib.loads((DEPLOY / "docker" / "relay.toml").read_text())["queue"]["path"]
    rescue_root = Path(queue_path).parent / "rescue"  # the relay's default: next to the queue
    assert f"args = scheme=BLF-CRYPT username_format=%Lu {rescue_root}/passwd" in conf
    assert f"home={rescue_root}/%Ld/%Ln" in conf

    # Prometheus: the scrape target is the relay service, the rule file sits next to the config.
    prometheus = bind_mounts(services["prometheus"])
    assert prometheus["/etc/prometheus/prometheus.yml"].name == "prometheus.yml"
    assert prometheus["/etc/prometheus/alerts.yml"].name == "alerts.yml"
    assert '- targets: ["relay:9325"]' in prometheus["/etc/prometheus/prometheus.yml"].read_text()

    # Grafana: the provisioned provider reads the directory the dashboard is mounted in, and the
    # home dashboard is that file, so the first page shows it.
    grafana = bind_mounts(services["grafana"])
    dashboards = [t for t, s in grafana.items() if s.name == "relay-dashboard.json"]
    assert len(dashboards) == 1
    provider = grafana["/etc/grafana/provisioning/dashboards"] / "relay.yml"
    assert f"path: {Path(dashboards[0]).parent}" in provider.read_text()
    grafana_lines = "\n".join(services["grafana"])
    assert f"GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH: {dashboards[0]}" in grafana_lines
    assert 'GF_AUTH_ANONYMOUS_ENABLED: "true"' in grafana_lines
    datasource = (grafana["/etc/grafana/provisioning/datasources"] / "prometheus.yml").read_text()
    assert "url: http://prometheus:9090" in datasource and "isDefault: true" in datasource


# --- A real Prometheus scraping a real relay (Debian's prometheus package) ------------------------


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    what: str,
    check: Callable[[], Any],
    processes: Sequence[tuple[subprocess.Popen[bytes], Path]] = (),
    deadline: float = 30.0,
) -> Any:
    """Polls `check` until it returns something truthy; fails naming `what` after `deadline` s,
    or at once, with its log, if one of `processes` has exited."""
    end = time.monotonic() + deadline
    while True:
        try:
            if result := check():
                return result
        except OSError:
            pass
        for process, log in processes:
            if process.poll() is not None:
                pytest.fail(f"{log.name}: exited while waiting for {what}:\n{log.read_text()}")
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def prometheus_api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


@contextmanager
def running(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.interop
def test_prometheus_scrapes_the_relay_evaluates_every_rule_and_answers_every_panel(
    tmp_path: Path,
) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus, "needs Debian's prometheus package (deploy/check.sh installs it)"
    host = "127.0.0.1"
    smtp_port, metrics_port, web_port = (free_port(host) for _ in range(3))
    relay_config = tmp_path / "relay.toml"
    relay_config.write_text(
        f'hostname = "mx2.example.org"\n[smtp]\nlisten = ["{host}:{smtp_port}"]\n'
        f'[queue]\npath = "{tmp_path / "queue.db"}"\n[metrics]\nlisten = "{host}:{metrics_port}"\n'
        # The primary is a port nobody listens on: the relay keeps the mail, as in an outage.
        f'[[domain]]\nname = "example.org"\nprimary = ["{host}:{free_port(host)}"]\n'
    )
    prometheus_config = tmp_path / "prometheus.yml"
    prometheus_config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
                "scrape_configs": [
                    {
                        "job_name": "relay",
                        "static_configs": [{"targets": [f"{host}:{metrics_port}"]}],
                    }
                ],
            }
        )
    )
    relay_command = [str(Path(sys.executable).parent / "relay"), "serve", "--config"]
    prometheus_command = [
        prometheus,
        f"--config.file={prometheus_config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address={host}:{web_port}",
    ]
    relay_log, prometheus_log = tmp_path / "relay.log", tmp_path / "prometheus.log"
    with (
        running([*relay_command, str(relay_config)], relay_log) as relay,
        running(prometheus_command, prometheus_log) as prom,
    ):
        processes = [(relay, relay_log), (prom, prometheus_log)]
        health = f"http://{host}:{metrics_port}/healthz"
        wait_for(
            "relay /healthz",
            lambda: urllib.request.urlopen(health, timeout=2).status == 200,
            processes,
        )
        with smtplib.SMTP(host, smtp_port, timeout=10) as client:
            client.sendmail("alice@example.net", ["bob@example.org"], b"Subject: hi\r\n\r\nhi\r\n")

        base = f"http://{host}:{web_port}"

        def accepted_scraped() -> Any:
            query = 'relay_messages_accepted_total{job="relay", domain="example.org"}'
            return prometheus_api(base, "query", query=query)["result"]

        [sample] = wait_for("the accepted message in Prometheus", accepted_scraped, processes)
        assert float(sample["value"][1]) == 1

        # Every rule evaluated without error; nothing fires for a relay that is up and young.
        def evaluated_rules() -> list[dict[str, Any]] | None:
            groups = prometheus_api(base, "rules")["groups"]
            rules: list[dict[str, Any]] = [rule for group in groups for rule in group["rules"]]
            never = "0001-01-01"  # Prometheus's zero time: not evaluated yet
            return rules if all(not r["lastEvaluation"].startswith(never) for r in rules) else None

        rules = wait_for("an evaluation of every rule", evaluated_rules, processes)
        assert {r["name"] for r in rules} == set(load_alert_rules())
        assert all(r["health"] == "ok" for r in rules), rules
        assert [r["name"] for r in rules if r["state"] == "firing"] == []

        # Every dashboard query runs, as Grafana would send it, against real series.
        dashboard = load_dashboard()
        for expr in dashboard_exprs(dashboard):
            query = expr.replace("$__rate_interval", "1m")
            query = query.replace("$instance", ".*").replace("$domain", ".*")
            prometheus_api(base, "query", query=query)
        queued = prometheus_api(base, "query", query='sum(relay_queue_recipients{job="relay"})')
        assert float(queued["result"][0]["value"][1]) == 1
