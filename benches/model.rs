//! `cargo bench --bench model`: forward tokens/s and one training step (forward + backward +
//! AdamW) of a mid-size random BitNet (hidden 512, 8 layers, 8 heads / 4 KV heads, intermediate
//! 1376, vocab 32000; batch 4 × 256) on CPU, f32 and bf16, median of `BENCH_REPS` (default 5)
//! after one warm-up.
//!
//! Environment: `BENCH_REPS`, `BENCH_BATCH`, `BENCH_SEQ`, `BENCH_DTYPES` (e.g. `f32,bf16`),
//! `BENCH_TRAIN` (0 to skip training), `BENCH_F32PATH` (0 to skip the kernel-off forward),
//! `BENCH_FUSED_HEAD` (0: the training loss from logits instead of the fused head + loss), `BENCH_TORCH_JSON` (output of scripts/bench_torch.py, to
//! print the candle/torch ratio), `BENCH_ONLY` (`body`, `head` or `train`: time only that part,
//! e.g. under `perf record`; the other columns print as NaN). Set `CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=1` on a one-core
//! machine, and the same thread count in the torch script.

use candle_core::{DType, Device, Tensor};
use rpt_flow::model::adamw::{AdamW, Hyper};
use rpt_flow::model::{causal_lm_loss, next_token_targets, Arch, LoadOptions, Model, ModelConfig};
use std::time::Instant;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<F: FnMut() -> anyhow::Result<()>>(reps: usize, mut f: F) -> anyhow::Result<f64> {
    f()?; // warm-up
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

/// `time`, or NaN without running `f` when `on` is false (`BENCH_ONLY` names another part).
fn time_if<F: FnMut() -> anyhow::Result<()>>(on: bool, reps: usize, f: F) -> anyhow::Result<f64> {
    if on {
        time(reps, f)
    } else {
        Ok(f64::NAN)
    }
}

fn main() -> anyhow::Result<()> {
    // As the shipped binary runs a stage: freed memory kept, on a pool worker (exec::threads).
    rpt_flow::exec::memory::keep_freed_memory();
    rpt_flow::exec::threads::on_pool_worker(bench)
}

fn bench() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; ignore arguments.
    let reps = env("BENCH_REPS", 5);
    let (b, t) = (env("BENCH_BATCH", 4), env("BENCH_SEQ", 256));
    let train = env("BENCH_TRAIN", 1) != 0;
    let dtypes = std::env::var("BENCH_DTYPES").unwrap_or_else(|_| "f32,bf16".into());
    let only = std::env::var("BENCH_ONLY").ok();
    let part_on = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if let Some(o) = only.as_deref() {
        anyhow::ensure!(["body", "head", "train"].contains(&o), "BENCH_ONLY={o}: use body, head or train");
    }
    let cfg = ModelConfig::tiny(Arch::Bitnet, 32000, 512, 1376, 8, 8, 4);
    let torch: Option<serde_json::Value> = std::env::var("BENCH_TORCH_JSON")
        .ok()
        .map(|p| serde_json::from_str(&std::fs::read_to_string(p).expect("torch json")).expect("json"));
    println!(
        "bitnet hidden 512, 8 layers, 8/4 heads, ffn 1376, vocab 32000; batch {b}x{t}; reps {reps} (median after 1 warm-up); threads {}",
        candle_core::utils::get_num_threads()
    );
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7919) % 32000) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
    let mut results = serde_json::Map::new();
    for d in dtypes.split(',') {
        let dtype = match d {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            other => anyhow::bail!("unknown dtype {other}"),
        };
        let opts = LoadOptions { dtype, device: Device::Cpu, quantization: None, pack_for_inference: false };
        let model = Model::random(&cfg, 0, &opts)?;
        let fwd = time_if(only.is_none(), reps, || {
            model.forward(&ids)?;
            Ok(())
        })?;
        let tok_s = (b * t) as f64 / fwd;
        // The same forward on the f32 fake-quant path (the ternary kernel off), for comparison.
        model.set_ternary_kernel(false);
        let fwd_f32 = time_if(only.is_none() && env("BENCH_F32PATH", 1) != 0, reps, || {
            model.forward(&ids)?;
            Ok(())
        })?;
        model.set_ternary_kernel(true);
        // The body alone (final-norm hidden states, no LM head) and the LM head alone on them,
        // each timed directly (the difference of two medians is noisy here).
        let body = time_if(part_on("body"), reps, || {
            model.forward_hidden(&ids, None)?;
            Ok(())
        })?;
        let h = model.forward_hidden(&ids, None)?;
        let head = time_if(part_on("head"), reps, || {
            model.logits(&h)?;
            Ok(())
        })?;
        let mut line = format!(
            "{d:>5}  forward {fwd:8.3} s  {tok_s:9.1} tok/s  (body {body:.3} s, LM head {head:.3} s; f32 fake-quant path {fwd_f32:.3} s, {:.1} tok/s)",
            (b * t) as f64 / fwd_f32
        );
        let mut r = serde_json::json!({"forward_s": fwd, "forward_tok_s": tok_s, "forward_f32path_s": fwd_f32, "body_s": body, "head_s": head});
        if train && part_on("train") {
            // The fine-tune stage's AdamW, with torch's AdamW defaults (as scripts/bench_torch.py).
            let hyper = Hyper { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
            let params = model.named_parameters();
            let targets = next_token_targets(&ids)?;
            // BENCH_FUSED_HEAD=0: logits as a graph node, then the loss (for comparison).
            let fused_head = env("BENCH_FUSED_HEAD", 1) != 0;
            let mut opt = AdamW::new(params.clone(), hyper, false)?;
            let mut parts: Vec<[f64; 3]> = vec![];
            let step = time(reps, || {
                let s = Instant::now();
                let loss = if fused_head {
                    model.train_loss(&ids, &targets)?
                } else {
                    causal_lm_loss(&model.forward_train(&ids)?, &ids)?
                };
                let f = s.elapsed().as_secs_f64();
                let grads = loss.backward()?;
                let b = s.elapsed().as_secs_f64();
                let grads: Vec<Tensor> = params
                    .iter()
                    .map(|(_, v)| grads.get(v.as_tensor()).cloned().map_or_else(|| v.as_tensor().zeros_like(), Ok))
                    .collect::<candle_core::Result<_>>()?;
                opt.step(&grads, 1e-4)?;
                parts.push([f, b - f, s.elapsed().as_secs_f64() - b]);
                Ok(())
            })?;
            let part = |i: usize| median(parts.iter().skip(1).map(|p| p[i]).collect());
            r["train_forward_s"] = part(0).into();
            r["train_backward_s"] = part(1).into();
            r["train_adamw_s"] = part(2).into();
            line +=
                &format!("   train step {step:8.3} s (fwd {:.2} + bwd {:.2} + adamw {:.2})", part(0), part(1), part(2));
            r["train_step_s"] = step.into();
        }
        if let Some(tj) = torch.as_ref().and_then(|j| j.get(d)) {
            if let Some(tf) = tj.get("forward_s").and_then(|v| v.as_f64()) {
                line += &format!("   forward candle/torch time {:.2}x", fwd / tf);
            }
            if let (Some(ts), Some(s)) =
                (tj.get("train_step_s").and_then(|v| v.as_f64()), r.get("train_step_s").and_then(|v| v.as_f64()))
            {
                line += &format!("   train candle/torch time {:.2}x", s / ts);
            }
        }
        println!("{line}");
        results.insert(d.to_string(), r);
    }
    println!("{}", serde_json::Value::Object(results));
    Ok(())
}
