//! `train-ep`: trains a layered Hopfield network from scratch on next-byte prediction with
//! equilibrium propagation (one-sided or symmetric) or with the true equilibrium gradient
//! ("backprop": implicit differentiation), on the same batches with the same optimiser, and
//! measures the loss curve, held-out perplexity, wall time and EP's cosine to the true gradient.
//! The maths is `analysis::equilibrium`; docs/equilibrium.md explains it.

use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::{json, Map, Value as Json};

use crate::analysis::equilibrium::{
    batch_gradient, bytes, mean_cost, AdjointCounts, Cg, Method, Network, Optimizer, Output, PhaseCounts, Relax,
    Settings,
};
use crate::exec::{
    typed_params, ArtifactType, FileHasher, KindSchema, MetricDef, ParamDef, ParamDefault, ParamType, ReportContract,
    Role, Stage, StageContext,
};
use crate::stages::common::text_param;

pub static SCHEMA: KindSchema = KindSchema {
    kind: "train-ep",
    version: 1,
    help: "Trains a layered continuous Hopfield network (one-hot bytes of the previous `context` bytes clamped, tanh hidden layers, 256 output logits under a softmax: read out of the last hidden layer, or a linear layer of the energy) from scratch on next-byte prediction, by equilibrium propagation (`ep`, `ep-symmetric`) or by the true gradient of the loss at the free equilibrium (`backprop`, implicit differentiation); same batches, initialisation and optimiser for every method. Reports the loss curve, held-out perplexity on `eval_data`, wall time and, for EP, the cosine between its update and the true gradient. No model artifact.",
    inputs: &[],
    params: Params::PARAMS,
    output: ArtifactType::Metrics,
};

const EVAL_DATA: ParamDef = ParamDef {
    name: "eval_data",
    ty: ParamType::Either(&[ParamType::Str, ParamType::Table]),
    default: ParamDefault::Required,
    help: "held-out text for the perplexity, a source like `data` (another split: \"synthetic:facts:test\", \"wikitext-2-raw-v1:test\")",
};

const POSITIVE: ParamType = ParamType::Float { min: Some(0.0), max: None };

