#!/usr/bin/env bash
# A perf profile of one PoP while changes propagate: `flagmesh-bench
# propagation` over 1 hub x 10 PoPs and 1,000 changes, with `perf record`
# on PoP 3 for 20 s of the change phase. Writes the recording, the
# benchmark's output and a report (time by shared object and symbol) to
# target/bench-results/pop-profile/. BENCHMARKS.md is left as it was (the
# propagation run would otherwise rewrite its table with this small mesh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bench-results/pop-profile
mkdir -p "$out"
cp BENCHMARKS.md "$out/BENCHMARKS.md.before"
restore() { cp "$out/BENCHMARKS.md.before" BENCHMARKS.md; }
trap restore EXIT
./target/release/flagmesh-bench --data target/bench-data/profile propagation \
  --hubs 1 --pops-per-hub 10 --changes 1000 >"$out/bench.log" 2>&1 &
bench=$!
pid=
for _ in $(seq 1 600); do
  pid=$(pgrep -f 'flagmesh-pop .*bench-data/profile/.*pop-3' | head -1 || true)
  [ -n "$pid" ] && break
  sleep 0.1
done
[ -n "$pid" ] || { echo "no PoP process found; see $out/bench.log" >&2; exit 1; }
# the mesh converges and the changes start a few seconds after the PoPs
sleep 8
perf record -F 2000 -g -p "$pid" -o "$out/perf.data" -- sleep 20
wait "$bench"
perf report -i "$out/perf.data" --no-children --sort dso,symbol --stdio >"$out/report.txt" 2>/dev/null
grep -E 'propagation:' "$out/bench.log" || true
echo "profile: $out/report.txt (recording: $out/perf.data)"
