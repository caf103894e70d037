//! `finetune`: AdamW training of a model on a text source, quantisation-aware for BitNet
//! (straight-through estimators; the latent weights are trained), keeping pruned positions
//! exactly zero (or, as the RPT notebooks did, letting them grow back and reporting the regrowth),
//! checkpointing resumable state so that an interrupted run continues to the same bit-identical
//! result. In a chain, each fine-tune continues the data stream where its lineage stopped.
//! The learning-rate schedule and the clipping factor are `analysis::optim`.

mod criticality;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value as Json};

use crate::analysis::optim;
use crate::data::{self, TrainBatches};
use crate::exec::{
    typed_params, ArtifactType, FileHasher, InputDef, KindSchema, MetricDef, ParamDefault, ParamType, ReportContract,
    Role, Stage, StageContext,
};
use crate::model::adamw::{AdamW, Hyper};
use crate::model::Model;
use crate::stages::common::model_artifact as artifact;
use crate::stages::common::text_param;
use criticality::Criticality;

pub static SCHEMA: KindSchema = KindSchema {
    kind: "finetune",
    version: 3,
    help: "AdamW fine-tuning (quantisation-aware for BitNet), pruned positions kept at zero or free to regrow, resumable mid-stage.",
    inputs: &[InputDef { name: "input", ty: ArtifactType::Model, required: true, help: "the model to train" }],
    params: Params::PARAMS,
    output: ArtifactType::Model,
};

