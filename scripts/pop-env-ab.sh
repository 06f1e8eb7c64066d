#!/usr/bin/env bash
# A/B of a PoP setting given as environment, on the bulk OFREP path:
#   scripts/pop-env-ab.sh 'MALLOC_ARENA_MAX=2' '' [ROUNDS]
# Each round starts a mesh (1 control, 1 hub, 1 PoP) with 100 flags
# (country in 5 values AND email ends_with AND sem_ver >, then a 10%
# fractional rollout), runs wrk against the PoP's
# POST /ofrep/v1/evaluate/flags (2 threads, 16 connections, 8 s, a new
# context per request), and prints the PoP's throughput, p99 and CPU time
# (user + system, from /proc) per 1,000 requests; A then B, ROUNDS times
# (default 3). Only the PoP gets the environment (a wrapper in
# FLAGMESH_BIN_DIR), so wrk and the other nodes are the same in A and B.
# Needs `make release` and wrk (`make wrk`).
set -euo pipefail
cd "$(dirname "$0")/.."
a=${1?environment for A, e.g. MALLOC_ARENA_MAX=2}
b=${2-}
rounds=${3:-3}
out=target/bench-results/pop-env-ab
rm -rf "$out" && mkdir -p "$out"
release=$(pwd)/target/release
wrk=$(command -v wrk || echo target/tools/wrk/wrk)

# a folder of node binaries whose PoP runs with the environment $2
bin_dir() {
  mkdir -p "$1"
  for n in flagmesh-control flagmesh-hub flagctl; do ln -sf "$release/$n" "$1/$n"; done
  printf '#!/bin/sh\nexec env %s %s "$@"\n' "$2" "$release/flagmesh-pop" >"$1/flagmesh-pop"
  chmod +x "$1/flagmesh-pop"
}
bin_dir "$out/a" "$a"
bin_dir "$out/b" "$b"

{
  printf '{"metadata":{"flagSetId":"bulk"},"flags":{'
  for i in $(seq 0 99); do
    [ "$i" -gt 0 ] && printf ','
    printf '"flag-%d":{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off","targeting":{"if":[{"and":[{"in":[{"var":"country"},["NL","DE","FR","BE","IN"]]},{"ends_with":[{"var":"email"},"@example.com"]},{"sem_ver":[{"var":"version"},">","1.2.0"]}]},{"fractional":[{"cat":[{"var":"$flagd.flagKey"},{"var":"targetingKey"}]},["on",10],["off",90]]},"off"]}}' "$i"
  done
  printf '}}\n'
} >"$out/flags.json"
cat >"$out/bulk.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["flagd-selector"] = "bulk"
counter = 0
request = function()
  counter = counter + 1
  local body = '{"context":{"targetingKey":"user-' .. counter .. '","country":"IN","email":"u' .. counter .. '@example.com","version":"1.3.0"}}'
  return wrk.format(nil, "/ofrep/v1/evaluate/flags", nil, body)
end
EOF

run() { # label, bin dir
  rm -rf "$out/data"
  FLAGMESH_BIN_DIR=$2 ./target/release/flagmesh-topology --data "$out/data" --hubs 1 \
    --pops-per-hub 1 --flags "$out/flags.json" --control-port 0 >"$out/topology.log" 2>&1 &
  local topology=$!
  for _ in $(seq 1 120); do grep -q '(http ' "$out/topology.log" && break; sleep 0.5; done
  local http pid
  http=$(grep -o '(http [0-9.:]*' "$out/topology.log" | head -1 | cut -d' ' -f2)
  pid=$(pgrep -f "flagmesh-pop .*$out/data" | head -1)
  sleep 1
  local c0 c1 w
  c0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  w=$("$wrk" -t2 -c16 -d8s --latency -s "$out/bulk.lua" "http://$http")
  c1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  kill -INT "$topology"
  wait "$topology" || true
  local requests rps p99 errors
  requests=$(echo "$w" | awk '/requests in/{print $1}')
  rps=$(echo "$w" | awk '/Requests\/sec/{print $2}')
  p99=$(echo "$w" | awk '$1 == "99%" {print $2}')
  errors=$(echo "$w" | awk '/Non-2xx/{print $NF}')
  awk -v l="$1" -v r="$rps" -v p="$p99" -v c0="$c0" -v c1="$c1" -v n="$requests" -v e="${errors:-0}" \
    'BEGIN { printf "%s  req/s %s  p99 %s  PoP CPU per 1,000 requests %.1f ms  non-2xx %s\n", l, r, p, (c1 - c0) * 10 * 1000 / n, e }'
}

for r in $(seq 1 "$rounds"); do
  run "A ($a) round $r" "$out/a"
  run "B (${b:-as built}) round $r" "$out/b"
done
