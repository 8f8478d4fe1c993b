#!/usr/bin/env bash
# Distinct-channel churn: subscribe to CHANNELS distinct channels (a thousand per connection)
# and close, twice, sampling the server's RSS and its shardcast_channels gauge. Before issue 9
# the owner kept every channel ever seen (1 million: RSS 91 -> 301 MB, for good).
#
# Usage: perf/channel_churn.sh [CHANNELS]   (default 1000000)
set -euo pipefail
cd "$(dirname "$0")/.."
total=${1:-1000000}
cargo build --release --quiet --bin shardcast
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log=$(mktemp)
SHARDCAST_SHARDS=2 taskset -c 0 ./target/release/shardcast --config perf/bench.toml \
  --listen "127.0.0.1:$port" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 100); do grep -q "listening on" "$log" && break; sleep 0.1; done
metric() {
  curl -s "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1 == m {print $2}'
}
sample() {
  printf '%-28s rss %7s KiB  channels %8s  freed %8s\n' "$1" \
    "$(awk '/VmRSS/ {print $2}' "/proc/$server/status")" \
    "$(metric shardcast_channels)" "$(metric shardcast_channels_freed_total)"
}
sample "start"
for round in 1 2; do
  taskset -c 1 python3 perf/channel_churn.py "127.0.0.1:$port" bench-secret "$total" "r$round-"
  sample "after round $round"
  # The sweep runs at least every second; wait for it to have seen every channel go.
  want=$((round * total))
  for _ in $(seq 1 100); do
    [ "$(metric shardcast_channels_freed_total)" -ge "$want" ] && break
    sleep 0.2
  done
  sample "round $round freed"
done
