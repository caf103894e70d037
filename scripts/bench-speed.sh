#!/usr/bin/env bash
# Side-by-side speed of rpt-flow (candle + the ternary kernel) and PyTorch/transformers on this
# CPU, for 1 and 2 threads (THREADS="1 2"): the mid-size bench model's forward and training step
# (benches/model.rs, scripts/bench_torch.py), one table with the ratios, and the machine's state.
#   scripts/bench-speed.sh            # needs .venv with torch + transformers (tests/fixtures/requirements.txt)
# Knobs: THREADS, REPS (default 3), ROUNDS (default 1), TRAIN=0 (forward only), PY (python with
# torch + transformers), MODEL_BENCH (a prebuilt bench binary instead of cargo), MKL_INTEL_PATHS
# (below). Prints markdown.
#
# PyTorch's f32 products go to oneMKL, which on a CPU that is not Intel's takes slower code paths
# (measured on an AMD EPYC Zen 5: the LM head's sgemm at ~25 GMAC/s where candle's reaches 75+).
# So that the comparison is against PyTorch at its best, on such a CPU (MKL_INTEL_PATHS=auto, the
# default) the PyTorch side runs with a one-line shim preloaded that answers MKL's "is this an Intel
# CPU?" with yes (built here with gcc); MKL_INTEL_PATHS=0 runs stock MKL, 1 forces the shim.
#
# Each round measures PyTorch and then rpt-flow back to back, so a ratio compares the two under
# the same machine conditions; on a shared host whose speed drifts by 20-40 % within minutes, the
# per-round ratios are steadier than either side's times. With ROUNDS > 1 a last line per thread
# count gives the median ratio over the rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-"1 2"}
REPS=${REPS:-3}
ROUNDS=${ROUNDS:-1}
TRAIN=${TRAIN:-1}
PY=${PY:-.venv/bin/python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# MODEL_BENCH: a prebuilt `benches/model.rs` binary (carried to a machine without cargo).
if [ -n "${MODEL_BENCH:-}" ]; then
  [ -x "$MODEL_BENCH" ] || { echo "MODEL_BENCH=$MODEL_BENCH is not an executable (build one with: cargo bench --bench model --no-run)" >&2; exit 2; }
  model_bench() { "$MODEL_BENCH" --bench; }
else
  cargo bench --bench model --no-run -q 2>/dev/null
  model_bench() { cargo bench -q --bench model; }
fi
torch_env=()
vendor=$(grep -m1 '^vendor_id' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')
case "${MKL_INTEL_PATHS:-auto}" in
  0) ;;
  1|auto)
    if [ "${MKL_INTEL_PATHS:-auto}" = 1 ] || [ "$vendor" != GenuineIntel ]; then
      echo 'int mkl_serv_intel_cpu_true(void) { return 1; }' > "$out/mkl-intel-paths.c"
      gcc -shared -fPIC -O2 -o "$out/libmkl-intel-paths.so" "$out/mkl-intel-paths.c" \
        || { echo "MKL_INTEL_PATHS: gcc could not build the shim (MKL_INTEL_PATHS=0 runs stock MKL)" >&2; exit 2; }
      torch_env=(LD_PRELOAD="$out/libmkl-intel-paths.so")
    fi ;;
  *) echo "MKL_INTEL_PATHS=$MKL_INTEL_PATHS: expected auto, 0 or 1" >&2; exit 2 ;;
esac
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) logical CPUs; load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
[ ${#torch_env[@]} -gt 0 ] && echo "PyTorch side: MKL's Intel code paths (shim preloaded; MKL_INTEL_PATHS=0 for stock MKL)"
for t in $THREADS; do
  for r in $(seq 1 "$ROUNDS"); do
    notrain=(); [ "$TRAIN" = 0 ] && notrain=(--no-train)
    # The same allocator setting rpt-flow makes at start (exec::memory::keep_freed_memory), so
    # that neither side pays page faults the other does not.
    env "${torch_env[@]}" GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824 \
      "$PY" scripts/bench_torch.py --threads "$t" --reps "$REPS" --dtypes f32 "${notrain[@]}" --out "$out/torch-$t-$r.json" > /dev/null
    CANDLE_NUM_THREADS=$t RAYON_NUM_THREADS=$t BENCH_REPS=$REPS BENCH_DTYPES=f32 BENCH_TRAIN=$TRAIN \
      model_bench 2>/dev/null | tail -1 > "$out/candle-$t-$r.json"
    echo "$t $r $(date -u +%H:%M) $(cut -d' ' -f1 /proc/loadavg)" >> "$out/rounds"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" - "$out" <<'PY'
import json, statistics, sys
out = sys.argv[1]
rounds = [line.split() for line in open(f"{out}/rounds")]
print("| threads | round (UTC, load) | rpt-flow forward tok/s (kernel) | rpt-flow f32 path tok/s | PyTorch forward tok/s | forward speed vs PyTorch | rpt-flow body, head (s) ² | PyTorch body, head (s) ² | ceiling ¹ | rpt-flow train step (s) | PyTorch train step (s) | train time ratio |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
ratios = {}
for t, r, when, load in rounds:
    c = json.load(open(f"{out}/candle-{t}-{r}.json"))["f32"]
    p = json.load(open(f"{out}/torch-{t}-{r}.json"))["f32"]
    tok = 1024
    fwd = c['forward_tok_s'] / p['forward_tok_s']
    row = [t, f"{when}, {load}", f"{c['forward_tok_s']:.0f}", f"{tok / c['forward_f32path_s']:.0f}", f"{p['forward_tok_s']:.0f}", f"{fwd:.2f}x"]
    cb, pb, ch, ph = c["body_s"], p["body_s"], c["head_s"], p["head_s"]
    row += [f"{cb:.3f}, {ch:.3f}", f"{pb:.3f}, {ph:.3f}", f"{p['forward_s'] / ch:.2f}x"]
    train = None
    if "train_step_s" in c and "train_step_s" in p:
        train = c['train_step_s'] / p['train_step_s']
        row += [f"{c['train_step_s']:.2f}", f"{p['train_step_s']:.2f}", f"{train:.2f}x"]
    else:
        row += ["-", "-", "-"]
    ratios.setdefault(t, []).append((fwd, train))
    print("| " + " | ".join(map(str, row)) + " |")
print()
for t, rs in ratios.items():
    if len(rs) > 1:
        fwd = statistics.median(f for f, _ in rs)
        trains = [x for _, x in rs if x is not None]
        train = f", train time ratio {statistics.median(trains):.2f}x" if trains else ""
        print(f"{t} thread(s), median over {len(rs)} rounds: forward {fwd:.2f}x PyTorch's tokens/s{train}")
print()
print("¹ PyTorch's forward time over rpt-flow's LM-head time: the speed-up rpt-flow would reach with a")
print("  body that took no time at all (both sides compute all-position f32 logits, [tokens, hidden] x [hidden, vocab]).")
print("² each timed alone: the decoder to the final-norm hidden states, and the LM head on them.")
PY
