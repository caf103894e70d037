#!/usr/bin/env bash
# Soak test: kills `rpt-flow run pipelines/progressive.toml --profile tiny` with SIGKILL at N
# random points (seeded), re-running after each kill, lets it finish, and checks that every key
# and metric equals an uninterrupted run's and that `cache verify` is clean. docs/reliability.md
# has the figures.
#
#   scripts/soak.sh N [SEED]      # e.g. scripts/soak.sh 40
set -euo pipefail
n=${1:?usage: scripts/soak.sh N [SEED]}
RANDOM=${2:-1}
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${RPT_FLOW_BIN:-$repo/target/debug/rpt-flow}
[ -x "$bin" ] || cargo build --manifest-path "$repo/Cargo.toml" --bin rpt-flow
export CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=1
pipeline=$repo/pipelines/progressive.toml
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

(cd "$work" && mkdir clean && cd clean && "$bin" run "$pipeline" -p tiny -q >/dev/null)
start=$SECONDS
(cd "$work" && "$bin" run "$pipeline" -p tiny -q --cache c0 --sessions s0 >/dev/null)
full=$((SECONDS - start))
# Delays up to twice a run's length divided by N: the N kills spread over the whole run (each
# re-run continues where the last one stopped).
span=$(( (2 * full * 10) / n + 2 ))
echo "an uninterrupted run takes ${full}s; killing at $n random moments, each in [0.2, $((span / 10)).$((span % 10))]s after a (re)start"
mkdir -p "$work/soak"
cd "$work/soak"
kills=0
for i in $(seq "$n"); do
    "$bin" run "$pipeline" -p tiny -q >/dev/null 2>&1 &
    pid=$!
    # A random delay, in tenths of a second.
    t=$(( RANDOM % span + 2 ))
    sleep "$((t / 10)).$((t % 10))"
    if kill -9 "$pid" 2>/dev/null; then kills=$((kills + 1)); fi
    wait "$pid" 2>/dev/null || true
done
"$bin" run "$pipeline" -p tiny -q >/dev/null
session=$(ls sessions/*/*.tiny.json)
clean=$(ls "$work"/clean/sessions/*/*.tiny.json)
python3 "$repo/scripts/compare_sessions.py" --rtol 0 "$clean" "$session" >compare.txt ||
    { cat compare.txt; echo "FAILED: results differ from the uninterrupted run"; exit 1; }
python3 - "$clean" "$session" <<'PY'
import json, sys
a, b = (json.load(open(p))["stages"] for p in sys.argv[1:])
bad = [n for n in a if a[n]["key"] != b[n]["key"]]
sys.exit(f"keys differ: {bad}" if bad else 0)
PY
"$bin" cache verify | tail -1
echo "soak: $n points, $kills killed a running process, all survived: keys and metrics identical, cache intact"