crate::stage_params! {
    #[derive(Clone)]
    struct Params {
        data: Json = text_param::DATA,
        encode: String = text_param::ENCODE,
        min_row_chars: usize = text_param::MIN_ROW_CHARS,
        batches: String {
            ty: ParamType::Enum(&["windows", "chunks"]),
            default: ParamDefault::Json("\"windows\""),
            help: "windows = random windows of seq_len + 1 tokens; chunks = the notebooks' fixed seq_len chunks (range(0, n-L, L)) drawn with replacement, seq_len - 1 targets each",
        },
        stream: String {
            ty: ParamType::Enum(&["continue", "restart"]),
            default: ParamDefault::Json("\"continue\""),
            help: "continue = start the batch stream after the steps the input's lineage was already trained (each chain level sees new batches); restart = from step 0",
        },
        masks: String {
            ty: ParamType::Enum(&["keep", "ignore"]),
            default: ParamDefault::Json("\"keep\""),
            help: "keep = pruned positions stay exactly zero; ignore = they get gradients and may grow back (the notebooks); the output then has no mask",
        },
        optimizer_precision: String {
            ty: ParamType::Enum(&["f32", "model"]),
            default: ParamDefault::Json("\"f32\""),
            help: "f32 = f32 moments and master weights; model = moments and updates in the model's dtype (bf16 on the 2B model, as the notebooks' torch AdamW)",
        },
        steps: u64 {
            ty: ParamType::Int { min: Some(1), max: Some(100_000_000) },
            default: ParamDefault::Json("300"),
            help: "optimizer steps",
        },
        batch: usize {
            ty: ParamType::Int { min: Some(1), max: Some(65_536) },
            default: ParamDefault::Json("64"),
            help: "sequences per step (the effective batch)",
        },
        micro_batch: Option<usize> {
            ty: ParamType::Int { min: Some(1), max: Some(65_536) },
            default: ParamDefault::Optional,
            help: "sequences per forward/backward (gradient accumulation); default = batch",
        },
        seq_len: usize {
            ty: ParamType::Int { min: Some(2), max: Some(1_048_576) },
            default: ParamDefault::Json("128"),
            help: "tokens per sequence",
        },
        lr: f64 {
            ty: ParamType::Float { min: Some(0.0), max: None },
            default: ParamDefault::Json("5e-4"),
            help: "peak learning rate",
        },
        beta1: f64 {
            ty: ParamType::FRACTION,
            default: ParamDefault::Json("0.9"),
            help: "AdamW β1",
        },
        beta2: f64 {
            ty: ParamType::FRACTION,
            default: ParamDefault::Json("0.999"),
            help: "AdamW β2",
        },
        eps: f64 {
            ty: ParamType::Float { min: Some(0.0), max: None },
            default: ParamDefault::Json("1e-8"),
            help: "AdamW ε",
        },
        weight_decay: f64 {
            ty: ParamType::Float { min: Some(0.0), max: None },
            default: ParamDefault::Json("0.01"),
            help: "decoupled weight decay",
        },
        schedule: String {
            ty: ParamType::Enum(&["cosine", "constant"]),
            default: ParamDefault::Json("\"cosine\""),
            help: "cosine = torch CosineAnnealingLR with T_max = steps",
        },
        eta_min: f64 {
            ty: ParamType::Float { min: Some(0.0), max: None },
            default: ParamDefault::Json("0.0"),
            help: "cosine floor",
        },
        warmup_steps: u64 {
            ty: ParamType::UINT,
            default: ParamDefault::Json("0"),
            help: "linear warmup steps",
        },
        grad_clip: Option<f64> {
            ty: ParamType::Float { min: Some(0.0), max: None },
            default: ParamDefault::Optional,
            help: "clip the global gradient norm to this",
        },
        trainable: String {
            ty: ParamType::Enum(&["no-embeddings", "all", "projections", "holographic"]),
            default: ParamDefault::Json("\"no-embeddings\""),
            help: "which tensors train: all but the (tied) embedding, everything, only the projections, or only the holographic-attention tensors (swap-attention)",
        },
        seed: u64 {
            ty: ParamType::UINT,
            default: ParamDefault::PipelineSeed,
            help: "data order seed",
        },
        checkpoint_every: u64 {
            ty: ParamType::Int { min: Some(1), max: None },
            default: ParamDefault::Json("50"),
            help: "steps between resumable checkpoints",
        },
        checkpoint_minutes: f64 {
            ty: ParamType::Float { min: Some(0.0), max: None },
            default: ParamDefault::Json("10.0"),
            help: "also checkpoint when this much time passed since the last one",
        },
        criticality_lambda: Option<f64> {
            ty: ParamType::Float { min: Some(0.0), max: None },
            default: ParamDefault::Optional,
            help: "criticality regulariser: adds λ · mean_l (BR_l − target)² to the loss, BR_l the branching ratio of layer l in the training forward (mean token norm out / in); 0 = only log the per-layer BR; absent = off",
        },
        criticality_target: Option<f64> {
            ty: ParamType::Float { min: Some(0.0), max: None },
            default: ParamDefault::Optional,
            help: "the branching ratio the regulariser pulls towards (default 1, criticality)",
        },
        criticality_layers: Option<criticality::LayerChoice> {
            ty: ParamType::Either(&[ParamType::Enum(&["all", "all-but-first"]), ParamType::List(&ParamType::UINT)]),
            default: ParamDefault::Optional,
            help: "layers in the regulariser: \"all-but-first\" (default; layer 0's ratio reflects the embedding scale, the report excludes it), \"all\" or a list",
        },
    }
}

/// What a checkpoint holds besides tensors.
#[derive(Serialize, Deserialize)]
struct Progress {
    step: u64,
    /// (step, loss) of every step so far.
    loss: Vec<(u64, f64)>,
    /// With the criticality regulariser: (step, branching ratio per chosen layer) …
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    branching: Vec<(u64, Vec<f64>)>,
    /// … and (step, mean_l (BR_l − target)²).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    criticality_term: Vec<(u64, f64)>,
}

