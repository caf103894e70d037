#!/usr/bin/env bash
# Fuzzes the pipeline parser/expander for MINUTES with seeded mutations of every shipped and test
# pipeline (tests/engine/faults.rs: no panic, every rejection has a file:line:col), one seed after
# another, 5,000 mutants each. Prints the totals for docs/reliability.md.
#
#   scripts/fuzz-pipelines.sh MINUTES [FIRST_SEED]
set -euo pipefail
minutes=${1:?usage: scripts/fuzz-pipelines.sh MINUTES [FIRST_SEED]}
seed=${2:-100}
cd "$(dirname "$0")/.."
cargo test -q --test engine --no-run 2>/dev/null
end=$((SECONDS + minutes * 60))
cases=0 seeds=0
while [ $SECONDS -lt $end ]; do
    out=$(FUZZ_SEED=$seed FUZZ_CASES=5000 cargo test -q --test engine \
        faults::mutated_pipelines_never_panic_and_every_rejection_is_located -- --exact --nocapture 2>&1) ||
        { echo "$out" | tail -40; echo "FAILED at seed $seed"; exit 1; }
    echo "$out" | grep '^fuzz:'

    cases=$((cases + 5000)) seeds=$((seeds + 1)) seed=$((seed + 1))
done
echo "fuzz-pipelines: $cases mutants over $seeds seeds in $minutes min"
