#!/usr/bin/env bash
# Churn soak: fan-out to 100 subscribers while connections open and close at a steady rate
# and one subscriber reads slowly; the server's RSS and open file descriptors are sampled
# before, during and after. Server pinned to core 0, load on core 1 (perf/bench.toml).
#
# Usage: perf/soak.sh [SECONDS] [--check]
#   perf/soak.sh 600            # the 10-minute soak recorded in docs/BENCHMARKS.md
#   perf/soak.sh 60 --check     # CI: fails unless fds return to their baseline and RSS at the
#                               # end is within 10% of RSS once warm (a tenth of the way in)
# Writes perf/results/soak-SECONDS.csv (seconds, rss_kib, fds, connections).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
check=${2:-}
out=perf/results
mkdir -p "$out"
csv="$out/soak-$secs.csv"
cargo build --release --quiet --workspace
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log=$(mktemp)
taskset -c 0 ./target/release/shardcast --config perf/bench.toml --listen "127.0.0.1:$port" >"$log" 2>&1 &
server=$!
slow=""
trap 'kill $server $slow 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 100); do grep -q "listening on" "$log" && break; sleep 0.1; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$server/status"; }
fds() { ls "/proc/$server/fd" | wc -l; }
conns() {
  curl -s "http://127.0.0.1:$port/metrics" | awk '/^shardcast_connections_active / {print $2}'
}
echo "seconds,rss_kib,fds,connections" >"$csv"
sample() { echo "$1,$(rss),$(fds),$(conns)" | tee -a "$csv"; }
sample 0
before_fds=$(fds)
before_rss=$(rss)
python3 perf/slow_subscriber.py "127.0.0.1:$port" bench-secret org:bench0:usage &
slow=$!
taskset -c 1 ./target/release/shardcast-bench churn --addr "127.0.0.1:$port" -n 100 -r 2000 \
  -s 200 --churn 200 -d "$secs" --pid "$server" --json "$out/soak-$secs.json" >"$out/soak-$secs.txt" &
load=$!
start=$(date +%s)
warm_rss=""
while kill -0 $load 2>/dev/null; do
  sleep 5
  t=$(( $(date +%s) - start ))
  line=$(sample "$t")
  if [ -z "$warm_rss" ] && [ "$t" -ge $(( secs / 10 )) ]; then warm_rss=$(echo "$line" | cut -d, -f2); fi
  last_rss=$(echo "$line" | cut -d, -f2)
done
wait $load
kill $slow 2>/dev/null || true
wait $slow 2>/dev/null || true
slow=""
# Closed connections leave the server's fd table within a sweep.
for _ in $(seq 1 100); do [ "$(fds)" -le "$before_fds" ] && break; sleep 0.1; done
t=$(( $(date +%s) - start ))
sample "$t"
after_fds=$(fds)
after_rss=$(rss)
cat "$out/soak-$secs.txt"
echo "fds: before $before_fds, after $after_fds"
echo "RSS KiB: before $before_rss, warm $warm_rss, end of load $last_rss, after $after_rss"
if [ "$check" = "--check" ]; then
  [ "$after_fds" -le "$before_fds" ] || { echo "!! fds did not return: $before_fds -> $after_fds"; exit 1; }
  limit=$(( warm_rss + warm_rss / 10 ))
  [ "$last_rss" -le "$limit" ] || { echo "!! RSS grew: warm $warm_rss KiB, end $last_rss KiB"; exit 1; }
  echo "soak check passed"
fi