/// Its role for reports and every top-level metric `run` writes.
pub static REPORT: ReportContract = ReportContract {
    roles: &[Role::Train],
    metrics: &[
        MetricDef {
            name: "masks",
            always: true,
            help: "the `masks` mode: keep (pruned positions held at zero) or ignore",
        },
        MetricDef { name: "sparsity_before", always: true, help: "projection sparsity of the input" },
        MetricDef { name: "sparsity_after", always: true, help: "projection sparsity after training" },
        MetricDef {
            name: "ternary_zero_after",
            always: true,
            help: "fraction of projection weights quantizing to 0 after training (0 for llama)",
        },
        MetricDef { name: "pruned_positions", always: true, help: "positions the input's mask had pruned" },
        MetricDef { name: "regrown", always: true, help: "of those, how many are non-zero after training" },
        MetricDef { name: "regrown_fraction", always: true, help: "regrown / pruned_positions" },
        MetricDef {
            name: "first_batch",
            always: true,
            help: "index of the first training batch (a chained fine-tune continues the stream)",
        },
        MetricDef { name: "batches", always: true, help: "the `batches` mode: windows or chunks" },
        MetricDef { name: "steps", always: true, help: "optimizer steps" },
        MetricDef { name: "final_loss", always: true, help: "training loss of the last step" },
        MetricDef { name: "loss", always: true, help: "the loss curve: [step, loss] pairs" },
        MetricDef { name: "trainable", always: true, help: "number of parameters trained" },
        MetricDef {
            name: "criticality",
            always: false,
            help: "with criticality_lambda: lambda, target, layers, the per-step branching ratio of each layer and term, and the final per-layer and mean BR",
        },
        MetricDef { name: "tokens_per_second", always: true, help: "training throughput" },
        MetricDef { name: "seconds", always: true, help: "training time" },
        MetricDef { name: "peak_rss_mb", always: true, help: "peak resident memory while training (MiB)" },
    ],
};

pub struct Finetune;

