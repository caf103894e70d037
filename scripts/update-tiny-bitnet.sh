#!/usr/bin/env bash
# Regenerates the embedded default model `builtin:tiny-bitnet`: runs pipelines/tiny-pretrain.toml
# (resumable; ~20-60 min on one CPU core) and copies the trained model into assets/tiny-bitnet/,
# which src/stages/common/builtin.rs embeds with include_bytes!. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
export CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=1   # one thread: bit-identical to the committed run
cargo build
bin=target/debug/rpt-flow
$bin run pipelines/tiny-pretrain.toml
entry=$($bin plan pipelines/tiny-pretrain.toml --format json |
  python3 -c 'import json,sys; print(next(i["entry"] for i in json.load(sys.stdin)["instances"] if i["name"] == "trained"))')
mkdir -p assets/tiny-bitnet
for f in config.json model.safetensors tokenizer.json; do cp "$entry/$f" assets/tiny-bitnet/; done
echo "assets/tiny-bitnet updated from $entry"