crate::stage_params! {
    struct Params {
        data: Json = text_param::DATA,
        eval_data: Json = EVAL_DATA,
        method: String {
            ty: ParamType::Enum(&Method::NAMES),
            default: ParamDefault::Json("\"ep\""),
            help: "ep = (∂E/∂θ at s^β − at s^0)/β; ep-symmetric = (at s^β − at s^−β)/2β; backprop = the true gradient of C(s*) (the adjoint system solved by conjugate gradients)",
        },
        output: String {
            ty: ParamType::Enum(&Output::NAMES),
            default: ParamDefault::Json("\"readout\""),
            help: "readout = the 256 logits read out of the last hidden layer at equilibrium, outside the energy (its weights get their exact local gradient); layer = the logits are a linear layer of the energy, relaxed with the rest and feeding back into the hidden layers (their activity then locks the hidden state: see docs/equilibrium.md)",
        },
        optimizer: String {
            ty: ParamType::Enum(&Optimizer::NAMES),
            default: ParamDefault::Json("\"adam\""),
            help: "applied to every method's gradient alike: plain SGD or Adam (β₁ 0.9, β₂ 0.999)",
        },
        steps: u64 {
            ty: ParamType::Int { min: Some(1), max: Some(10_000_000) },
            default: ParamDefault::Json("1000"),
            help: "optimiser steps",
        },
        batch: usize {
            ty: ParamType::Int { min: Some(1), max: Some(65_536) },
            default: ParamDefault::Json("16"),
            help: "examples (byte positions) per step, drawn from (seed, step) alone",
        },
        lr: f64 {
            ty: POSITIVE,
            default: ParamDefault::Json("0.003"),
            help: "learning rate (> 0)",
        },
        beta: f64 {
            ty: POSITIVE,
            default: ParamDefault::Json("0.1"),
            help: "EP's nudge strength β (> 0): the estimate's bias is O(β) (O(β²) symmetric), its noise from relaxation error O(tolerance/β)",
        },
        eta: f64 {
            ty: POSITIVE,
            default: ParamDefault::Json("0.5"),
            help: "relaxation step size η: s ← s − η·∂F/∂s (> 0; the energy falls monotonically only for η below 2 / the largest curvature)",
        },
        free_steps: usize {
            ty: ParamType::Int { min: Some(1), max: Some(1_000_000) },
            default: ParamDefault::Json("200"),
            help: "step budget of a free relaxation (and of the evaluation's)",
        },
        nudged_steps: usize {
            ty: ParamType::Int { min: Some(1), max: Some(1_000_000) },
            default: ParamDefault::Json("100"),
            help: "step budget of a nudged relaxation",
        },
        tolerance: f64 {
            ty: POSITIVE,
            default: ParamDefault::Json("1e-6"),
            help: "a relaxation has converged once a step of size eta would move no unit by this much (> 0)",
        },
        hidden: Vec<usize> {
            ty: ParamType::List(&ParamType::Int { min: Some(1), max: Some(4096) }),
            default: ParamDefault::Json("[64, 64]"),
            help: "units of each hidden layer, input side first (at least one; with a readout, one layer has no coupling between free units, so two make the relaxation a real one)",
        },
        context: usize {
            ty: ParamType::Int { min: Some(1), max: Some(64) },
            default: ParamDefault::Json("3"),
            help: "previous bytes clamped as input (context · 256 one-hot units)",
        },
        init_gain: f64 {
            ty: POSITIVE,
            default: ParamDefault::Json("1.0"),
            help: "initial weights: W_1 ~ N(0, gain²/context) (a unit drive); between free layers N(0, gain²/(√n_in + √n_out)²), spectral norm ≈ gain (below 1 the energy starts convex, relaxation fast); biases 0",
        },
        eval_tokens: usize {
            ty: ParamType::Int { min: Some(1), max: Some(10_000_000) },
            default: ParamDefault::Json("2000"),
            help: "held-out bytes scored, evenly spaced over eval_data (all of them when it is shorter)",
        },
        cosine_every: u64 {
            ty: ParamType::Int { min: Some(1), max: None },
            default: ParamDefault::Json("10"),
            help: "EP methods: every this many steps (and at the first), also compute the true gradient on the batch and log its cosine with EP's",
        },
        adjoint_tolerance: f64 {
            ty: POSITIVE,
            default: ParamDefault::Json("1e-8"),
            help: "conjugate gradients on the adjoint system stop at ‖residual‖ ≤ this · ‖∂C/∂s‖ (> 0)",
        },
        adjoint_iterations: usize {
            ty: ParamType::Int { min: Some(1), max: Some(1_000_000) },
            default: ParamDefault::Json("1000"),
            help: "conjugate-gradient iterations allowed",
        },
        seed: u64 {
            ty: ParamType::UINT,
            default: ParamDefault::PipelineSeed,
            help: "initial weights and the batch stream (the same for every method)",
        },
    }
}

pub static REPORT: ReportContract = ReportContract {
    roles: &[Role::Equilibrium],
    metrics: &[
        MetricDef { name: "method", always: true, help: "ep, ep-symmetric or backprop" },
        MetricDef { name: "output", always: true, help: "readout or layer: where the logits sit" },
        MetricDef { name: "data", always: true, help: "the training text" },
        MetricDef { name: "eval_data", always: true, help: "the held-out text" },
        MetricDef { name: "steps", always: true, help: "optimiser steps" },
        MetricDef { name: "parameters", always: true, help: "weights and biases of the network" },
        MetricDef { name: "loss", always: true, help: "the loss curve: [step, mean cost of the batch at its free equilibria] pairs, before each update" },
        MetricDef { name: "final_loss", always: true, help: "mean of the last 10% of the loss curve (at least one step)" },
        MetricDef { name: "ppl", always: true, help: "held-out perplexity: exp of the mean cross-entropy at the free equilibria of the eval examples" },
        MetricDef { name: "eval_loss", always: true, help: "that mean cross-entropy (nats/byte)" },
        MetricDef { name: "eval_tokens", always: true, help: "held-out bytes scored" },
        MetricDef { name: "unigram_ppl", always: true, help: "the same bytes' perplexity under add-one-smoothed byte frequencies of the training text: the bar of a model that ignores its context" },
        MetricDef { name: "seconds", always: true, help: "training wall time, without the cosine checks' extra true gradients" },
        MetricDef { name: "check_seconds", always: true, help: "wall time of those extra true gradients (EP methods)" },
        MetricDef { name: "eval_seconds", always: true, help: "wall time of the held-out evaluation" },
        MetricDef { name: "cosine", always: true, help: "EP methods: {step, cosine, norm_ratio} of the batch's EP estimate against the true gradient every cosine_every steps (norm_ratio = ‖EP‖/‖true‖); empty for backprop" },
        MetricDef { name: "cosine_mean", always: true, help: "mean of those cosines; null for backprop" },
        MetricDef { name: "relaxation", always: true, help: "per phase (free, nudged, eval): relaxations, mean_steps, unconverged (ended before a step of size eta moved every unit by less than tolerance) and halved (had to halve eta: a step would have raised the energy)" },
        MetricDef { name: "adjoint", always: true, help: "true-gradient solves (backprop's, and EP's cosine checks): solves, mean_iterations of conjugate gradients, failed (the Hessian was not positive definite at an unconverged state, or CG ran out; such an example is left out)" },
    ],
};

