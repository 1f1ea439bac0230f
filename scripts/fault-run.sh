#!/usr/bin/env bash
# A long fault-injection run against three agentreg processes (tests/fault): kills, pauses,
# partitions (both ways and one way) and leader isolation under a concurrent workload, then
# the history checker.
#
#   scripts/fault-run.sh [SECONDS] [SEED]      (defaults: 1800 s, a random seed)
#
# Prints the seed first; a failure prints the seed, the fault schedule, the violating slice of
# history and where the node logs were kept. The summary (operations by kind and outcome,
# faults, violations) is also written to fault-run-<seed>.txt. AGENTREG_FAULT_LOG=<filter>
# sets the nodes' log filter (RUST_LOG syntax, e.g. info to see openraft's elections) and
# keeps the node logs.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-${AGENTREG_FAULT_SECS:-1800}}
seed=${2:-${AGENTREG_FAULT_SEED:-$(( (RANDOM << 15) | RANDOM ))}}
summary=${AGENTREG_FAULT_SUMMARY:-$PWD/fault-run-$seed.txt}
echo "fault-run: seed $seed, $secs s; summary in $summary"
AGENTREG_FAULT_SECS=$secs AGENTREG_FAULT_SEED=$seed AGENTREG_FAULT_SUMMARY=$summary \
  cargo test --release --locked --test fault long_run -- --ignored --nocapture
