#!/usr/bin/env bash
# Dress rehearsal of the real run at the real width, on CPU: runs benches/rehearsal-2b.toml (a
# random model with the exact bitnet-b1.58-2B-4T config in bf16: load, global prune of ~2.1 B
# weights, a chained notebook-rule prune, one eval window each, fine-tunes at full width with 1
# and 2 layers), then runs it again (everything must come back from the cache), and prints each
# stage's seconds and peak resident memory, and the bytes each entry takes.
#
#   scripts/rehearse-2b.sh [WORKDIR]     # default /tmp/rpt-rehearsal-2b; ~21 GB of disk, ~16 GB RAM
#
# RPT_FLOW_BIN picks the binary (default: target/release/rpt-flow, built if missing).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/rpt-rehearsal-2b}
bin=${RPT_FLOW_BIN:-$repo/target/release/rpt-flow}
if [ ! -x "$bin" ]; then
    cargo build --release --bin rpt-flow --manifest-path "$repo/Cargo.toml"
fi
export CANDLE_NUM_THREADS=${CANDLE_NUM_THREADS:-1} RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1}
mkdir -p "$work"
cd "$work"
pipeline=$repo/benches/rehearsal-2b.toml

echo "== machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, load $(cut -d' ' -f1-3 /proc/loadavg), threads $CANDLE_NUM_THREADS"
echo "== $("$bin" --version), commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)"

echo "== first run"
t0=$(date +%s)
"$bin" run "$pipeline" --cache cache --sessions sessions
t1=$(date +%s)
echo "== second run (must be all cached)"
"$bin" run "$pipeline" --cache cache --sessions sessions-again | tee again.log
t2=$(date +%s)
grep -q "nothing to compute" again.log || { echo "the second run computed something: keys moved" >&2; exit 1; }
echo "== first run ${t1}s-${t0}s = $((t1 - t0)) s, second run $((t2 - t1)) s"

echo "== per stage (first run)"
session=$(ls -t sessions/*/rehearsal-2b.json | head -1)
if command -v python3 >/dev/null; then
    python3 - "$session" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"{'stage':<18} {'kind':<10} {'seconds':>9} {'peak GiB':>9}")
for name, st in s["stages"].items():
    peak = st.get("peak_rss_mb")
    print(f"{name:<18} {st.get('kind', ''):<10} {st.get('seconds', 0):>9.1f} {peak / 1024 if peak else float('nan'):>9.2f}")
PY
else
    echo "(python3 not found: read $session)"
fi
echo "== cache"
"$bin" cache ls --cache cache
