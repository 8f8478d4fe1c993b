#!/usr/bin/env bash
# Idle connections authenticated with an API key and with a JWT each (a user of its own, as
# browsers connect), interleaved: server RSS per connection and connect rate, medians of
# RUNS runs (default 3). One shard on core 0, the load on core 1.
#   perf/jwt_connect.sh [RUNS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
. perf/medians.sh
runs=${1:-3}
n=${2:-19900}
cargo build --release --quiet --workspace
out=perf/results/jwt_connect
rm -rf "$out" && mkdir -p "$out"
secret=bench-jwt-secret
for run in $(seq 1 "$runs"); do
  for mode in key jwt; do
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    SHARDCAST_AUTH__JWT_SECRET=$secret RUST_LOG=warn taskset -c 0 target/release/shardcast \
      --config perf/bench.toml --listen "127.0.0.1:$port" >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/health" && break; sleep 0.1; done
    extra=()
    [ "$mode" = jwt ] && extra=(--jwt-secret "$secret")
    taskset -c 1 target/release/shardcast-bench connect -n "$n" -c 256 "${extra[@]}" \
      --addr "127.0.0.1:$port" --pid "$pid" >"$out/$mode-$run.txt" 2>&1 || true
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
for mode in key jwt; do
  medians "$mode" "server rss per connection;connect rate;latency p99" "$out/$mode"-*.txt
done
