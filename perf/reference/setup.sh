#!/usr/bin/env bash
# Build the reference servers from the registries (npm, crates.io). Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
(cd node && npm install --no-audit --no-fund --silent)
(cd tokio-broadcast && cargo build --release --quiet)
echo "reference servers ready"
