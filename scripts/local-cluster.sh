#!/usr/bin/env bash
# Builds agentreg and runs a three-node cluster on 127.0.0.1 (UDP 7101-7103).
# First run: writes dev TLS material and node configs to .local-cluster/ (or $AGENTREG_LOCAL_DIR).
# Later runs reuse them and the nodes' sled data. Ctrl-C stops all three cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${AGENTREG_LOCAL_DIR:-.local-cluster}
cargo build --release --quiet
bin=$PWD/target/release/agentreg

"$bin" dev-cluster --dir "$dir" >/dev/null
pids=()
stop() {
  trap - INT TERM
  echo "stopping the cluster..." >&2
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  echo "stopped; data kept in $dir/data" >&2
}
trap stop INT TERM

for i in 1 2 3; do
  # $! must be the node itself (not a pipeline's last command) so that stop() signals it.
  "$bin" node --config "$dir/node$i.toml" > >(sed -u "s/^/[node$i] /") 2>&1 &
  pids+=($!)
done

cat <<MSG
agentreg local cluster running
  nodes     127.0.0.1:7101  127.0.0.1:7102  127.0.0.1:7103  (QUIC, ALPN agentreg/1)
  metrics   http://127.0.0.1:8101/metrics  (8102, 8103; also /healthz, /readyz)
  CA        $dir/tls/ca.pem
  operator  $dir/tls/operator.pem, $dir/tls/operator.key
  status    $bin status
Ctrl-C stops all three.
MSG
wait
