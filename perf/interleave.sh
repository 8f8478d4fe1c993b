#!/usr/bin/env bash
# Old and new builds interleaved: for each run, every scenario against the build of OLD, then
# against this checkout's, with the same (this checkout's) load tool; server pinned to core 0,
# load to core 1, perf/bench.toml. Prints, per scenario and build, the median and range of
# server CPU per delivery/ack, throughput, p99 latency and RSS per connection, where reported.
#
# Usage: perf/interleave.sh OLD_COMMIT [RUNS]      (default 10 runs)
#   perf/interleave.sh 9a4e2c3 10
# SCENARIOS overrides the scenarios, separated by ";" (default: fan-out, fan-out read 4 KiB
# at a time, in-memory ingest). Raw reports go to perf/results/interleave/.
# FLOOR=1 adds a third build, perf/src/floor.rs (the least a server can do for the same load;
# fan-out scenarios run against it with --proto broadcast). CONFIG overrides perf/bench.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
source perf/medians.sh
old=${1:?usage: perf/interleave.sh OLD_COMMIT [RUNS]}
runs=${2:-10}
IFS=';' read -r -a scenarios <<<"${SCENARIOS:-fanout -n 1000 -d 5;fanout -n 1000 -d 5 --read-bytes 4096;ingest -p 64 -w 16 -d 5}"
tree=target/interleave-$old
if [ ! -d "$tree" ]; then git worktree add --detach "$tree" "$old" >/dev/null; fi
(cd "$tree" && CARGO_TARGET_DIR="$PWD/target" cargo build --release --quiet --bin shardcast)
cargo build --release --quiet --workspace
out=perf/results/interleave
rm -rf "$out" && mkdir -p "$out"
declare -A bin=([old]="$tree/target/release/shardcast" [new]=target/release/shardcast)
builds=(old new)
[ -z "${FLOOR:-}" ] || builds+=(floor)
config=${CONFIG:-perf/bench.toml}
for run in $(seq 1 "$runs"); do
  for build in "${builds[@]}"; do
    for i in "${!scenarios[@]}"; do
      port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
      extra=()
      if [ "$build" = floor ]; then
        taskset -c 0 target/release/shardcast-floor "127.0.0.1:$port" >/dev/null 2>&1 &
        case "${scenarios[$i]}" in fanout*) extra=(--proto broadcast) ;; esac
      else
        RUST_LOG=warn taskset -c 0 "${bin[$build]}" --config "$config" \
          --listen "127.0.0.1:$port" >/dev/null 2>&1 &
      fi
      pid=$!
      for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/health" && break; sleep 0.1; done
      # shellcheck disable=SC2086
      taskset -c 1 target/release/shardcast-bench ${scenarios[$i]} "${extra[@]}" --addr "127.0.0.1:$port" \
        --pid "$pid" >"$out/$build-$i-$run.txt" 2>&1 || true
      kill "$pid"; wait "$pid" 2>/dev/null || true
    done
  done
done
# Per scenario and build: the median (min..max) over the runs of each figure the reports have.
figures="server cpu per delivery;server cpu busy;deliveries/s;acks/s;connect rate;latency p99;latency p99.9;server rss per connection;server lag p99 (bucket);server polls >= 1 ms"
for i in "${!scenarios[@]}"; do
  echo "${scenarios[$i]}"
  for build in "${builds[@]}"; do
    medians "  $build" "$figures" "$out/$build-$i-"*.txt
  done
done
