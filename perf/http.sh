#!/usr/bin/env bash
# The server API's cost (issue 14): POST /api/publish with wrk on keep-alive connections (1,
# then 64), and the latency of POST /api/users/{id}/send to a connected user
# (perf/http_client.py). Server pinned to core 0 (perf/bench.toml, one shard, storage
# "memory"), load on core 1, RUNS runs of each; prints each run and the medians.
#
# Usage: perf/http.sh [RUNS] [SECONDS]      (default 5 runs of 10 s)
# wrk comes from Debian's packages (apt-get install wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
secs=${2:-10}
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk"; exit 1; }
cargo build --release --quiet --bin shardcast
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RUST_LOG=warn SHARDCAST_AUTH__JWT_SECRET=bench-jwt-secret taskset -c 0 target/release/shardcast \
  --config perf/bench.toml --listen "127.0.0.1:$port" >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/health/ready" && break; sleep 0.1; done
median() { sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
for conns in 1 64; do
  rps=() p99=()
  for run in $(seq 1 "$runs"); do
    out=$(taskset -c 1 wrk -t1 -c"$conns" -d"${secs}s" --latency -s perf/http_publish.lua \
      "http://127.0.0.1:$port/api/publish")
    r=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p=$(echo "$out" | awk '$1 == "99%" {v = $2; if (v ~ /us$/) {sub(/us/, "", v); v /= 1000} else if (v ~ /ms$/) {sub(/ms/, "", v)} else if (v ~ /s$/) {sub(/s/, "", v); v *= 1000}; print v}')
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
    echo "POST /api/publish, $conns connection(s), run $run: $r requests/s, p99 $p ms${non2xx:+, NON-2XX $non2xx}"
    rps+=("$r") p99+=("$p")
  done
  echo "  median: $(printf '%s\n' "${rps[@]}" | median) requests/s, p99 $(printf '%s\n' "${p99[@]}" | median) ms"
done
for run in $(seq 1 "$runs"); do
  taskset -c 1 python3 perf/http_client.py send "127.0.0.1:$port" bench-secret bench-jwt-secret 2000
done