impl Stage for Finetune {
    fn schema(&self) -> &'static KindSchema {
        &SCHEMA
    }

    fn report(&self) -> &'static ReportContract {
        &REPORT
    }

    fn runs_alone(&self) -> bool {
        true // the optimizer state and gradients: the largest footprint of any kind
    }

    fn check(&self, params: &Map<String, Json>) -> Result<(), String> {
        let p: Params = typed_params(params)?;
        let micro = p.micro_batch.unwrap_or(p.batch);
        if micro > p.batch || !p.batch.is_multiple_of(micro) {
            return Err(format!("micro_batch {micro} must divide batch {}", p.batch));
        }
        text_param::encoding(&p.encode, p.min_row_chars)?;
        text_param::source(&p.data)?;
        Criticality::from_params(p.criticality_lambda, p.criticality_target, p.criticality_layers.as_ref(), None)?;
        Ok(())
    }

    fn identity(&self, params: &Map<String, Json>, files: &FileHasher) -> Result<Option<Json>, String> {
        let p: Params = typed_params(params)?;
        text_param::identity(&p.data, files)
    }

    fn run(&self, ctx: &StageContext) -> Result<Json> {
        let p: Params = ctx.params()?;
        let input = ctx.input("input")?;
        let device = artifact::device(ctx.device)?;
        let open = artifact::open(input, &device)?;
        let model = &open.model;
        let tok = open.tokenizer()?;
        let source = text_param::source_at(&p.data, ctx.base_dir)?;
        let encoding = text_param::encoding(&p.encode, p.min_row_chars).map_err(anyhow::Error::msg)?;
        let stream =
            data::encoded_stream(&source, &data::HubOptions::from_env(), tok.inner(), &open.tokenizer_id, encoding)?;
        let batches = Batches::new(&p.batches, stream.ids.clone(), p.seq_len, p.batch, p.seed)?;
        // Where this fine-tune's batches start in the (seed-determined) stream.
        let first_batch = if p.stream == "continue" { open.settings.train_steps } else { 0 };
        let micro = p.micro_batch.unwrap_or(p.batch);

        let params = trainable(model, &p.trainable);
        if params.is_empty() {
            bail!("no trainable parameters (trainable = {:?}; packed checkpoints are frozen)", p.trainable);
        }
        let input_masks = grad_masks(&input.dir, &params, &device)?;
        let keep_masks = p.masks == "keep";
        let masks: Vec<Option<Tensor>> = if keep_masks { input_masks.clone() } else { vec![None; params.len()] };
        let sparsity_before = projection_sparsity(model)?;
        let hyper = Hyper { beta1: p.beta1, beta2: p.beta2, eps: p.eps, weight_decay: p.weight_decay };
        let mut opt = AdamW::new(params.clone(), hyper, p.optimizer_precision == "model")?;
        let reg = Criticality::from_params(
            p.criticality_lambda,
            p.criticality_target,
            p.criticality_layers.as_ref(),
            Some(model.num_layers()),
        )
        .map_err(anyhow::Error::msg)?;
        let mut progress = Progress { step: 0, loss: vec![], branching: vec![], criticality_term: vec![] };
        if let Some(ck) = ctx.partial.latest()? {
            progress = restore(&ck.dir, &params, &mut opt)?;
            ctx.progress.line(&format!("finetune: resumed at step {} of {}", progress.step, p.steps));
        }

        ctx.progress.set_length(p.steps);
        ctx.progress.set_position(progress.step);
        // About twenty info lines per fine-tune, at steps fixed by `steps` alone; every step at debug.
        let log_every = (p.steps / 20).max(1);
        tracing::info!(
            instance = %ctx.instance, data = %source.display_name(), tokens = stream.ids.len(), steps = p.steps,
            from_step = progress.step, batch = p.batch, seq_len = p.seq_len, lr = p.lr, schedule = %p.schedule,
            trainable_tensors = params.len(), log_every, "finetune start"
        );
        let started = Instant::now();
        let mut last_save = Instant::now();
        let start_step = progress.step;
        while progress.step < p.steps {
            ctx.check_cancelled()?;
            let t = progress.step;
            let batch = batches.get(first_batch + t);
            let len = batch.seq_len;
            let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
            let mut loss_sum = 0f64;
            let (mut term_sum, mut ratio_sums) = (0f64, vec![0f64; reg.as_ref().map_or(0, |r| r.layers.len())]);
            for r in (0..p.batch).step_by(micro) {
                let rows = micro.min(p.batch - r);
                let span = r * len..(r + rows) * len;
                let ids = Tensor::from_vec(batch.input_ids[span.clone()].to_vec(), (rows, len), &device)?;
                let targets = Tensor::from_vec(batch.targets[span].to_vec(), rows * len, &device)?;
                let (loss, taps) = match &reg {
                    None => (model.train_loss(&ids, &targets)?, vec![]),
                    Some(c) => {
                        let (logits, taps) = c.forward(model, &ids)?;
                        (crate::model::cross_entropy(&logits.to_dtype(DType::F32)?, &targets)?, taps)
                    }
                };
                let weight = rows as f64 / p.batch as f64;
                loss_sum += loss.to_scalar::<f32>()? as f64 * weight;
                log_gpu_memory(&device, t + 1, r / micro, "forward");
                let objective = match &reg {
                    None => loss,
                    Some(c) => {
                        let (ratios, term) = c.term(&taps)?;
                        term_sum += term.to_scalar::<f32>()? as f64 * weight;
                        for (sum, ratio) in ratio_sums.iter_mut().zip(&ratios) {
                            *sum += ratio.to_scalar::<f32>()? as f64 * weight;
                        }
                        // λ = 0 measures only: the objective is exactly the loss.
                        if c.lambda > 0.0 {
                            (loss + (term * c.lambda)?)?
                        } else {
                            loss
                        }
                    }
                };
                let store = (objective * weight)?.backward()?;
                log_gpu_memory(&device, t + 1, r / micro, "backward");
                for (i, (_, var)) in params.iter().enumerate() {
                    if let Some(g) = store.get(var.as_tensor()) {
                        grads[i] = Some(match grads[i].take() {
                            None => g.clone(),
                            Some(acc) => (acc + g)?,
                        });
                    }
                }
            }
            if !loss_sum.is_finite() {
                bail!(
                    "non-finite loss ({loss_sum}) at step {}; the last good state (step {}) is kept in {} — lower lr or add grad_clip, then run again",
                    t + 1,
                    progress.step,
                    ctx.partial.dir().display()
                );
            }
            let mut grads: Vec<Tensor> = grads
                .into_iter()
                .zip(&params)
                .map(|(g, (_, v))| g.map(Ok).unwrap_or_else(|| v.as_tensor().zeros_like()))
                .collect::<candle_core::Result<_>>()?;
            for (g, m) in grads.iter_mut().zip(&masks) {
                if let Some(m) = m {
                    *g = g.broadcast_mul(&m.to_dtype(g.dtype())?)?;
                }
            }
            if let Some(clip) = p.grad_clip {
                clip_global_norm(&mut grads, clip)?;
            }
            let lr = optim::lr_at(&p.schedule, p.lr, p.eta_min, p.warmup_steps, p.steps, t);
            opt.step(&grads, lr)?;
            drop(grads);
            log_gpu_memory(&device, t + 1, p.batch / micro, "optimizer step");
            progress.step += 1;
            progress.loss.push((progress.step, loss_sum));
            if reg.is_some() {
                progress.branching.push((progress.step, ratio_sums));
                progress.criticality_term.push((progress.step, term_sum));
            }
            let rate = ((progress.step - start_step) as usize * p.batch * len) as f64 / started.elapsed().as_secs_f64();
            ctx.progress.set_detail(&format!("loss {loss_sum:.4} · {rate:.0} tok/s"));
            // Info at step 1, every `log_every` steps and the last; debug otherwise (a tracing
            // level must be a constant, hence the macro).
            macro_rules! step_event {
                ($level:ident) => {
                    tracing::$level!(
                        instance = %ctx.instance,
                        step = progress.step,
                        of = p.steps,
                        loss = loss_sum,
                        lr,
                        tok_per_s = rate,
                        "finetune"
                    )
                };
            }
            if progress.step == 1 || progress.step.is_multiple_of(log_every) || progress.step == p.steps {
                step_event!(info);
            } else {
                step_event!(debug);
            }
            ctx.progress.set_position(progress.step);
            let due = progress.step.is_multiple_of(p.checkpoint_every)
                || last_save.elapsed().as_secs_f64() >= p.checkpoint_minutes * 60.0;
            if due && progress.step < p.steps {
                save_checkpoint(ctx, &progress, &params, &opt)?;
                last_save = Instant::now();
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            instance = %ctx.instance,
            steps = progress.step,
            final_loss = progress.loss.last().map_or(f64::NAN, |l| l.1),
            seconds,
            "finetune done"
        );

        verify_masks(&params, &masks)?;
        let regrowth = regrowth(&params, &input_masks)?;
        model.refresh();
        let mut settings = open.settings.clone();
        settings.source = None;
        settings.train_steps += p.steps;
        artifact::save(model, ctx.out_dir, Some(&open.dir), &settings)?;
        let mask = input.dir.join(artifact::MASK_FILE);
        if mask.exists() && keep_masks {
            artifact::link_or_copy(&mask, &ctx.out_dir.join(artifact::MASK_FILE))?;
        }
        let trained_steps = progress.step - start_step;
        let tokens_per_step = p.batch * batches.get(0).seq_len; // seq_len − 1 per chunk
        let ternary_zero_after =
            if model.config().is_bitnet() { json!(artifact::ternary_zero_fractions(model)?.1) } else { Json::Null };
        let criticality = reg.as_ref().map(|c| {
            let last = progress.branching.last().map(|b| b.1.clone()).unwrap_or_default();
            let mean = if last.is_empty() { Json::Null } else { json!(last.iter().sum::<f64>() / last.len() as f64) };
            json!({
                "lambda": c.lambda,
                "target": c.target,
                "layers": c.layers,
                "branching": progress.branching,
                "term": progress.criticality_term,
                "final_branching": last,
                "final_mean_branching": mean,
            })
        });
        let mut metrics = json!({
            "masks": p.masks,
            "sparsity_before": sparsity_before,
            "sparsity_after": projection_sparsity(model)?,
            "ternary_zero_after": ternary_zero_after,
            "pruned_positions": regrowth.0,
            "regrown": regrowth.1,
            "regrown_fraction": if regrowth.0 > 0 { json!(regrowth.1 as f64 / regrowth.0 as f64) } else { Json::Null },
            "first_batch": first_batch,
            "batches": p.batches,
            "steps": p.steps,
            "final_loss": progress.loss.last().map(|l| l.1),
            "loss": progress.loss,
            "trainable": params.iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
            "tokens_per_second": (trained_steps as usize * tokens_per_step) as f64 / seconds.max(1e-9),
            "seconds": seconds,
            "peak_rss_mb": crate::exec::memory::peak_rss_mb(),
        });
        if let Some(c) = criticality {
            metrics["criticality"] = c;
        }
        Ok(metrics)
    }
}

