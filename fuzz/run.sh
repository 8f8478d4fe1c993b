#!/usr/bin/env bash
# Run every fuzz target for SECONDS (default 60) from its committed corpus; a crash fails.
# Needs the nightly toolchain (for the sanitizer flags) and cargo-fuzz, installed if absent.
# New inputs are written to a scratch corpus, so the committed one stays as it is (see
# fuzz/README.md for adding what a long run found).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "!! no nightly toolchain: fuzzing needs one"
  if [ "${CI:-}" = "true" ]; then exit 1; fi
  echo "!! SKIPPED fuzzing"
  exit 0
fi
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
cargo +nightly fuzz build -O
for target in $(cargo +nightly fuzz list); do
  scratch=$(mktemp -d)
  echo "-- $target"
  cargo +nightly fuzz run -O "$target" "$scratch" "corpus/$target" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 2>&1 |
    grep -E "^(#[0-9]+ +DONE|Done|stat::number_of_executed_units)|ERROR|panicked|SUMMARY|Test unit written" || true
  status=${PIPESTATUS[0]}
  rm -rf "$scratch"
  [ "$status" -eq 0 ] || { echo "!! $target failed (see fuzz/artifacts/$target)"; exit 1; }
done
