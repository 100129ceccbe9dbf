#!/usr/bin/env bash
# Validates everything under deploy/ with the real tools: Prometheus config, alert rules and their
# unit tests (promtool), the dashboard's PromQL, the systemd unit and sysusers file (systemd), then
# tests/test_deploy.py including its interop test, where a real Prometheus scrapes a real relay.
# Installs Debian's prometheus (promtool, prometheus) and systemd packages when they are missing.
# Run from anywhere: bash deploy/check.sh. Exits non-zero on the first failure.
#
# Not checked here: the Docker image and docker-compose.yml need a Docker daemon and images from a
# registry this machine cannot reach; tests/test_deploy.py checks the files they refer to.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step() { printf '\n== %s\n' "$*"; }
skipped() { printf 'skipped: %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "need root to run: $*" >&2
        return 1
    fi
}

# apt-get waits for a concurrent apt/dpkg run to finish (DPkg::Lock::Timeout) instead of failing.
# CI starts from package lists that may be stale or absent: refresh them first there.
apt_install() {
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q)
    if [ -n "${CI:-}" ]; then
        as_root "${apt[@]}" update
    fi
    as_root "${apt[@]}" install -y --no-install-recommends "$@" \
        || { as_root "${apt[@]}" update && as_root "${apt[@]}" install -y --no-install-recommends "$@"; }
}

step "tools"
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    echo "promtool or prometheus missing: installing Debian's prometheus package"
    apt_install prometheus
fi
promtool --version 2>&1 | sed -n 1p  # sed reads it all: no SIGPIPE under pipefail
if ! command -v systemd-analyze >/dev/null; then
    echo "systemd-analyze missing: installing Debian's systemd package"
    apt_install systemd || true
fi

step "promtool check config"
promtool check config deploy/prometheus/prometheus.yml

step "promtool check rules"
promtool check rules deploy/prometheus/alerts.yml

step "promtool test rules"
promtool test rules deploy/prometheus/alerts_test.yml

step "dashboard PromQL parses"
# promtool has no "parse this expression" command, so every dashboard query becomes a recording rule
# in a scratch rule file (JSON is YAML) and `promtool check rules` parses it. Grafana's variables
# are replaced by what Grafana sends: a range for $__rate_interval, a regex for $instance/$domain.
python3 - deploy/grafana/relay-dashboard.json "$work/dashboard-rules.yml" <<'EOF'
import json, sys

with open(sys.argv[1]) as f:
    dashboard = json.load(f)
rules = []
for panel in dashboard["panels"]:
    for target in panel.get("targets", []):
        expr = target["expr"].replace("$__rate_interval", "5m")
        expr = expr.replace("$instance", ".*").replace("$domain", ".*")
        rules.append({"record": f"dashboard:panel{panel['id']}:{target['refId']}", "expr": expr})
with open(sys.argv[2], "w") as f:
    json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
print(f"{len(rules)} queries")
EOF
promtool check rules "$work/dashboard-rules.yml"

step "systemd unit"
# `systemd-analyze verify` insists that ExecStart's binary exists, which /usr/local/bin/relay does
# not before installation. Verify a copy with the relay's path pointing at an existing binary:
# every other line is checked as written. verify prints unknown keys and bad values as warnings
# but still exits 0, so any output at all counts as a failure.
if ! command -v systemd-analyze >/dev/null; then
    skipped "systemd-analyze not available (Debian package systemd)"
elif ! printf '[Service]\nExecStart=%s\n' "$(command -v true)" >"$work/probe.service" \
    || ! systemd-analyze verify "$work/probe.service" >/dev/null 2>&1; then
    # A unit with nothing to object to fails too: the tool, not our unit, cannot run here
    # (some containers lack what it needs).
    skipped "systemd-analyze cannot verify even a trivial unit here"
else
    sed "s#/usr/local/bin/relay#$(command -v true)#g" deploy/systemd/relay.service \
        >"$work/relay.service"
    if ! systemd-analyze verify "$work/relay.service" >"$work/verify.log" 2>&1; then
        cat "$work/verify.log"
        exit 1
    fi
    if [ -s "$work/verify.log" ]; then
        echo "systemd-analyze verify warned:"
        cat "$work/verify.log"
        exit 1
    fi
    echo "verify: ok"
    # Exposure is 0 (locked down) to 10 (unprotected); the unit scores about 1.4. Fail above 2.0 so
    # a hardening line removed by accident shows here. --offline needs systemd 250 or later.
    if [[ "$(systemd-analyze security --help 2>&1)" == *--offline* ]]; then
        systemd-analyze security --offline=yes --threshold=20 "$work/relay.service" | tail -n 1
    else
        skipped "systemd-analyze security --offline needs systemd 250 or later"
    fi
fi
if command -v systemd-sysusers >/dev/null; then
    # Creates the user in a scratch root, so a syntax error or a clash shows without touching /etc.
    mkdir "$work/root" "$work/root/etc"
    systemd-sysusers --root="$work/root" - <deploy/systemd/relay.sysusers
    grep -q '^relay:x:[0-9]*:[0-9]*:[^:]*:/var/lib/relay:/usr/sbin/nologin$' "$work/root/etc/passwd"
    echo "sysusers: ok"
else
    skipped "systemd-sysusers not available (Debian package systemd)"
fi

step "pytest tests/test_deploy.py, with the interop test (a real Prometheus scraping a real relay)"
if [ ! -x .venv/bin/pytest ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q -e '.[test]'
fi
# The project's pytest options deselect interop tests; this selects them back in.
.venv/bin/pytest -q -m 'interop or not interop' tests/test_deploy.py

printf '\ndeploy checks passed\n'
