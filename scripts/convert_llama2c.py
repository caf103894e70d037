#!/usr/bin/env python3
"""Convert a llama2.c legacy (version 0) checkpoint and its tokenizer into a Hugging Face Llama
directory that transformers' LlamaForCausalLM and the `tokenizers` library load unchanged.

Usage:
    python3 scripts/convert_llama2c.py MODEL.bin TOKENIZER.bin OUT_DIR
    e.g. python3 scripts/convert_llama2c.py ../shared/models/stories260K/stories260K.bin \
             ../shared/models/stories260K/tok512.bin /tmp/stories260K-hf

Python standard library only (struct, json, argparse, pathlib), so it runs anywhere. Writes
OUT_DIR/config.json, OUT_DIR/model.safetensors and OUT_DIR/tokenizer.json.

Checkpoint (see shared/models/stories260K/README.md): a header of 7 little-endian int32
(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len), then float32 arrays in the
order token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis_real,
freq_cis_imag and, when vocab_size < 0 (untied classifier), wcls[vocab][dim]. The freq_cis
arrays are skipped. The float bytes are copied unchanged (both formats are little-endian f32);
only the rows of wq and wk are reordered:

    llama2.c rotates the interleaved pairs (0,1), (2,3), ... of each head; HF Llama rotates the
    two halves (j, j + head_dim/2). Within every head, the new row j takes the old row 2j and the
    new row j + head_dim/2 the old row 2j + 1 (w.view(heads, head_dim/2, 2, dim).transpose(1, 2)),
    with n_heads for wq and n_kv_heads for wk. q.k is unchanged because both move the same way.

Tokenizer (llama2.c tokenizer.bin: int32 max_token_length, then per id a float32 score, an
int32 length and the bytes): a `tokenizers` BPE model with byte_fallback that reproduces run.c's
encode():
    * vocab: 0 "<unk>", 1 "<s>", 2 "</s>" (stored as "\\n<s>\\n" / "\\n</s>\\n"), 3..258 the byte
      tokens "<0x00>".."<0xFF>", then the pieces as stored (spaces are real spaces);
    * merges: every split of every piece into two vocab pieces, ranked by the score of the merged
      piece, highest first. run.c repeatedly merges the adjacent pair whose concatenation has the
      highest score (the leftmost one on a tie); the BPE model merges the lowest-ranked pair
      (the leftmost one on a tie), which is the same when scores are distinct (they are in
      tok512.bin; a warning is printed otherwise);
    * normalizer Prepend(" "): run.c's dummy prefix (added only to a non-empty text);
    * no pre-tokenizer: run.c merges across the whole text;
    * code points missing from the vocab become their UTF-8 bytes (byte_fallback: id = byte + 3);
    * post-processor: "<s>" (id 1) in front when add_special_tokens=True;
    * decoder: ByteFallback, Fuse, Strip one leading space (run.c drops the space after BOS).
"""

import argparse
import json
import struct
from pathlib import Path

# The names every output file uses. "llama2.c" strings of the special ids as run.c stores them.
UNK, BOS, EOS = "<unk>", "<s>", "</s>"


# ---------------------------------------------------------------------------------------------
# Checkpoint


