#!/usr/bin/env bash
# Run one scenario against shardcast and each reference server, server pinned to core 0 and
# load to core 1, and print one table (plus perf/results/<scenario>-<server>.json and a plot
# named for the scenario and its arguments).
#
# Usage: perf/compare.sh SCENARIO [shardcast-bench args...]
#   perf/compare.sh fanout -n 1000 -d 5            # as fast as a 64-message window allows
#   perf/compare.sh fanout -n 1000 -r 100 -d 10    # 100 messages/s
#   perf/compare.sh connect -n 10000
# SERVERS="shardcast tokio" limits the servers (default: shardcast tokio node-ws socketio);
# shardcast-socketio is shardcast with Socket.IO clients (its /socket.io/ dialect).
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=${1:?usage: perf/compare.sh SCENARIO [args...]}
shift
servers=${SERVERS:-"shardcast tokio node-ws socketio"}
out=perf/results
mkdir -p "$out"
cargo build --release --quiet --workspace
case " $servers " in *" tokio "*|*" node-ws "*|*" socketio "*) perf/reference/setup.sh >/dev/null ;; esac

wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "server on port $1 did not start" >&2
  return 1
}

files=()
for server in $servers; do
  case $server in
    shardcast) port=8080; proto=shardcast
      cmd=(./target/release/shardcast --config perf/bench.toml --listen "127.0.0.1:$port") ;;
    shardcast-socketio) port=8080; proto=shardcast-socketio
      cmd=(./target/release/shardcast --config perf/bench.toml --listen "127.0.0.1:$port") ;;
    tokio) port=8081; proto=broadcast
      cmd=(perf/reference/tokio-broadcast/target/release/tokio-broadcast "$port" 4096) ;;
    node-ws) port=8082; proto=broadcast
      cmd=(node perf/reference/node/ws-server.js "$port") ;;
    socketio) port=8083; proto=socketio
      cmd=(node perf/reference/node/socketio-server.js "$port") ;;
    *) echo "unknown server $server" >&2; exit 2 ;;
  esac
  RUST_LOG=warn taskset -c 0 "${cmd[@]}" >/dev/null 2>&1 &
  pid=$!
  wait_port $port
  file="$out/$scenario-$server.json"
  echo "== $scenario against $server" >&2
  taskset -c 1 ./target/release/shardcast-bench --json "$file" "$scenario" \
    --addr "127.0.0.1:$port" --proto "$proto" --pid "$pid" --label "$server" "$@" >/dev/null || true
  kill $pid 2>/dev/null; wait $pid 2>/dev/null || true
  [ -f "$file" ] && files+=("$file")
done
./target/release/shardcast-bench table "${files[@]}"
if [ "$scenario" != connect ]; then
  # One plot per scenario and arguments: "fanout -n 1000 -r 100" -> fanout-n-1000-r-100.svg
  plot="$out/$scenario$(printf -- '-%s' "$@" | tr -cs 'a-zA-Z0-9.\n' '-' | sed 's/-*$//').svg"
  ./target/release/shardcast-bench plot "${files[@]}" -o "$plot" \
    --title "$scenario: publish → deliver latency ($*)"
  echo "plot: $plot"
fi
