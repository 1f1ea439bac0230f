#!/usr/bin/env bash
# End-to-end test of the compose deployment in cluster/: brings the three containers up,
# claims an ID, keeps an agent registered, kills the agent's node and checks the agent is
# registered on another node, partitions a node (docker network disconnect) and heals it,
# checks all three nodes hold the same tables, and tears everything down (also on failure).
#
# Needs a Docker engine and docker-compose (or `docker compose`). Builds the image with
# scripts/cluster-image.sh, so nothing is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."

if docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose_cmd=(docker-compose)
else
  echo "compose-test: no docker compose tool found" >&2
  exit 1
fi

image=agentreg:compose-test
project=agentreg-ct-$$
work=$(mktemp -d)
agent_cid=
log() { echo "compose-test: $*" >&2; }

compose() {
  AGENTREG_IMAGE=$image AGENTREG_TLS_DIR=$work/tls AGENTREG_SECRETS_DIR=$work/secrets \
    AGENTREG_RESTART=no AGENTREG_NODE1_PORT=$p1 AGENTREG_NODE2_PORT=$p2 AGENTREG_NODE3_PORT=$p3 \
    AGENTREG_NODE1_METRICS=$m1 AGENTREG_NODE2_METRICS=$m2 AGENTREG_NODE3_METRICS=$m3 \
    "${compose_cmd[@]}" -f cluster/docker-compose.yml -p "$project" "$@"
}

cleanup() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    log "FAILED; node logs follow"
    compose logs --no-color --tail 60 2>/dev/null || true
    [ -n "$agent_cid" ] && docker logs --tail 30 "$agent_cid" 2>&1 | sed 's/^/[agent] /' || true
  fi
  [ -n "$agent_cid" ] && docker rm -f -v "$agent_cid" >/dev/null 2>&1 || true
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  docker image rm "$image" >/dev/null 2>&1 || true
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Free host ports for the published ports (the test itself talks inside the network).
read -r p1 p2 p3 m1 m2 m3 < <(python3 - <<'PY'
import socket
socks, ports = [], []
for kind in (socket.SOCK_DGRAM,) * 3 + (socket.SOCK_STREAM,) * 3:
    s = socket.socket(socket.AF_INET, kind); s.bind(("127.0.0.1", 0)); socks.append(s)
    ports.append(str(s.getsockname()[1]))
print(" ".join(ports))
PY
)

log "building image $image"
bash scripts/cluster-image.sh "$image" >/dev/null
bin=target/release/agentreg

# TLS material and the HMAC secret, readable by the image's user (uid 10001).
"$bin" dev-certs --out "$work/tls" >/dev/null
mkdir -p "$work/secrets" "$work/agent"
# Text (base64), so that no trailing byte is whitespace, which the node does not count.
head -c 32 /dev/urandom | base64 > "$work/secrets/hmac_secret"
if [ "$(id -u)" = 0 ]; then
  chown -R 10001:10001 "$work/tls" "$work/secrets" "$work/agent"
else
  chmod -R a+rX "$work/tls" "$work/secrets"; chmod a+rwx "$work/agent"
fi

log "starting the cluster (project $project)"
compose up -d --no-build >/dev/null 2>&1
cid() { compose ps -q "$1"; }
net=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "$(cid node1)")

# Runs the agentreg CLI in a throwaway container on the cluster's network.
ctl() {
  docker run --rm --network "$net" -v "$work/tls:/tls:ro" -v "$work/agent:/agent" \
    -e AGENTREG_CA=/tls/ca.pem -e AGENTREG_CERT=/tls/operator.pem -e AGENTREG_KEY=/tls/operator.key \
    -e AGENTREG_ENDPOINTS="${endpoints:-node1:7000,node2:7000,node3:7000}" \
    "$image" "$@"
}

# Retries "$@" (quietly) until it succeeds or $1 seconds pass.
eventually() {
  local secs=$1; shift
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      log "gave up after ${secs}s waiting for: $*"
      "$@" || true
      return 1
    fi
    sleep 1
  done
}

# True when every node answers status, one leads, and all report the same applied index
# and the same digest of their tables.
converged() {
  ctl status --json > "$work/status.json" 2>/dev/null || return 1
  python3 - "$work/status.json" "${1:-3}" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1])); want = int(sys.argv[2])
ok = [r["status"] for r in rows if "status" in r]
if len(ok) != want: sys.exit(1)
if sum(s["role"] == "leader" for s in ok) != 1: sys.exit(1)
if len({(s["applied_index"], s["state_digest"]) for s in ok}) != 1: sys.exit(1)
PY
}

# The node the agent's session is on, as every reachable node's tables say.
session_node() {
  ctl claims --json show compose-agent 2>/dev/null |
    python3 -c 'import json,sys; s=json.load(sys.stdin)["session"]; print(s["node_id"] if s else "")'
}
on_node() { [ "$(session_node)" = "$1" ]; }
not_on_node() { local n; n=$(session_node); [ -n "$n" ] && [ "$n" != "$1" ]; }

log "waiting for a leader and three caught-up nodes"
eventually 90 converged

log "claiming compose-agent and registering it on node 1"
endpoints=node1:7000 ctl agent claim --id compose-agent --out /agent/cert.json >/dev/null
agent_cid=$(docker run -d --network "$net" -v "$work/tls:/tls:ro" -v "$work/agent:/agent" \
  "$image" agent --endpoints node1:7000,node2:7000,node3:7000 --ca /tls/ca.pem \
  run --id compose-agent --cert /agent/cert.json)
eventually 30 on_node 1

log "killing node 1; the agent must be registered on another node"
compose kill node1 >/dev/null 2>&1
eventually 60 not_on_node 1
log "agent now on node $(session_node)"

log "restarting node 1"
compose start node1 >/dev/null 2>&1
eventually 90 converged

victim=3
[ "$(session_node)" = 3 ] && victim=2
log "partitioning node $victim from the others"
docker network disconnect "$net" "$(cid node$victim)"
# The majority elects a leader (if it lost it) and goes on serving.
eventually 60 converged 2
others=node$(( victim % 3 + 1 )):7000,node$(( (victim + 1) % 3 + 1 )):7000
endpoints=$others ctl agent claim --id compose-during-partition --out /agent/p.json >/dev/null
log "a claim committed on the majority side"

log "healing node $victim"
docker network connect --alias "node$victim" "$net" "$(cid node$victim)"
eventually 90 converged
endpoints=node$victim:7000 ctl claims show compose-during-partition >/dev/null
on_node "$(session_node)"
log "all three nodes agree: applied index $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["status"]["applied_index"])' "$work/status.json")"
log "PASS"
