#!/usr/bin/env python3
"""Check that a folder written by `rpt-flow export --with-logits` loads unchanged in transformers
and computes rpt-flow's logits.

    rpt-flow export pipelines/progressive.toml 'level[sparsity=0.1].tuned' out --profile tiny --with-logits
    .venv/bin/python scripts/check_export.py out [--tol 1e-4]

Loads the folder with AutoModelForCausalLM (float32, eager attention) and AutoTokenizer, then for
every prompt in rpt_flow_logits.safetensors: the tokenizer must give rpt-flow's input ids, and the
logits on those ids must be within the tolerance of rpt-flow's. Prints one line per prompt and the
largest difference; exit 0 when everything agrees, 1 otherwise.

Quantiser ties: in a pruned ternary model, activations often land exactly on a rounding tie of the
int8 activation quantiser (x·s = k + 1/2), and two float implementations (torch's and candle's
summation orders) may round such a value to neighbouring codes; the flip moves later logits by up
to ~0.1 (docs/model.md). A prompt whose logits differ beyond --tol but within --tie-tol, with the
same greedy token at every position, is reported as "tie"; the check still fails unless at least
half of the prompts agree within --tol (a systematic error moves them all).
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

LOGITS_FILE = "rpt_flow_logits.safetensors"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, help="a folder written by rpt-flow export --with-logits")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest allowed |logits difference| (default 1e-4)")
    ap.add_argument("--tie-tol", type=float, default=0.25, help="largest difference explained as a quantiser tie")
    args = ap.parse_args()

    ref_path = args.dir / LOGITS_FILE
    if not ref_path.is_file():
        print(f"error: {ref_path} is missing: export with --with-logits", file=sys.stderr)
        return 2
    with safe_open(str(ref_path), framework="pt") as f:
        meta = f.metadata() or {}
        ref = {k: f.get_tensor(k) for k in f.keys()}
    prompts = json.loads(meta.get("prompts", "[]"))

    model = AutoModelForCausalLM.from_pretrained(str(args.dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    has_tokenizer = (args.dir / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(args.dir)) if has_tokenizer else None
    print(f"{args.dir}: {type(model).__name__}, {type(tokenizer).__name__ if tokenizer else 'no tokenizer'}")

    bad = 0
    exact = 0
    worst = 0.0
    for i, prompt in enumerate(prompts):
        ids = ref[f"input_ids.{i}"]
        expected = ref[f"logits.{i}"]
        if tokenizer is not None and prompt is not None:
            got_ids = tokenizer(prompt, return_tensors="pt").input_ids
            if not torch.equal(got_ids, ids):
                bad += 1
                print(f"  prompt {i} {prompt!r}: tokenizer ids {got_ids.tolist()} != rpt-flow's {ids.tolist()} FAIL")
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        err = (logits - expected).abs().max().item()
        worst = max(worst, err)
        same_shape = logits.shape == expected.shape
        ok = err <= args.tol and same_shape
        tie = not ok and same_shape and err <= args.tie_tol and torch.equal(logits.argmax(-1), expected.argmax(-1))
        exact += ok
        bad += not (ok or tie)
        label = repr(prompt) if prompt is not None else "(fixed ids)"
        verdict = "ok" if ok else ("tie (same greedy tokens; see the docstring)" if tie else "FAIL")
        print(f"  prompt {i} {label}: {ids.shape[1]} tokens, max |logits - rpt-flow| = {err:.3g} {verdict}")
    if not prompts:
        print("error: no prompts in the logits file", file=sys.stderr)
        return 1
    if 2 * exact < len(prompts):
        bad += 1
        print(f"only {exact} of {len(prompts)} prompts agree within {args.tol:g}: FAIL")
    print(f"max |logits - rpt-flow| over {len(prompts)} prompts = {worst:.3g} (tolerance {args.tol:g}): {'ok' if not bad else 'FAIL'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
