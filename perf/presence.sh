#!/usr/bin/env bash
# Presence and exclusive sessions (issue 13), with perf/presence_client.py:
#   - kill switch: an exclusive session moved ROUNDS times from node A (core 0) to node B
#     (core 1) through a redis-server of its own (core 1): READY of the newer connection to
#     the close of the older, and the holder node's shardcast_session_kill_latency_seconds;
#   - PRESENCE with MEMBERS members: one node alone (core 0), then node A in cluster mode
#     (PRESENCE read from Redis).
# perf/bench.toml with an exclusive key added. The client runs on core 1.
#
# Usage: perf/presence.sh [ROUNDS] [MEMBERS]      (default 200 and 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-200}
members=${2:-10000}
cargo build --release --quiet --bin shardcast
config=$(mktemp --suffix=.toml)
trap 'rm -f "$config"; kill $(jobs -p) 2>/dev/null || true' EXIT
cat perf/bench.toml - >"$config" <<'EOF'

[[api_keys]]
id = "solo"
secret = "solo-secret"
org = "bench"
scopes = ["subscribe", "publish"]
session = "exclusive"
EOF
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$1/health/ready" && return; sleep 0.1; done; }
node() { # core port cluster(0|1)
  # The members do not read: each JOIN of the others waits in a queue of 64 at most.
  local env=(RUST_LOG=warn SHARDCAST_LIMITS__OUTBOUND_QUEUE_MESSAGES=64)
  if [ "$3" = 1 ]; then
    env+=(SHARDCAST_CLUSTER__REDIS_URL="redis://127.0.0.1:$redis_port" SHARDCAST_CLUSTER__PREFIX="presence.$$")
  fi
  env "${env[@]}" taskset -c "$1" target/release/shardcast --config "$config" \
    --listen "127.0.0.1:$2" >/dev/null 2>&1 &
  wait_ready "$2"
}
one=$(free_port)
node 0 "$one" 0
echo "one node:"
taskset -c 1 python3 perf/presence_client.py presence "127.0.0.1:$one" bench-secret "$members"
kill %1
wait %1 2>/dev/null || true
echo "two nodes through Redis:"
redis_port=$(free_port)
taskset -c 1 redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --daemonize no >/dev/null 2>&1 &
for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
a=$(free_port) b=$(free_port)
node 0 "$a" 1
node 1 "$b" 1
taskset -c 1 python3 perf/presence_client.py kill "127.0.0.1:$a" "127.0.0.1:$b" solo-secret "$rounds"
# Counters reach /metrics every 100 ms: wait for every takeover to be there.
kills() { curl -s "http://127.0.0.1:$a/metrics" | awk '/^shardcast_session_kill_latency_seconds_count/ {print $2}'; }
for _ in $(seq 1 50); do [ "$(kills)" -ge "$rounds" ] && break; sleep 0.1; done
curl -s "http://127.0.0.1:$a/metrics" | grep '^shardcast_session_kill_latency_seconds' |
  awk '{print "  node A " $0}' | grep -E 'le="0.001"|le="0.0025"|le="0.005"|le="0.01"|_count' || true
used() { redis-cli -p "$redis_port" info memory | awk -F: '/^used_memory:/ {print $2+0}'; }
before=$(used)
taskset -c 1 python3 perf/presence_client.py presence "127.0.0.1:$a" bench-secret "$members"
echo "  Redis memory for $members members: $(( ($(used) - before) / members )) B per member"
