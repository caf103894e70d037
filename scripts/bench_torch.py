#!/usr/bin/env python3
"""PyTorch/transformers counterpart of `cargo bench --bench model`.

Same random BitNet (hidden 512, 8 layers, 8/4 heads, intermediate 1376, vocab 32000; online
ternary quantisation as the bf16 hub checkpoint loads), batch 4 x 256, CPU, f32 and bf16:
forward time (tokens/s) and one training step (forward + backward + AdamW), median of REPS after
one warm-up. Eager PyTorch (TORCH_COMPILE_DISABLE=1: transformers' quantisers are
`@torch.compile`d, which on CPU needs a C++ toolchain and minutes of compilation), SDPA attention
(transformers' default).

Usage: .venv/bin/python scripts/bench_torch.py [--threads 1] [--reps 5] [--out torch.json]
Then:  BENCH_TORCH_JSON=torch.json cargo bench --bench model   (prints candle/torch ratios)
"""

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, BitNetConfig, BitNetForCausalLM  # noqa: E402


def timed(reps, f):
    f()
    ts = []
    for _ in range(reps):
        s = time.perf_counter()
        f()
        ts.append(time.perf_counter() - s)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = BitNetConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, hidden_act="relu2",
    )
    ids = (torch.arange(a.batch * a.seq) * 7919 % 32000).reshape(a.batch, a.seq)
    out = {"threads": a.threads, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        BitNetForCausalLM(cfg).save_pretrained(tmp)
        c = json.load(open(os.path.join(tmp, "config.json")))
        c["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
        json.dump(c, open(os.path.join(tmp, "config.json"), "w"))
        for d in a.dtypes.split(","):
            dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[d]
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
            model.eval()

            def fwd():
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)

            def body():  # the decoder without the LM head: final-norm hidden states
                with torch.no_grad():
                    model.model(input_ids=ids, use_cache=False)

            r = {"forward_s": timed(a.reps, fwd)}
            r["forward_tok_s"] = a.batch * a.seq / r["forward_s"]
            r["body_s"] = timed(a.reps, body)
            with torch.no_grad():
                h = model.model(input_ids=ids, use_cache=False).last_hidden_state
            # The LM head alone on the final-norm hidden states (the difference of two medians
            # is noisy, and comes out below this on this machine).
            with torch.no_grad():
                r["head_s"] = timed(a.reps, lambda: model.lm_head(h))
            if not a.no_train:
                model.train()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

                def step():
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                r["train_step_s"] = timed(a.reps, step)
            out[d] = r
            print(d, r, flush=True)
    print(json.dumps(out))
    if a.out:
        json.dump(out, open(a.out, "w"), indent=2)


if __name__ == "__main__":
    main()
