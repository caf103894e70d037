#!/usr/bin/env bash
# Builds `cargo build --release --features cuda` on a machine without a system CUDA toolkit: nvcc,
# headers and the CUDA libraries come from PyPI wheels in a venv (default .venv-cuda; env CUDA_VENV).
# Arguments replace the cargo command `build --release --features cuda` (e.g. `test --release
# --features cuda --test model`), which then runs in the same environment.
# Env: CUDA_COMPUTE_CAP (default 90 = H100/H200); CARGO_TARGET_DIR (default target/cuda: a separate
# directory, so the CUDA build and the CPU build in target/ do not overwrite each other).
# The binary gets an rpath to the venv's CUDA libraries; at run time it also needs the NVIDIA
# driver's libcuda.so.1. On a machine without a driver (only to run non-GPU commands):
#   LD_LIBRARY_PATH=$CUDA_VENV/cuda/nodriver target/cuda/release/rpt-flow --version
# Never set that on a GPU machine: the stub would shadow the real driver.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=$(realpath -m "${CUDA_VENV:-.venv-cuda}")
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}   # no nvidia-smi here: cudaforge needs it spelled out
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}

# CUDA 13.0 (the cuda-toolkit 13.0.3 set), not the newest: candle loads its kernels as PTX that the
# driver compiles, and a driver rejects PTX newer than itself. The lent H200 machines run driver 580
# (CUDA 13.0); newer drivers take 13.0 PTX too. cudarc 0.19.10 accepts CUDA <= 13.4.
pkgs=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cccl==13.0.85
      nvidia-cublas==13.1.1.3 nvidia-curand==10.4.0.35)

t0=$SECONDS
phase() { echo "== [$(date +%T)] $1 done in $((SECONDS - t0)) s"; t0=$SECONDS; }

# 1. Wheels. The venv ignores itself so it never shows up in `git status`.
[ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
echo '*' >"$venv/.gitignore"
"$venv/bin/pip" install -q --disable-pip-version-check "${pkgs[@]}"
cu13=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')/nvidia/cu13
"$cu13/bin/nvcc" --version | tail -2
phase "pip install (${#pkgs[@]} wheels)"

# 2. A CUDA_HOME of our own for cudarc's link search ($CUDA_HOME/lib, lib/stubs): the wheels ship
# only versioned names (libcublas.so.13), and the linker's -lcublas needs libcublas.so.
cuda_home=$venv/cuda
mkdir -p "$cuda_home/lib/stubs" "$cuda_home/nodriver"
for so in cudart.so.13 nvrtc.so.13 cublas.so.13 cublasLt.so.13 curand.so.10; do
  ln -sfn "$cu13/lib/lib$so" "$cuda_home/lib/lib${so%.so.*}.so"
done
# No wheel ships the driver's libcuda.so, not even a stub. Generate one from cudarc's driver
# bindings: every cu* function returns CUDA_ERROR_STUB_LIBRARY (34), SONAME libcuda.so.1, so the
# binary records libcuda.so.1 and the real driver is loaded at run time. It lives only in
# lib/stubs (link time) and nodriver/ (opt-in); never in the rpath, which is searched before the
# system's driver.
cudarc=$(cargo metadata --locked --format-version 1 --features cuda | "$venv/bin/python" -c \
  'import json,sys,os; print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
{ grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$cudarc/src/driver/sys/mod.rs" | sed 's/^pub unsafe fn //' |
    grep -vx 'cuGetError\(String\|Name\)' | sort -u | sed 's/.*/int &(void) { return 34; }/'
  for f in cuGetErrorString cuGetErrorName; do   # so the error reads as what it is
    echo "int $f(int e, const char **s) { *s = \"no NVIDIA driver (stub libcuda from build-cuda.sh)\"; return 0; }"
  done; } >"$cuda_home/libcuda-stub.c"
cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$cuda_home/lib/stubs/libcuda.so" "$cuda_home/libcuda-stub.c"
ln -sfn ../lib/stubs/libcuda.so "$cuda_home/nodriver/libcuda.so.1"
phase "link dir + libcuda stub ($(grep -c . "$cuda_home/libcuda-stub.c") symbols)"

# 3. Build. nvcc is found through NVCC/PATH; CUDA_HOME only serves cudarc's link search, so other
# CUDA variables are dropped. The rpath: the venv's libraries first, then a cuda-lib/ directory next
# to the binary for copies carried to another machine.
unset CUDA_PATH CUDA_ROOT CUDA_TOOLKIT_ROOT_DIR
export CUDA_HOME=$cuda_home NVCC=$cu13/bin/nvcc PATH=$cu13/bin:$PATH
export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-rpath,$cu13/lib:\$ORIGIN/cuda-lib"
# cudaforge's kernel cache and cudarc's version probe do not notice another nvcc: after a change of
# pins, rebuild those two crates.
stamp=$CARGO_TARGET_DIR/cuda-pins.txt
if [ -f "$stamp" ] && [ "$(cat "$stamp")" != "${pkgs[*]}" ]; then
  cargo clean --release -p cudarc -p candle-kernels
fi
mkdir -p "$CARGO_TARGET_DIR" && echo "${pkgs[*]}" >"$stamp"
[ $# -gt 0 ] || set -- build --release --features cuda --timings
cargo "$1" --locked "${@:2}"
phase "cargo $* (per-crate times with --timings: $CARGO_TARGET_DIR/cargo-timings/)"

bin=$CARGO_TARGET_DIR/release/rpt-flow
[ -x "$bin" ] && { echo "binary: $bin; its CUDA libraries:"; ldd "$bin" | grep -E 'cu|not found'; } || true
