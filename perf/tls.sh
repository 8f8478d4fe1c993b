#!/usr/bin/env bash
# TLS beside plain, the same server and build, interleaved: 1,000 connections opened (accept
# rate, server CPU per connection: its handshake), then fan-out to 1,000 subscribers
# (deliveries/s, server CPU per delivery, p99), each over ws:// and wss://, medians of RUNS
# runs (default 3). One shard on core 0, the load on core 1. A CA and an ECDSA P-256
# certificate are made by openssl for the run.
#   perf/tls.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
. perf/medians.sh
runs=${1:-3}
cargo build --release --quiet --workspace
out=perf/results/tls
rm -rf "$out" && mkdir -p "$out"
pki=$(mktemp -d)
trap 'rm -rf "$pki"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=bench CA" -keyout "$pki/ca.key" -out "$pki/ca.pem" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
  -keyout "$pki/server.key" -out "$pki/server.csr" 2>/dev/null
echo "subjectAltName=DNS:localhost,IP:127.0.0.1" >"$pki/ext"
openssl x509 -req -in "$pki/server.csr" -days 2 -CA "$pki/ca.pem" -CAkey "$pki/ca.key" \
  -CAcreateserial -extfile "$pki/ext" -out "$pki/server.pem" 2>/dev/null
config="$pki/bench.toml"
{ cat perf/bench.toml; printf '\n[tls]\nlisten = "127.0.0.1:0"\ncert = "%s"\nkey = "%s"\n' \
  "$pki/server.pem" "$pki/server.key"; } >"$config"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A scenario=([connect]="connect -n 1000 -c 64" [fanout]="fanout -n 1000 -d 5")
for run in $(seq 1 "$runs"); do
  for name in connect fanout; do
    for scheme in ws wss; do
      port=$(free_port)
      tls_port=$(free_port)
      SHARDCAST_TLS__LISTEN="127.0.0.1:$tls_port" RUST_LOG=warn taskset -c 0 \
        target/release/shardcast --config "$config" --listen "127.0.0.1:$port" >/dev/null 2>&1 &
      pid=$!
      for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/health" && break; sleep 0.1; done
      args=(--addr "127.0.0.1:$port")
      [ "$scheme" = wss ] && args=(--addr "127.0.0.1:$tls_port" --tls-ca "$pki/ca.pem")
      # shellcheck disable=SC2086
      taskset -c 1 target/release/shardcast-bench ${scenario[$name]} "${args[@]}" --pid "$pid" \
        >"$out/$name-$scheme-$run.txt" 2>&1 || true
      kill "$pid"; wait "$pid" 2>/dev/null || true
    done
  done
done
for scheme in ws wss; do
  medians "connect $scheme" "connect rate;server cpu per connection;server cpu busy;client cpu busy;server rss per connection" "$out/connect-$scheme"-*.txt
  medians "fanout $scheme" "deliveries/s;server cpu per delivery;p99;server cpu busy;client cpu busy" "$out/fanout-$scheme"-*.txt
done
