//! Prepares the llama.cpp comparison of the GGUF export (docs/gguf.md): small BitNet b1.58
//! models, their GGUF files, and rpt-flow's logits for a few prompts, for
//! `scripts/check_gguf.py` to load with llama.cpp (llama-cpp-python) and compare.
//!
//! ```sh
//! cargo run --release --example gguf_check -- /tmp/gguf-check
//! /path/to/venv/bin/python scripts/check_gguf.py /tmp/gguf-check
//! ```
//!
//! Writes, under OUT_DIR, one folder per case, each with the model (HF layout), `tq2_0.gguf`,
//! `tq1_0.gguf` and `logits.safetensors` (`ids.{i}` u32 `[T]`, `logits.{i}` f32 `[T, vocab]`,
//! rpt-flow's f32 inference path), and `cases.json` saying what each case is:
//! - `silu-ff256`: a random ternary BitNet (hidden = intermediate = 256, so every projection's input
//!   row is one Q8_K block and llama.cpp quantises activations exactly as BitNet does, per token);
//! - `silu`: the same with intermediate 768 (llama.cpp then quantises the down projection's input per
//!   256-block, BitNet per token); both a random ternary BitNet (sub-norms, GQA, tied embeddings) whose MLP gate is SiLU —
//!   what llama.cpp's bitnet graph computes, so the two must agree;
//! - `relu2`: the same sizes with relu² (BitNet b1.58 2B-4T's MLP), and `relu2-as-silu`: rpt-flow's
//!   logits for the relu² weights run with SiLU, to show what llama.cpp computes for such a file.
//!
//! The sizes (hidden 256, intermediate 768) are multiples of 256 as the ternary types need;
//! `builtin:tiny-bitnet` (128 / 344) cannot be stored, and the error is printed.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rpt_flow::export::gguf::{write_gguf, GgufType};
use rpt_flow::model::config::{Arch, ModelConfig};
use rpt_flow::model::{Bos, LoadOptions, Model, TextTokenizer};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const PROMPTS: [&str; 6] = [
    "The capital of France is Paris, and the capital of Italy is",
    "Alice has three apples. Bob gives her two more, so she has",
    "Once upon a time there was a small robot who",
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning the model was random, and then",
];

fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-bitnet")
}

fn config(act: &str, ff: usize) -> Result<ModelConfig> {
    let mut raw = ModelConfig::tiny(Arch::Bitnet, 1024, 256, ff, 3, 4, 2).raw;
    raw["hidden_act"] = act.into();
    (raw["bos_token_id"], raw["eos_token_id"]) = (0.into(), 1.into()); // the tokenizer's <s>, </s>
                                                                       // Larger embeddings than the 0.02 default give a peaked next-token distribution, so top-1
                                                                       // agreement is meaningful for a random model.
    raw["initializer_range"] = 0.5.into();
    raw["max_position_embeddings"] = 512.into();
    ModelConfig::from_json(raw)
}

fn logits(dir: &Path, out: &Path) -> Result<()> {
    let model = Model::from_dir(dir, &LoadOptions::default())?;
    let tok = TextTokenizer::from_dir(dir, model.config())?;
    let mut tensors = HashMap::new();
    let mut floor = (0f32, 0f32);
    for (i, p) in PROMPTS.iter().enumerate() {
        let ids = tok.encode(p, Bos::Add)?;
        let t = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        // The reference: the f32 fake-quant path (the one with transformers parity).
        model.set_ternary_kernel(false);
        let l = model.forward(&t)?.squeeze(0)?;
        // rpt-flow's own spread between paths that compute the same function with different
        // float rounding: the int8 kernel, and the training path (composed ops).
        model.set_ternary_kernel(true);
        let lk = model.forward(&t)?.squeeze(0)?;
        let lt = model.forward_train(&t)?.squeeze(0)?;
        let dk = (&l - &lk)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let dt = (&l - &lt)?.abs()?.max_all()?.to_scalar::<f32>()?;
        floor = (floor.0.max(dk), floor.1.max(dt));
        tensors.insert(format!("ids.{i}"), Tensor::new(ids.as_slice(), &Device::Cpu)?);
        tensors.insert(format!("logits.{i}"), l);
    }
    candle_core::safetensors::save(&tensors, out)?;
    println!(
        "{}: rpt-flow's reference vs its int8 kernel: max |Δ logit| {:.4}; vs its training path: {:.4}",
        dir.display(),
        floor.0,
        floor.1
    );
    Ok(())
}

fn main() -> Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).context("usage: gguf_check OUT_DIR")?);
    std::fs::create_dir_all(&out)?;
    for (case, act, ff) in [("silu-ff256", "silu", 256), ("silu", "silu", 768), ("relu2", "relu2", 768)] {
        let dir = out.join(case);
        let m = Model::random(&config(act, ff)?, 11, &LoadOptions::default())?;
        m.save_with_aux(&dir, Some(&assets()))?;
        for ty in [GgufType::TQ2_0, GgufType::TQ1_0] {
            let path = dir.join(format!("{}.gguf", ty.name().to_lowercase()));
            let s = write_gguf(&dir, &path, ty)?;
            println!("{case}: wrote {} ({} bytes, {} tensors)", path.display(), s.bytes, s.tensors);
            for w in &s.warnings {
                println!("  warning: {w}");
            }
        }
        logits(&dir, &dir.join("logits.safetensors"))?;
    }
    // The relu² weights run with SiLU: what llama.cpp's bitnet graph computes for relu2/.
    let swapped = out.join("relu2-as-silu");
    std::fs::create_dir_all(&swapped)?;
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(out.join("relu2").join(f), swapped.join(f))?;
    }
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("relu2/config.json"))?)?;
    cfg["hidden_act"] = "silu".into();
    std::fs::write(swapped.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    logits(&swapped, &swapped.join("logits.safetensors"))?;
    std::fs::write(
        out.join("cases.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "silu-ff256": {"gguf_dir": "silu-ff256", "logits": "silu-ff256/logits.safetensors", "expect": "agree"},
            "silu": {"gguf_dir": "silu", "logits": "silu/logits.safetensors", "expect": "close (Q8_K per 256-block)"},
            "relu2": {"gguf_dir": "relu2", "logits": "relu2/logits.safetensors", "expect": "differ (llama.cpp runs SiLU)"},
            "relu2-as-silu": {"gguf_dir": "relu2", "logits": "relu2-as-silu/logits.safetensors", "expect": "close (Q8_K per 256-block)"},
        }))?,
    )?;
    match write_gguf(&assets(), &out.join("tiny-bitnet.gguf"), GgufType::TQ2_0) {
        Ok(_) => println!("builtin:tiny-bitnet: written (unexpected)"),
        Err(e) => println!("builtin:tiny-bitnet cannot be stored: {e:#}"),
    }
    Ok(())
}