pub struct TrainEp;

/// A relaxation phase's counts as metrics.
fn phase_json(c: &PhaseCounts) -> Json {
    let mean = if c.relaxations == 0 { Json::Null } else { json!(c.steps as f64 / c.relaxations as f64) };
    json!({ "relaxations": c.relaxations, "mean_steps": mean, "unconverged": c.unconverged, "halved": c.halved })
}

/// The adjoint solves as metrics.
fn adjoint_json(c: &AdjointCounts) -> Json {
    let mean =
        if c.solves == 0 { Json::Null } else { json!(c.iterations as f64 / (c.solves - c.failed).max(1) as f64) };
    json!({ "solves": c.solves, "mean_iterations": mean, "failed": c.failed })
}

/// The largest network `train-ep` builds.
const MAX_PARAMETERS: usize = 20_000_000;

/// The checks beyond the types, phrased as what to change.
fn check_params(p: &Params) -> Result<(), String> {
    for (name, v) in [
        ("lr", p.lr),
        ("beta", p.beta),
        ("eta", p.eta),
        ("tolerance", p.tolerance),
        ("init_gain", p.init_gain),
        ("adjoint_tolerance", p.adjoint_tolerance),
    ] {
        if !(v > 0.0 && v.is_finite()) {
            return Err(format!("{name}: {v} is not a positive number; it must be > 0"));
        }
    }
    if p.hidden.is_empty() {
        return Err("hidden: an empty list; name at least one hidden layer, e.g. hidden = [64] (without one the network is a linear model and EP has nothing to propagate)".into());
    }
    // Dense f64 on the CPU, three copies with Adam: refuse what cannot be meant before it runs.
    let mut sizes = vec![p.context * bytes::VOCAB];
    sizes.extend(&p.hidden);
    sizes.push(bytes::VOCAB);
    let parameters: usize = sizes.windows(2).map(|w| w[0] * w[1] + w[1]).sum();
    if parameters > MAX_PARAMETERS {
        return Err(format!(
            "hidden: the network would have {parameters} parameters (more than {MAX_PARAMETERS}; dense f64 on the CPU); use smaller hidden layers or a shorter context"
        ));
    }
    let (data, eval) = (text_param::source(&p.data)?, text_param::source(&p.eval_data)?);
    if data == eval {
        return Err(format!(
            "eval_data: names the training text ({}), so the perplexity would not be held out; name another split, e.g. \"synthetic:facts:test\" or \"wikitext-2-raw-v1:test\"",
            data.display_name()
        ));
    }
    Ok(())
}

