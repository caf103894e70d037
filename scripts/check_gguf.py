#!/usr/bin/env python3
"""Compare llama.cpp's next-token logits for rpt-flow's GGUF export with rpt-flow's own.

    cargo run --example gguf_check -- /tmp/gguf-check        # models, GGUFs, rpt-flow logits
    ~/gguf-venv/bin/python scripts/check_gguf.py /tmp/gguf-check

Needs llama-cpp-python (which builds llama.cpp), numpy and safetensors in the interpreter's
environment — a separate venv, never the repository (docs/gguf.md). For every case in
OUT_DIR/cases.json and every GGUF type (tq2_0, tq1_0) it loads the GGUF with llama.cpp on the CPU
(logits for every position, KV cache in f32 so that only the weights' and activations' own
quantisation differ), feeds the same token ids rpt-flow used (no BOS added by llama.cpp), and
reports the largest absolute logit difference, the largest difference relative to each row's
logit range, and the fraction of positions whose arg-max agrees. Cases marked "agree" must pass
--max-rel (default 0.05) and --min-top1 (default 0.95); the exit status says whether they did.

llama.cpp quantises a projection's input to int8 per block of 256 values (Q8_K), rpt-flow per
token (over the whole row, as BitNet does): identical when the row is 256 wide, slightly different
for wider rows (the down projection here), so small differences are expected.
"""

import argparse
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file

import llama_cpp

GGML_TYPE_F32 = 0


def llama_logits(gguf, prompts, kv_f32=True):
    kw = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if kv_f32 else {}
    llm = llama_cpp.Llama(
        model_path=gguf, n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True, n_threads=1, verbose=False, **kw
    )
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval([int(i) for i in ids])
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    del llm
    return out


def compare(got, want):
    max_abs, max_rel, agree, n = 0.0, 0.0, 0, 0
    for g, w in zip(got, want):
        d = np.abs(g - w)
        max_abs = max(max_abs, float(d.max()))
        span = w.max(axis=1) - w.min(axis=1)
        max_rel = max(max_rel, float((d.max(axis=1) / np.maximum(span, 1e-6)).max()))
        agree += int((g.argmax(axis=1) == w.argmax(axis=1)).sum())
        n += g.shape[0]
    return max_abs, max_rel, agree / n, n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--max-rel", type=float, default=0.05)
    ap.add_argument("--min-top1", type=float, default=0.95)
    ap.add_argument("--kv-f16", action="store_true", help="llama.cpp's default f16 KV cache instead of f32")
    args = ap.parse_args()
    cases = json.load(open(os.path.join(args.out_dir, "cases.json")))
    print(f"llama-cpp-python {llama_cpp.__version__}; KV cache {'f16' if args.kv_f16 else 'f32'}")
    print("| case | type | positions | max abs diff | max diff / logit range | top-1 agreement | expected |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for name, c in cases.items():
        ref = load_file(os.path.join(args.out_dir, c["logits"]))
        k = sorted(int(x.split(".")[1]) for x in ref if x.startswith("ids."))
        prompts = [ref[f"ids.{i}"] for i in k]
        want = [ref[f"logits.{i}"] for i in k]
        for ty in ("tq2_0", "tq1_0"):
            gguf = os.path.join(args.out_dir, c["gguf_dir"], f"{ty}.gguf")
            got = llama_logits(gguf, prompts, kv_f32=not args.kv_f16)
            max_abs, max_rel, top1, n = compare(got, want)
            passed = max_rel <= args.max_rel and top1 >= args.min_top1
            if c["expect"] == "agree":
                ok &= passed
            verdict = ("ok" if passed else "FAIL") if c["expect"] == "agree" else c["expect"]
            print(f"| {name} | {ty.upper()} | {n} | {max_abs:.4g} | {max_rel:.4g} | {top1:.3f} | {verdict} |")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
