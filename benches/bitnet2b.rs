//! `cargo bench --bench bitnet2b`: the bitnet-b1.58-2B-4T shape on CPU (random weights rounded to
//! bf16 as the hub checkpoint, exact config: hidden 2560, 30 layers, 20/5 heads, intermediate
//! 6912, vocab 128256, tied), f32
//! model with the int8 × 2-bit ternary kernel: prompt processing of `BENCH_PROMPT` tokens
//! (default 512, median of `BENCH_REPS`, default 2, after one warm-up) and token-by-token generation with the KV cache (`BENCH_GEN` tokens, default 16,
//! after a 16-token prefill), peak resident memory, and the projected time of a perplexity pass
//! over WikiText-2 test, scoring every position or (llama.cpp's protocol, as BitNet's own
//! perplexity script runs it) the second half of each window, whose LM head then covers only those. Threads: `CANDLE_NUM_THREADS` and `RAYON_NUM_THREADS`. The
//! projections are packed as they load (`LoadOptions::pack_for_inference`, what the eval stages
//! do; about 3 GB of RAM); `BENCH_PACK=0` keeps the f32 latents and packs at the first forward
//! (about 11 GB).

use candle_core::{DType, Device, Tensor};
use rpt_flow::model::{Arch, KvCache, LoadOptions, Model, ModelConfig};
use std::time::Instant;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The process's peak resident memory in GiB (VmHWM), Linux only.
fn peak_gib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / (1024.0 * 1024.0))
}

fn main() -> anyhow::Result<()> {
    // As the shipped binary runs a stage: freed memory kept, on a pool worker (exec::threads).
    rpt_flow::exec::memory::keep_freed_memory();
    rpt_flow::exec::threads::on_pool_worker(bench)
}

fn bench() -> anyhow::Result<()> {
    let (reps, prompt, gen) = (env("BENCH_REPS", 2), env("BENCH_PROMPT", 512), env("BENCH_GEN", 16));
    let threads = candle_core::utils::get_num_threads();
    let cfg = ModelConfig::tiny(Arch::Bitnet, 128256, 2560, 6912, 30, 20, 5);
    // Packed as the weights load (the eval stages' way; BENCH_PACK=0: f32 latents kept and
    // packed at the first forward).
    let pack_for_inference = env("BENCH_PACK", 1) != 0;
    let opts = LoadOptions { dtype: DType::F32, device: Device::Cpu, quantization: None, pack_for_inference };
    let t0 = Instant::now();
    // Values rounded to bf16, as the bf16 hub checkpoint loaded in f32 holds them (the
    // generation head then streams its exact bf16 copy).
    let model = Model::random_bf16_values(&cfg, 0, &opts)?;
    let init_s = t0.elapsed().as_secs_f64();
    let ids: Vec<u32> = (0..prompt).map(|i| ((i * 7919) % 128256) as u32).collect();
    let ids = Tensor::from_vec(ids, (1, prompt), &Device::Cpu)?;

    let t0 = Instant::now();
    model.forward(&ids)?; // without BENCH_PACK: packs every projection (cached afterwards)
    let first_s = t0.elapsed().as_secs_f64();
    let mut times = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        model.forward(&ids)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let pp_s = times[times.len() / 2];
    // A llama.cpp-protocol window (what BitNet's own perplexity script runs): the same forward,
    // the LM head only over the scored second half (eval-ppl's way on CPU in f32).
    let half = prompt / 2;
    let mut times = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        let h = model.forward_hidden(&ids, None)?;
        model.logits(&h.narrow(1, half, prompt - half)?)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let half_s = times[times.len() / 2];

    let mut cache = KvCache::new(model.num_layers());
    model.forward_cached(&ids.narrow(1, 0, 16.min(prompt))?, &mut cache, None)?;
    let mut next = Tensor::from_vec(vec![42u32], (1, 1), &Device::Cpu)?;
    let t0 = Instant::now();
    for _ in 0..gen {
        let logits = model.forward_cached(&next, &mut cache, None)?;
        let tok = logits.squeeze(0)?.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        next = Tensor::from_vec(vec![tok], (1, 1), &Device::Cpu)?;
    }
    let gen_s = t0.elapsed().as_secs_f64() / gen as f64;

    let pp_tok_s = prompt as f64 / pp_s;
    // WikiText-2 raw test is 1,290,590 characters: ~0.29 M tokens for GPT-2's tokenizer, fewer
    // for Llama 3's; non-overlapping windows of `prompt` tokens.
    let wikitext_tokens = 290_000.0;
    let weights = if pack_for_inference { "packed as loaded" } else { "f32 latents kept" };
    println!("bitnet-b1.58-2B-4T shape, {weights}, int8 x 2-bit kernel; threads {threads}");
    println!("| threads | random init (s) | first forward (s) | prompt {prompt} tok (s) | prompt tok/s | generation (ms/token) | generation tok/s | peak RSS (GiB) | WikiText-2 test ppl, projected (h) | window, head on the second half (s) | llama.cpp-protocol ppl, projected (h) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    // Both protocols cut the text into the same non-overlapping windows of `prompt` tokens.
    let windows = wikitext_tokens / prompt as f64;
    println!(
        "| {threads} | {init_s:.0} | {first_s:.1} | {pp_s:.2} | {pp_tok_s:.1} | {:.0} | {:.2} | {:.2} | {:.1} | {half_s:.2} | {:.1} |",
        gen_s * 1e3,
        1.0 / gen_s,
        peak_gib().unwrap_or(f64::NAN),
        wikitext_tokens / pp_tok_s / 3600.0,
        windows * half_s / 3600.0
    );
    Ok(())
}
