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
# target/cuda/release/rpt-flow (74 MB; 22 MB gzipped: the carry limit is 64 MiB) and, for the
# parity tests, the model test binary (RPT_MODEL_TESTS; 17 MB gzipped) into a folder listed in
# .git/info/exclude, carry that folder, and point RPT_FLOW_BIN / RPT_MODEL_TESTS at the .gz files:
# the script unpacks them and takes the CUDA 13 libraries of the machine's PyTorch when the
# binary's rpath finds none.
# A dry run of the script's logic on any machine: RPT_CHECK_DEVICE=cpu RPT_SPEED_PROFILES=tiny.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$repo/device-check-out}
mkdir -p "$out"
work=$(mktemp -d)
device=${RPT_CHECK_DEVICE:-cuda}
export CANDLE_NUM_THREADS=${CANDLE_NUM_THREADS:-$(nproc)} RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$(nproc)}
log() { echo "== [$(date +%T)] $*" | tee -a "$out/summary.txt"; }

status=0
log "machine: $(nproc) CPUs, $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
# A carried binary may come gzipped (the device tool's carry limit); unpack it beside the others.
unpacked() {
    case "$1" in
        *.gz) local to="$work/$(basename "${1%.gz}")"; gunzip -c "$1" >"$to" && chmod +x "$to" && echo "$to" ;;
        *) echo "$1" ;;
    esac
}
bin=${RPT_FLOW_BIN:-}
if [ -z "$bin" ]; then
    log "building with scripts/build-cuda.sh (a cold build takes ~35 min on one core)"
    "$repo/scripts/build-cuda.sh"
    bin=${CARGO_TARGET_DIR:-$repo/target/cuda}/release/rpt-flow
fi
bin=$(unpacked "$bin")
# A binary built elsewhere finds no CUDA libraries by its rpath: take those of the machine's
# PyTorch (its nvidia/cu13/lib holds cuBLAS, cuRAND, cudart and NVRTC of CUDA 13).
if ldd "$bin" | grep -q 'not found'; then
    lib=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
    [ -d "$lib" ] && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    log "CUDA libraries from ${lib:-nowhere}; still missing: $(ldd "$bin" | grep 'not found' | tr -s ' \t' ' ' || echo none)"
fi
log "binary: $bin ($("$bin" --version))"

# Transformers parity on the GPU: the model tests with RPT_TEST_DEVICE=cuda, from a carried test
# binary (RPT_MODEL_TESTS: `scripts/build-cuda.sh test --release --features cuda --test model
# --no-run` builds it) or, with RPT_DEVICE_TESTS=1, compiled here (needs cargo and PyPI).
tests=${RPT_MODEL_TESTS:-}
if [ -n "$tests" ] || [ "${RPT_DEVICE_TESTS:-0}" = 1 ]; then
    log "transformers parity on cuda (tests/model parity)"
    if [ -n "$tests" ]; then
        run_tests() { RPT_PARITY_TRACE=1 RPT_TEST_ROOT=$repo RPT_TEST_DEVICE=cuda "$(unpacked "$tests")" parity; }
    else
        run_tests() { RPT_TEST_DEVICE=cuda "$repo/scripts/build-cuda.sh" test --release --features cuda --test model parity; }
    fi
    if run_tests 2>&1 | tee "$out/parity-tests.log" | tail -3; then
        log "parity tests: passed"
    else
        log "parity tests: FAILED (see parity-tests.log)"
        status=1
    fi
fi

# The yardstick for the bf16 tolerance there: how far transformers itself lands from the
# committed (CPU) bf16 references on this machine's CPU and on the device.
if python3 -c 'import torch, transformers' 2>/dev/null; then
    log "transformers' own bf16 gap to the CPU references (tests/fixtures/bf16_device_gap.py)"
    python3 "$repo/tests/fixtures/bf16_device_gap.py" --device cpu --device "$device" --out "$out/bf16-gap.json" 2>&1 |
        grep -v Warning | tee -a "$out/summary.txt" || log "bf16 gap: FAILED"
fi

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
