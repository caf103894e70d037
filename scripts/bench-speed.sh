#!/usr/bin/env bash
# Side-by-side speed of rpt-flow (candle + the ternary kernel) and PyTorch/transformers on this
# CPU, for 1 and 2 threads (THREADS="1 2"): the mid-size bench model's forward and training step
# (benches/model.rs, scripts/bench_torch.py), one table with the ratios, and the machine's state.
#   scripts/bench-speed.sh            # needs .venv with torch + transformers (tests/fixtures/requirements.txt)
# Knobs: THREADS, REPS (default 3), TRAIN=0 (forward only), PY (python with torch + transformers),
# MODEL_BENCH (a prebuilt bench binary instead of cargo). Prints markdown.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-"1 2"}
REPS=${REPS:-3}
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
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) logical CPUs; load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for t in $THREADS; do
  notrain=(); [ "$TRAIN" = 0 ] && notrain=(--no-train)
  # The same allocator setting rpt-flow makes at start (exec::memory::keep_freed_memory), so
  # that neither side pays page faults the other does not.
  GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824 \
    "$PY" scripts/bench_torch.py --threads "$t" --reps "$REPS" --dtypes f32 "${notrain[@]}" --out "$out/torch-$t.json" > /dev/null
  CANDLE_NUM_THREADS=$t RAYON_NUM_THREADS=$t BENCH_REPS=$REPS BENCH_DTYPES=f32 BENCH_TRAIN=$TRAIN \
    model_bench 2>/dev/null | tail -1 > "$out/candle-$t.json"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" - "$out" $THREADS <<'PY'
import json, sys
out, threads = sys.argv[1], sys.argv[2:]
print("| threads | rpt-flow forward tok/s (kernel) | rpt-flow f32 path tok/s | PyTorch forward tok/s | forward speed vs PyTorch | rpt-flow body, head (s) ² | PyTorch body, head (s) ² | ceiling ¹ | rpt-flow train step (s) | PyTorch train step (s) | train time ratio |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for t in threads:
    c = json.load(open(f"{out}/candle-{t}.json"))["f32"]
    p = json.load(open(f"{out}/torch-{t}.json"))["f32"]
    tok = 1024
    row = [t, f"{c['forward_tok_s']:.0f}", f"{tok / c['forward_f32path_s']:.0f}", f"{p['forward_tok_s']:.0f}",
           f"{c['forward_tok_s'] / p['forward_tok_s']:.2f}x"]
    cb, pb, ch, ph = c["body_s"], p["body_s"], c["head_s"], p["head_s"]
    row += [f"{cb:.3f}, {ch:.3f}", f"{pb:.3f}, {ph:.3f}", f"{p['forward_s'] / ch:.2f}x"]
    if "train_step_s" in c and "train_step_s" in p:
        row += [f"{c['train_step_s']:.2f}", f"{p['train_step_s']:.2f}", f"{c['train_step_s'] / p['train_step_s']:.2f}x"]
    else:
        row += ["-", "-", "-"]
    print("| " + " | ".join(map(str, row)) + " |")
print()
print("¹ PyTorch's forward time over rpt-flow's LM-head time: the speed-up rpt-flow would reach with a")
print("  body that took no time at all (both sides compute all-position f32 logits, [tokens, hidden] x [hidden, vocab]).")
print("² each timed alone: the decoder to the final-norm hidden states, and the LM head on them.")
PY