def read_checkpoint(path: Path):
    """Returns (header dict, tensors) where tensors is a list of (name, shape, bytes) in file
    order, already renamed to HF names and with wq/wk rows permuted."""
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack_from("<7i", raw, 0)
    tied = vocab > 0
    vocab = abs(vocab)
    head = dim // n_heads
    kv_dim = head * n_kv_heads
    assert dim % n_heads == 0 and head % 2 == 0, "bad head size"
    off = 28

    def take(*shape):
        nonlocal off
        n = 1
        for s in shape:
            n *= s
        b = raw[off : off + 4 * n]
        assert len(b) == 4 * n, "checkpoint too short"
        off += 4 * n
        return b

    def per_layer(rows, cols):
        return [take(rows, cols) for _ in range(n_layers)]

    emb = take(vocab, dim)
    rms_att = per_layer(1, dim)
    wq = per_layer(dim, dim)
    wk = per_layer(kv_dim, dim)
    wv = per_layer(kv_dim, dim)
    wo = per_layer(dim, dim)
    rms_ffn = per_layer(1, dim)
    w1 = per_layer(hidden, dim)
    w2 = per_layer(dim, hidden)
    w3 = per_layer(hidden, dim)
    rms_final = take(dim)
    take(seq_len, head // 2)  # freq_cis_real (unused)
    take(seq_len, head // 2)  # freq_cis_imag (unused)
    wcls = None if tied else take(vocab, dim)
    assert off == len(raw), f"{len(raw) - off} unexpected trailing bytes"

    tensors = [("model.embed_tokens.weight", [vocab, dim], emb)]
    for l in range(n_layers):
        p = f"model.layers.{l}."
        tensors += [
            (p + "input_layernorm.weight", [dim], rms_att[l]),
            (p + "self_attn.q_proj.weight", [dim, dim], halves_rope(wq[l], n_heads, head, dim)),
            (p + "self_attn.k_proj.weight", [kv_dim, dim], halves_rope(wk[l], n_kv_heads, head, dim)),
            (p + "self_attn.v_proj.weight", [kv_dim, dim], wv[l]),
            (p + "self_attn.o_proj.weight", [dim, dim], wo[l]),
            (p + "post_attention_layernorm.weight", [dim], rms_ffn[l]),
            (p + "mlp.gate_proj.weight", [hidden, dim], w1[l]),
            (p + "mlp.down_proj.weight", [dim, hidden], w2[l]),
            (p + "mlp.up_proj.weight", [hidden, dim], w3[l]),
        ]
    tensors.append(("model.norm.weight", [dim], rms_final))
    if wcls is not None:
        tensors.append(("lm_head.weight", [vocab, dim], wcls))
    header = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                  vocab_size=vocab, seq_len=seq_len, tied=tied)
    return header, tensors


def halves_rope(w: bytes, heads: int, head: int, cols: int) -> bytes:
    """Reorders the rows of a (heads*head, cols) f32 matrix: per head, rows 0,2,4,... then 1,3,5,..."""
    row = 4 * cols
    assert len(w) == heads * head * row
    out = []
    for h in range(heads):
        base = h * head
        for parity in (0, 1):
            for j in range(head // 2):
                r = base + 2 * j + parity
                out.append(w[r * row : (r + 1) * row])
    return b"".join(out)


def write_safetensors(path: Path, tensors):
    meta = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape, data in tensors:
        n = 1
        for s in shape:
            n *= s
        assert len(data) == 4 * n, name
        meta[name] = {"dtype": "F32", "shape": shape, "data_offsets": [pos, pos + len(data)]}
        pos += len(data)
    head = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for _, _, data in tensors:
            f.write(data)


def config_json(h):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h["dim"],
        "intermediate_size": h["hidden_dim"],
        "num_hidden_layers": h["n_layers"],
        "num_attention_heads": h["n_heads"],
        "num_key_value_heads": h["n_kv_heads"],
        "head_dim": h["dim"] // h["n_heads"],
        "vocab_size": h["vocab_size"],
        "max_position_embeddings": h["seq_len"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": h["tied"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


# ---------------------------------------------------------------------------------------------
# Tokenizer


def read_tokenizer(path: Path):
    raw = path.read_bytes()
    (max_len,) = struct.unpack_from("<i", raw, 0)
    off = 4
    pieces, scores = [], []
    while off < len(raw):
        score, n = struct.unpack_from("<fi", raw, off)
        off += 8
        pieces.append(raw[off : off + n].decode("utf-8"))
        scores.append(score)
        off += n
    assert off == len(raw)
    return max_len, pieces, scores


def tokenizer_json(pieces, scores, vocab_size):
    assert len(pieces) == vocab_size, f"tokenizer has {len(pieces)} ids, model {vocab_size}"
    assert pieces[0] == UNK and pieces[1].strip() == BOS and pieces[2].strip() == EOS, pieces[:3]
    for b in range(256):
        assert pieces[3 + b] == f"<0x{b:02X}>", (3 + b, pieces[3 + b])
    names = [UNK, BOS, EOS] + pieces[3:]
    vocab = {}
    for i, s in enumerate(names):
        assert s not in vocab, f"duplicate piece {s!r}"
        vocab[s] = i
    # Merges: (left, right) -> merged piece for every split of every ordinary piece into two vocab
    # pieces (run.c would look up the concatenation of any two ids' strings). Byte tokens and the
    # three specials never combine into an ordinary piece's text, but are included for fidelity.
    first = 3 + 256
    ranked = sorted(range(first, len(names)), key=lambda i: (-scores[i], i))
    if len({scores[i] for i in ranked}) != len(ranked):
        print("warning: tied piece scores; run.c breaks ties by position, the BPE model by rank")
    merges = []
    for i in ranked:
        s = names[i]
        for k in range(1, len(s)):
            a, b = s[:k], s[k:]
            if a in vocab and b in vocab:
                merges.append([a, b])
    specials = [
        {"id": i, "content": names[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i in range(3)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": specials,
        "normalizer": {"type": "Prepend", "prepend": " "},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": BOS, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {BOS: {"id": BOS, "ids": [1], "tokens": [BOS]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": UNK,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def tokenizer_config_json():
    # For transformers' AutoTokenizer (not needed by the `tokenizers` library itself).
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
    }


def convert(model: Path, tok: Path, out: Path):
    header, tensors = read_checkpoint(model)
    _, pieces, scores = read_tokenizer(tok)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors)
    (out / "config.json").write_text(json.dumps(config_json(header), indent=2) + "\n")
    t = tokenizer_json(pieces, scores, header["vocab_size"])
    (out / "tokenizer.json").write_text(json.dumps(t, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config_json(), indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2) + "\n")
    return header


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="llama2.c legacy checkpoint (.bin)")
    ap.add_argument("tokenizer", type=Path, help="llama2.c tokenizer (.bin)")
    ap.add_argument("out", type=Path, help="output directory")
    a = ap.parse_args()
    h = convert(a.model, a.tokenizer, a.out)
    n = sum(1 for _ in a.out.iterdir())
    print(f"wrote {a.out} ({n} files): dim={h['dim']} hidden={h['hidden_dim']} layers={h['n_layers']} "
          f"heads={h['n_heads']}/{h['n_kv_heads']} vocab={h['vocab_size']} seq_len={h['seq_len']} tied={h['tied']}")


if __name__ == "__main__":
    main()
