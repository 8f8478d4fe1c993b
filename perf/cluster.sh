#!/usr/bin/env bash
# Fan-out across cluster nodes (issue 12), against the same load on one node. Each run has
# three setups, interleaved:
#   single:  one node, no Redis (publishers and subscribers on it);
#   cluster: one node in cluster mode (publishers and subscribers on it, through Redis);
#   cross:   publishers on node A, subscribers on node B, through Redis.
# A redis-server of its own (a free port, nothing on disk). Core 0: the subscribers' node.
# Core 1: node A, Redis and the load tool (the machine has two cores).
#
# Usage: perf/cluster.sh RUNS [fanout args...]
#   perf/cluster.sh 5 -n 1000 -r 1000 -d 5      (1,000 subscribers, 1,000 msg/s)
#   perf/cluster.sh 5 -n 1000 -w 64 -d 5        (as fast as a window of 64 allows)
# Prints per setup the median (min..max) of each figure; Redis CPU per publish (INFO cpu
# before and after) and publishes per Redis round trip (the publishing node's /metrics).
# Raw reports go to perf/results/cluster/.
set -euo pipefail
cd "$(dirname "$0")/.."
source perf/medians.sh
runs=${1:?usage: perf/cluster.sh RUNS [fanout args...]}
shift
cargo build --release --quiet --workspace
out=perf/results/cluster
rm -rf "$out" && mkdir -p "$out"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_health() { for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$1/health/ready" && return; sleep 0.1; done; }
redis_port=$(free_port)
taskset -c 1 redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --daemonize no >/dev/null 2>&1 &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis_cpu() { redis-cli -p "$redis_port" info cpu | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.6f", s}'; }
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" 'index($0, m) == 1 {print $2; exit}'; }
node() { # core port cluster(0|1) prefix
  local env=(RUST_LOG=warn)
  if [ "$3" = 1 ]; then
    env+=(SHARDCAST_CLUSTER__REDIS_URL="redis://127.0.0.1:$redis_port"
      SHARDCAST_CLUSTER__PREFIX="$4")
  fi
  env "${env[@]}" taskset -c "$1" target/release/shardcast --config perf/bench.toml \
    --listen "127.0.0.1:$2" >/dev/null 2>&1 &
  echo $!
}
setups=(single cluster cross)
for run in $(seq 1 "$runs"); do
  for setup in "${setups[@]}"; do
    b_port=$(free_port)
    cluster=1
    [ "$setup" = single ] && cluster=0
    prefix="bench.$setup.$run"
    b_pid=$(node 0 "$b_port" "$cluster" "$prefix")
    wait_health "$b_port"
    publish=()
    a_pid=""
    a_port=$b_port
    if [ "$setup" = cross ]; then
      a_port=$(free_port)
      a_pid=$(node 1 "$a_port" 1 "$prefix")
      wait_health "$a_port"
      publish=(--publish-addr "127.0.0.1:$a_port")
    fi
    cpu_before=$(redis_cpu)
    taskset -c 1 target/release/shardcast-bench fanout "$@" --addr "127.0.0.1:$b_port" \
      "${publish[@]}" --pid "$b_pid" >"$out/$setup-$run.txt" 2>&1 || true
    cpu_after=$(redis_cpu)
    if [ "$cluster" = 1 ]; then
      publishes=$(metric "$a_port" "shardcast_cluster_publishes_total")
      trips=$(metric "$a_port" "shardcast_cluster_publish_round_trips_total")
      awk -v b="$cpu_before" -v a="$cpu_after" -v p="${publishes:-0}" -v t="${trips:-0}" 'BEGIN {
        if (p > 0) printf "  %-28s %.3f µs\n", "redis cpu per publish", (a - b) * 1e6 / p;
        if (t > 0) printf "  %-28s %.1f \n", "publishes per round trip", p / t }' >>"$out/$setup-$run.txt"
    fi
    kill "$b_pid" ${a_pid:+"$a_pid"}
    wait "$b_pid" ${a_pid:+"$a_pid"} 2>/dev/null || true
  done
done
figures="deliveries/s;server cpu per delivery;latency p50;latency p99;latency p99.9;redis cpu per publish;publishes per round trip"
for setup in "${setups[@]}"; do
  medians "$setup" "$figures" "$out/$setup-"*.txt
done
