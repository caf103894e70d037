#!/usr/bin/env bash
# Regenerates docs/stage-reference.md from the stage definitions (tests/stages/pipelines.rs checks it).
set -euo pipefail
cd "$(dirname "$0")/.."
{
  printf '# Stage reference\n\nGenerated from the stage definitions by `rpt-flow stages --format markdown` (a test keeps this\nfile in sync; regenerate with `scripts/stage-reference.sh`). What the stages do: [experiments.md](experiments.md),\n[stages.md](stages.md).\n\n'
  cargo run --quiet -- stages --format markdown
} > docs/stage-reference.md