impl Stage for TrainEp {
    fn schema(&self) -> &'static KindSchema {
        &SCHEMA
    }

    fn report(&self) -> &'static ReportContract {
        &REPORT
    }

    fn check(&self, params: &Map<String, Json>) -> Result<(), String> {
        check_params(&typed_params(params)?)
    }

    fn identity(&self, params: &Map<String, Json>, files: &FileHasher) -> Result<Option<Json>, String> {
        let p: Params = typed_params(params)?;
        let id = |v: &Json| text_param::identity(v, files).map(|i| i.map(|mut o| o["data"].take()));
        Ok(Some(json!({ "data": id(&p.data)?, "eval_data": id(&p.eval_data)? })))
    }

    fn run(&self, ctx: &StageContext) -> Result<Json> {
        let p: Params = ctx.params()?;
        check_params(&p).map_err(anyhow::Error::msg)?;
        let train_src = text_param::source_at(&p.data, ctx.base_dir)?;
        let eval_src = text_param::source_at(&p.eval_data, ctx.base_dir)?;
        let (train_text, eval_text) = (train_src.text()?, eval_src.text()?);
        let (train, held) = (train_text.text.as_bytes(), eval_text.text.as_bytes());
        for (name, src, b) in [("data", &train_src, train), ("eval_data", &eval_src, held)] {
            if b.len() <= p.context {
                bail!(
                    "{name}: {} has {} bytes, too few for a context of {} bytes and a target; use a longer text or a shorter context",
                    src.display_name(),
                    b.len(),
                    p.context
                );
            }
        }
        let method = Method::parse(&p.method)?;
        let settings = Settings {
            method,
            beta: p.beta,
            free: Relax { eta: p.eta, max_steps: p.free_steps, tol: p.tolerance },
            nudged: Relax { eta: p.eta, max_steps: p.nudged_steps, tol: p.tolerance },
            cg: Cg { tol: p.adjoint_tolerance, max_iter: p.adjoint_iterations },
        };
        let mut sizes = vec![p.context * bytes::VOCAB];
        sizes.extend(&p.hidden);
        sizes.push(bytes::VOCAB);
        let output = Output::parse(&p.output)
            .ok_or_else(|| anyhow::anyhow!("output: \"{}\" is not one of {}", p.output, Output::NAMES.join(", ")))?;
        let mut net = Network::init(&sizes, output, p.context, p.init_gain, p.seed);
        let mut opt = Optimizer::new(&p.optimizer, &net)?;

        ctx.progress.set_length(p.steps);
        let (mut loss, mut cosines) = (Vec::new(), Vec::new());
        let (mut free, mut nudged) = (PhaseCounts::default(), PhaseCounts::default());
        let mut adjoint = AdjointCounts::default();
        let mut check_seconds = 0.0;
        let started = Instant::now();
        for step in 0..p.steps {
            ctx.check_cancelled()?;
            let batch = bytes::batch_at(train, p.context, p.batch, p.seed, step);
            let compare = step % p.cosine_every == 0;
            let out = batch_gradient(&net, &batch, &settings, compare)
                .map_err(|e| e.context(format!("step {step} of method {}", p.method)))?;
            if !out.loss.is_finite() {
                bail!("step {step}: the loss is {}; lower lr or eta", out.loss);
            }
            opt.step(&mut net, &out.gradient, p.lr);
            loss.push(json!([step, out.loss]));
            if let Some(a) = out.agreement {
                cosines.push(json!({ "step": step, "cosine": a.cosine, "norm_ratio": a.norm_ratio }));
            }
            free.merge(&out.free);
            nudged.merge(&out.nudged);
            adjoint.merge(&out.adjoint);
            check_seconds += out.check_seconds;
            ctx.progress.set_position(step + 1);
            ctx.progress.set_detail(&format!("loss {:.3}", out.loss));
            if step == 0 || (step + 1).is_multiple_of((p.steps / 20).max(1)) {
                tracing::info!(instance = %ctx.instance, step = step + 1, of = p.steps, loss = out.loss, "train-ep");
            } else {
                tracing::debug!(instance = %ctx.instance, step = step + 1, of = p.steps, loss = out.loss, "train-ep");
            }
        }
        let seconds = started.elapsed().as_secs_f64() - check_seconds;

        let started = Instant::now();
        let examples = bytes::spread_examples(held, p.context, p.eval_tokens);
        let (eval_loss, eval_counts) = mean_cost(&net, &examples, &settings.free)?;
        let eval_seconds = started.elapsed().as_secs_f64();

        let tail = (loss.len() / 10).max(1);
        let final_loss =
            loss[loss.len() - tail..].iter().map(|l| l[1].as_f64().unwrap_or(f64::NAN)).sum::<f64>() / tail as f64;
        let cos: Vec<f64> = cosines.iter().filter_map(|c| c["cosine"].as_f64()).collect();
        let cosine_mean = (!cos.is_empty()).then(|| cos.iter().sum::<f64>() / cos.len() as f64);
        tracing::info!(
            instance = %ctx.instance, method = %p.method, final_loss, eval_loss, cosine_mean = ?cosine_mean, seconds,
            "train-ep done"
        );
        Ok(json!({
            "method": p.method,
            "output": p.output,
            "data": train_src.display_name(),
            "eval_data": eval_src.display_name(),
            "steps": p.steps,
            "parameters": net.count(),
            "loss": loss,
            "final_loss": final_loss,
            "ppl": eval_loss.exp(),
            "eval_loss": eval_loss,
            "eval_tokens": examples.len(),
            "unigram_ppl": bytes::unigram_ppl(train, &examples),
            "seconds": seconds,
            "check_seconds": check_seconds,
            "eval_seconds": eval_seconds,
            "cosine": cosines,
            "cosine_mean": cosine_mean,
            "relaxation": {
                "free": phase_json(&free),
                "nudged": phase_json(&nudged),
                "eval": phase_json(&eval_counts),
            },
            "adjoint": adjoint_json(&adjoint),
        }))
    }
}