fn trainable(model: &Model, mode: &str) -> Vec<(String, Var)> {
    let (projections, embeddings) = (model.projection_names(), model.embedding_names());
    model
        .named_parameters()
        .into_iter()
        .filter(|(name, _)| match mode {
            "all" => true,
            "projections" => projections.contains(name),
            "holographic" => name.contains(".holographic."),
            _ => !embeddings.contains(name),
        })
        .collect()
}

/// 1 where a weight may change, 0 where it was pruned (from the input's mask), per parameter.
fn grad_masks(entry: &Path, params: &[(String, Var)], device: &Device) -> Result<Vec<Option<Tensor>>> {
    let masks = artifact::read_mask(entry)?.unwrap_or_default();
    params.iter().map(|(name, _)| masks.get(name).map(|m| m.to_tensor(device)).transpose()).collect()
}

/// The batches of a fine-tune: random windows, or the notebooks' chunks with replacement.
enum Batches {
    Windows(TrainBatches),
    Chunks(data::ChunkBatches),
}

impl Batches {
    fn new(kind: &str, tokens: std::sync::Arc<Vec<u32>>, seq_len: usize, batch: usize, seed: u64) -> Result<Batches> {
        Ok(match kind {
            "chunks" => Batches::Chunks(data::ChunkBatches::new(tokens, seq_len, batch, seed)?),
            _ => Batches::Windows(TrainBatches::new(tokens, seq_len, batch, seed)?),
        })
    }

