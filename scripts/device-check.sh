#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (the `device` tool). Run from the repository root:
#
#   RPT_FLOW_BIN=path/to/carried/rpt-flow scripts/device-check.sh   # or let it build (slow: nvcc)
#
# 1. the binary: $RPT_FLOW_BIN when carried, else scripts/build-cuda.sh builds one;
# 2. transformers parity on the GPU: the model fixture tests with RPT_TEST_DEVICE=cuda (only with
#    RPT_DEVICE_TESTS=1: it compiles the test binaries through scripts/build-cuda.sh, so it needs
#    cargo and PyPI — not available on the lent device machines, which get a carried binary);
# 3. every stage kind on cpu and on cuda (benches/device-parity.toml), metrics compared
#    (scripts/compare_sessions.py, relative 1e-3; generated text is reported, not failed on);
# 4. speed at a mid size and at the 2B-4T shape in bf16 (benches/device-speed.toml): eval and
#    fine-tune tokens/s, peak GPU memory (nvidia-smi sampled every 200 ms) and MFU against
#    PEAK_TFLOPS (default 989: H100/H200 SXM dense bf16).
# Everything is written under $OUT (the device tool's folder) or ./device-check-out.
# On a lent device machine (no network, no cargo): build here with scripts/build-cuda.sh, gzip
# target/cuda/release/rpt-flow (74 MB; 21 MB gzipped: the carry limit is 64 MiB) into a folder
# listed in .git/info/exclude, carry that folder, gunzip it there, and point LD_LIBRARY_PATH at
# the machine's CUDA 13 libraries (cuBLAS, cuRAND, cudart; e.g. a torch venv's
# site-packages/nvidia/cu13/lib — not yet tried on a device) before running this script.
# A dry run of the script's logic on any machine: RPT_CHECK_DEVICE=cpu RPT_SPEED_PROFILES=tiny.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$repo/device-check-out}
mkdir -p "$out"
work=$(mktemp -d)
device=${RPT_CHECK_DEVICE:-cuda}
export CANDLE_NUM_THREADS=${CANDLE_NUM_THREADS:-$(nproc)} RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$(nproc)}
log() { echo "== [$(date +%T)] $*" | tee -a "$out/summary.txt"; }

log "machine: $(nproc) CPUs, $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
bin=${RPT_FLOW_BIN:-}
if [ -z "$bin" ]; then
    log "building with scripts/build-cuda.sh (a cold build takes ~35 min on one core)"
    "$repo/scripts/build-cuda.sh"
    bin=${CARGO_TARGET_DIR:-$repo/target/cuda}/release/rpt-flow
fi
log "binary: $bin ($("$bin" --version))"

if [ "${RPT_DEVICE_TESTS:-0}" = 1 ]; then
    log "transformers parity on cuda (tests/model parity)"
    if RPT_TEST_DEVICE=cuda "$repo/scripts/build-cuda.sh" test --release --features cuda --test model parity 2>&1 | tee "$out/parity-tests.log" | tail -3; then
        log "parity tests: passed"
    else
        log "parity tests: FAILED (see parity-tests.log)"
    fi
fi

status=0
log "every stage kind, cpu vs $device (benches/device-parity.toml)"
for dev in cpu "$device"; do
    "$bin" run "$repo/benches/device-parity.toml" --device "$dev" --cache "$work/cache" --sessions "$work/s-$dev" -q \
        > "$out/parity-$dev.log" 2>&1 || { log "parity run on $dev FAILED (parity-$dev.log)"; status=1; }
done
if python3 "$repo/scripts/compare_sessions.py" "$work"/s-cpu/*/device-parity*.json "$work"/s-"$device"/*/device-parity*.json \
    --loose generate | tee -a "$out/summary.txt"; then
    log "cpu and $device agree"
else
    log "cpu and $device DIFFER"
    status=1
fi

for profile in ${RPT_SPEED_PROFILES:-mid 2b}; do
    args=()
    [ "$profile" != 2b ] && args=(--profile "$profile")
    log "speed: $profile"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/gpu-mem-$profile.txt" 2>/dev/null &
    smi=$!
    "$bin" run "$repo/benches/device-speed.toml" "${args[@]}" --device "$device" --cache "$work/cache" \
        --sessions "$work/speed-$profile" > "$out/speed-$profile.log" 2>&1 || { log "speed $profile FAILED"; status=1; }
    kill "$smi" 2>/dev/null || true
    python3 - "$work"/speed-"$profile"/*/device-speed*.json "$out/gpu-mem-$profile.txt" "${PEAK_TFLOPS:-989}" <<'PY' | tee -a "$out/summary.txt"
import json, sys
s = json.load(open(sys.argv[1]))["stages"]
mem = [int(x) for x in open(sys.argv[2]).read().split() if x.strip().isdigit()]
peak = float(sys.argv[3]) * 1e12
load = s["base"]["metrics"]
n, layers, h = load["parameters"], load["layers"], load["hidden_size"]
def flops_per_token(seq, train):
    # matmuls: 2 per parameter (the tied embedding is the LM head) + attention scores and values
    f = 2 * n + 4 * layers * seq * h
    return 3 * f if train else f
for stage, train in (("eval", False), ("tuned", True)):
    st = s.get(stage, {})
    m = st.get("metrics", {})
    tps = m.get("tokens_per_second")
    if not tps:
        print(f"{stage}: {st.get('status')}")
        continue
    seq = st.get("params", {}).get("seq_len", 2048)
    mfu = tps * flops_per_token(seq, train) / peak
    print(f"{stage}: {n / 1e9:.2f} B parameters, {tps:,.0f} tokens/s, MFU {100 * mfu:.1f}% (seq {seq}), {st.get('seconds', 0):.1f} s")
print(f"peak GPU memory: {max(mem) / 1024:.1f} GiB" if mem else "peak GPU memory: not sampled")
PY
done
log "done (status $status)"
rm -rf "$work"
exit $status
