#!/bin/bash
# PIPELINING out, measured (issue 17): a relay drains N queued messages of 3 recipients each to
# Postfix's smtp-sink through a proxy that delays every chunk 5 ms each way (RTT 10 ms, a
# primary in another data centre), once with the sink offering PIPELINING and once without (-p).
#   bash bench/pipelining.sh            # N=400, from the repository root, as root, after make
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-400}
run() {  # run FLAGS LABEL
    local dir; dir=$(mktemp -d)
    cat > "$dir/relay.toml" <<TOML
hostname = "relay.localhost"
[smtp]
listen = ["127.0.0.1:2825"]
rate_per_ip = 0
max_connections_per_ip = 200
[queue]
path = "$dir/queue.db"
min_free_space = "10M"
[metrics]
listen = ""
[spam]
auth = false
[delivery]
probe_interval = "1s"
[[domain]]
name = "example.test"
primary = ["127.0.0.1:2827"]
tls = "none"
TOML
    RELAY_ALLOW_ROOT=1 .venv/bin/relay serve --config "$dir/relay.toml" 2>"$dir/log" &
    local relay=$!
    for _ in $(seq 100); do grep -q "relay started" "$dir/log" && break; sleep 0.1; done
    /usr/sbin/smtp-source -s 20 -m "$N" -r 3 -l 4096 -f s@bench.test -t bob@example.test 127.0.0.1:2825
    /usr/sbin/smtp-sink -u postfix $1 127.0.0.1:2826 200 & local sink=$!
    .venv/bin/python bench/delay_proxy.py 2827 2826 0.005 & local proxy=$!
    local start; start=$(date +%s.%N)
    until [ "$(sqlite3 "$dir/queue.db" 'select count(*) from messages' 2>/dev/null)" = 0 ]; do
        sleep 0.05
    done
    echo "$2: $N messages x 3 recipients drained in $(echo "$(date +%s.%N) - $start" | bc) s"
    kill $relay $sink $proxy; wait $relay $sink $proxy 2>/dev/null || true
    rm -rf "$dir"
}
run "" "PIPELINING offered"
run "-p" "PIPELINING not offered"