    fn get(&self, step: u64) -> data::Batch {
        match self {
            Batches::Windows(b) => b.get(step),
            Batches::Chunks(b) => b.get(step),
        }
    }
}

/// Fraction of the projection weights that are exactly zero.
fn projection_sparsity(model: &Model) -> Result<f64> {
    let (mut zeros, mut total) = (0f64, 0f64);
    for (_, w) in model.projections()? {
        if w.dtype() == DType::U8 {
            continue;
        }
        zeros += artifact::count_true(&w.eq(0f64)?)? as f64;
        total += w.elem_count() as f64;
    }
    Ok(if total > 0.0 { zeros / total } else { 0.0 })
}

/// Positions the input's mask marks as pruned, and how many of them are nonzero now.
fn regrowth(params: &[(String, Var)], masks: &[Option<Tensor>]) -> Result<(u64, u64)> {
    let (mut pruned, mut regrown) = (0u64, 0u64);
    for ((_, var), m) in params.iter().zip(masks) {
        let Some(m) = m else { continue };
        let is_pruned = m.eq(0f64)?; // 1 where pruned
        let nonzero = var.as_tensor().ne(0f64)?;
        pruned += artifact::count_true(&is_pruned)?;
        regrown += artifact::count_true(&(nonzero * is_pruned)?)?;
    }
    Ok((pruned, regrown))
}

