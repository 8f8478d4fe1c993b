#!/usr/bin/env bash
# Instructions per request of the shard's own work, counted under cachegrind (deterministic,
# unlike timed runs, and these machines have no hardware counters): each probe in
# src/shard/tests/cost.rs runs at 2,000 and 22,000 requests and the difference is divided by
# 20,000, so set-up cancels out. With OLD_COMMIT, that commit is counted too: an older commit
# without the probes gets this checkout's copy of them (it needs the shard simulation,
# src/shard/sim.rs). The counts use the test binary's allocator (glibc's), not the server's
# mimalloc.
#
# Usage: perf/instructions.sh [OLD_COMMIT]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }

# The release test binary of the checkout in $1 (built into its own target/).
test_binary() {
  (cd "$1" && CARGO_TARGET_DIR="$PWD/target" cargo test --release --lib --no-run \
    --message-format=json 2>/dev/null) |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "shardcast" and m.get("executable"):
        print(m["executable"])'
}

count() { # binary probe n
  PROBE_N=$3 valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
    "$1" --ignored --exact "shard::tests::cost::$2" --test-threads=1 2>&1 |
    awk '/I *refs/ {gsub(",", "", $4); print $4}'
}

builds=(new)
declare -A dir=([new]=.)
if [ -n "${1:-}" ]; then
  tree=target/interleave-$1
  if [ ! -d "$tree" ]; then git worktree add --detach "$tree" "$1" >/dev/null; fi
  if [ ! -f "$tree/src/shard/tests/cost.rs" ]; then
    cp src/shard/tests/cost.rs "$tree/src/shard/tests/cost.rs"
    echo "mod cost;" >>"$tree/src/shard/tests/mod.rs"
  fi
  builds=(old new)
  dir[old]=$tree
fi
for build in "${builds[@]}"; do
  bin=$(test_binary "${dir[$build]}")
  for probe in cost_ingest cost_publish; do
    small=$(count "$bin" "$probe" 2000)
    large=$(count "$bin" "$probe" 22000)
    printf '%-4s %-13s %s instructions per request\n' "$build" "$probe" $(((large - small) / 20000))
  done
done
