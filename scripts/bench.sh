#!/usr/bin/env bash
# agentreg and etcd 3.4 side by side on this machine, in one run (see docs/benchmarks.md).
#
#   scripts/bench.sh [agentreg-bench options]     e.g. --secs 10, --only claims,failover,
#                                                  --agents 100000 --heartbeat-ms 10000
#
# Builds agentreg and the bench tool (bench/, its own workspace) in release mode, installs
# etcd 3.4 (Debian's etcd-server) and protoc (for the etcd client's gRPC code) when missing
# and allowed to, then starts three agentreg nodes and three etcd members on loopback, each
# in a temporary directory, and prints the table. Everything it starts is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bench: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "bench: needs ${need[*]} (Debian package names); install them and run again" >&2
    exit 1
  fi
fi

cargo build --release --locked --bin agentreg
(cd bench && cargo build --release --locked)
exec bench/target/release/agentreg-bench \
  --agentreg target/release/agentreg --etcd "$(command -v etcd)" "$@"
