//! `bench-forward`: the speed and memory of one forward of the model's body (embedding → layers
//! → final norm; the LM head is left out, it costs the same for every attention) at several
//! sequence lengths. A measurement of this machine, not a reproducible number: the output records
//! the device and thread count beside it, and a cached result is the measurement made then
//! (`rpt-flow cache rm` the entry to measure again).

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde_json::{json, Map, Value as Json};

use crate::exec::memory::{peak_rss_mb, reset_peak, rss_mb};
use crate::exec::{
    typed_params, ArtifactType, InputDef, KindSchema, MetricDef, ParamDefault, ParamType, ReportContract, Role, Stage,
    StageContext,
};
use crate::rng::SplitMix64;
use crate::stages::common::model_artifact as artifact;

pub static SCHEMA: KindSchema = KindSchema {
    kind: "bench-forward",
    version: 1,
    help: "Times one forward of the model's body (no LM head) at each sequence length: tokens/s (median of `repeats` after `warmup`) and peak memory (CPU: the resident high-water mark during the forwards, and how far it rose above the resting process; CUDA: not measured). Lengths beyond max_position_embeddings extend RoPE for timing only.",
    inputs: &[InputDef { name: "input", ty: ArtifactType::Model, required: true, help: "the model to time" }],
    params: Params::PARAMS,
    output: ArtifactType::Metrics,
};

crate::stage_params! {
    struct Params {
        lengths: Vec<usize> {
            ty: ParamType::List(&ParamType::Int { min: Some(1), max: Some(1_048_576) }),
            default: ParamDefault::Json("[512, 1024, 2048, 4096, 8192]"),
            help: "sequence lengths to time",
        },
        batch: usize {
            ty: ParamType::Int { min: Some(1), max: Some(4096) },
            default: ParamDefault::Json("1"),
            help: "sequences per forward",
        },
        repeats: usize {
            ty: ParamType::Int { min: Some(1), max: Some(1000) },
            default: ParamDefault::Json("3"),
            help: "timed forwards per length (the median is reported)",
        },
        warmup: usize {
            ty: ParamType::Int { min: Some(0), max: Some(1000) },
            default: ParamDefault::Json("1"),
            help: "untimed forwards per length first",
        },
        seed: u64 {
            ty: ParamType::UINT,
            default: ParamDefault::PipelineSeed,
            help: "seed of the random token ids",
        },
    }
}

pub static REPORT: ReportContract = ReportContract {
    roles: &[Role::Speed],
    metrics: &[
        MetricDef { name: "attention", always: true, help: "\"full\" or the holographic setting of the timed model" },
        MetricDef { name: "device", always: true, help: "where it ran, and the CPU threads" },
        MetricDef { name: "batch", always: true, help: "sequences per forward" },
        MetricDef {
            name: "lengths",
            always: true,
            help: "per length: tokens_per_second, seconds (median), peak_memory_mb (the process's resident high-water mark during the timed forwards) and forward_memory_mb (that peak above the resident memory just before them: what the forward needed), null where not measured; beyond_context",
        },
        MetricDef { name: "max_position_embeddings", always: true, help: "the model's trained context" },
    ],
};

pub struct BenchForward;

impl Stage for BenchForward {
    fn schema(&self) -> &'static KindSchema {
        &SCHEMA
    }

    fn report(&self) -> &'static ReportContract {
        &REPORT
    }

    fn check(&self, params: &Map<String, Json>) -> Result<(), String> {
        let p: Params = typed_params(params)?;
        if p.lengths.is_empty() {
            return Err("lengths is empty: name at least one sequence length".into());
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext) -> Result<Json> {
        let p: Params = ctx.params()?;
        let input = ctx.input("input")?;
        let device = artifact::device(ctx.device)?;
        let mut open = artifact::open(input, &device)?;
        let cfg = open.model.config().clone();
        let longest = p.lengths.iter().copied().max().unwrap_or(0);
        open.model.extend_positions(longest)?;
        let model = &open.model;
        let attention = match &cfg.holographic {
            None => "full".to_string(),
            Some(h) => format!("holographic w={} R={}", h.window, h.regions),
        };
        let mut rng = SplitMix64::new(p.seed);
        let mut rows = Vec::new();
        for &n in &p.lengths {
            let ids: Vec<u32> = (0..p.batch * n).map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32).collect();
            let ids = Tensor::from_vec(ids, (p.batch, n), &device)?;
            let forward = || -> Result<f64> {
                ctx.check_cancelled()?;
                let start = Instant::now();
                let h = model.forward_hidden(&ids, None)?;
                device.synchronize()?;
                drop(h);
                Ok(start.elapsed().as_secs_f64())
            };
            for _ in 0..p.warmup {
                forward()?;
            }
            let cpu = device.is_cpu();
            let measured = cpu && reset_peak();
            let resting = if measured { rss_mb() } else { None };
            let mut times = (0..p.repeats).map(|_| forward()).collect::<Result<Vec<f64>>>()?;
            let peak = if measured { peak_rss_mb() } else { None };
            // What the forward itself added on top of the resting process (model, earlier stages).
            let forward_mb = peak.zip(resting).map(|(p, r)| (p - r).max(0.0));
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            if median.is_nan() || median <= 0.0 {
                bail!("a forward of {n} tokens took no measurable time");
            }
            ctx.progress.set_detail(&format!("{n} tokens: {:.0} tokens/s", (p.batch * n) as f64 / median));
            tracing::info!(
                instance = %ctx.instance, length = n, tok_per_s = (p.batch * n) as f64 / median, seconds = median,
                forward_memory_mb = ?forward_mb, "bench-forward"
            );
            rows.push(json!({
                "length": n,
                "tokens_per_second": (p.batch * n) as f64 / median,
                "seconds": median,
                "peak_memory_mb": peak,
                "forward_memory_mb": forward_mb,
                "beyond_context": n > cfg.max_position_embeddings,
            }));
        }
        let threads = if device.is_cpu() { candle_core::utils::get_num_threads() } else { 0 };
        Ok(json!({
            "attention": attention,
            "device": if device.is_cpu() { format!("{} ({threads} threads)", ctx.device) } else { ctx.device.to_string() },
            "batch": p.batch,
            "lengths": rows,
            "max_position_embeddings": cfg.max_position_embeddings,
        }))
    }
}