/// Fails if any pruned position of a trained parameter is not exactly zero.
fn verify_masks(params: &[(String, Var)], masks: &[Option<Tensor>]) -> Result<()> {
    for ((name, var), m) in params.iter().zip(masks) {
        let Some(m) = m else { continue };
        let w = var.as_tensor().to_dtype(DType::F32)?;
        let pruned = m.to_dtype(DType::F32)?.affine(-1.0, 1.0)?; // 1 where pruned
        let moved = (w.abs()? * pruned)?.sum_all()?.to_scalar::<f32>()?;
        if moved != 0.0 {
            bail!("pruned weights of `{name}` moved during fine-tuning (|Σ| = {moved}): the mask was not respected");
        }
    }
    Ok(())
}

/// Clips the gradients' global norm to `max_norm` (the factor: [`optim::clip_scale`]).
fn clip_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<()> {
    let squared = grads
        .iter()
        .map(|g| Ok(g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64))
        .collect::<Result<Vec<f64>>>()?;
    if let Some(scale) = optim::clip_scale(squared, max_norm) {
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(())
}

fn save_checkpoint(ctx: &StageContext, progress: &Progress, params: &[(String, Var)], opt: &AdamW) -> Result<()> {
    let weights: BTreeMap<String, Tensor> = params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let state = serde_json::to_string(&json!({ "progress": progress, "adam_t": opt.t }))?;
    let moments = opt.state()?;
    tracing::debug!(instance = %ctx.instance, step = progress.step, "finetune checkpoint");
    ctx.partial.save(progress.step, |dir| {
        save_tensors(&dir.join("params.safetensors"), &weights)?;
        save_tensors(&dir.join("adamw.safetensors"), &moments)?;
        std::fs::write(dir.join("state.json"), &state)?;
        Ok(())
    })?;
    Ok(())
}

fn restore(dir: &Path, params: &[(String, Var)], opt: &mut AdamW) -> Result<Progress> {
    let state: Json = serde_json::from_str(&std::fs::read_to_string(dir.join("state.json"))?)?;
    let progress: Progress = serde_json::from_value(state["progress"].clone())?;
    let t = state["adam_t"].as_u64().context("checkpoint state.json lacks adam_t")?;
    let device = params.first().map(|(_, v)| v.device().clone()).unwrap_or(Device::Cpu);
    let weights = load_tensors(&dir.join("params.safetensors"), &device)?;
    for (name, var) in params {
        let w = weights.get(name).with_context(|| format!("checkpoint lacks `{name}`"))?;
        var.set(&w.to_dtype(var.dtype())?)?;
    }
    opt.load_state(&load_tensors(&dir.join("adamw.safetensors"), &device)?, t)?;
    Ok(progress)
}

fn save_tensors(path: &Path, map: &BTreeMap<String, Tensor>) -> Result<()> {
    let map: std::collections::HashMap<String, Tensor> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    candle_core::safetensors::save(&map, path).with_context(|| format!("writing {}", path.display()))
}

fn load_tensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(path, device)
        .with_context(|| format!("reading {}", path.display()))?
        .into_iter()
        .collect())
}

/// At debug level on a CUDA device: the GPU memory in use (the driver's total − free, after a
/// synchronise) at a point of a step, to see where a fine-tune's memory goes.
fn log_gpu_memory(device: &Device, step: u64, micro: usize, after: &str) {
    if !device.is_cuda() || !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    #[cfg(feature = "cuda")]
    if device.synchronize().is_ok() {
        if let Ok((free, total)) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info() {
            tracing::debug!(step, micro, after, gpu_used_mib = (total - free) >> 20, "finetune memory");
        }
    }
    let _ = (step, micro, after);
}
