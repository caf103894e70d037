//! Small stage kinds that exercise the engine without any model: deterministic "weights" in a
//! JSON file, a multi-step transform with resumable state, evaluation, text, and failure.
//! Used by the `toy-flow` example binary that the engine's CLI tests run.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rpt_flow::exec::{
    typed_params, ArtifactType, InputDef, KindSchema, ParamDef, ParamDefault, ParamType, Registry, Stage, StageContext,
};
use serde::Deserialize;
use serde_json::{json, Map, Value as Json};

/// Appends `<instance> <key>` to the file named by TOY_LOG: tests count computations with it.
fn log_computation(ctx: &StageContext) -> Result<()> {
    if let Ok(path) = std::env::var("TOY_LOG") {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        f.write_all(format!("{} {}\n", ctx.instance, ctx.key).as_bytes())?;
    }
    Ok(())
}

/// Appends `<instance> start|end <unix nanoseconds>` to the file named by TOY_SPANS: tests see
/// which instances ran at the same time.
fn log_span(ctx: &StageContext, what: &str) -> Result<()> {
    if let Ok(path) = std::env::var("TOY_SPANS") {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        f.write_all(format!("{} {what} {nanos}\n", ctx.instance).as_bytes())?;
    }
    Ok(())
}

fn read_weights(dir: &Path) -> Result<Vec<f64>> {
    let text = std::fs::read_to_string(dir.join("weights.json")).context("reading weights.json")?;
    Ok(serde_json::from_str(&text)?)
}

fn write_weights(dir: &Path, w: &[f64]) -> Result<()> {
    std::fs::write(dir.join("weights.json"), serde_json::to_string(w)?)?;
    Ok(())
}

fn lcg(seed: u64) -> impl FnMut() -> f64 {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 11) as f64) / ((1u64 << 53) as f64) - 0.5
    }
}

// ---- toy-load ----------------------------------------------------------------------------

rpt_flow::stage_params! {
    struct LoadParams {
        size: usize {
            ty: ParamType::Int { min: Some(1), max: Some(1_000_000) },
            default: ParamDefault::Json("8"),
            help: "number of weights",
        },
        seed: i64 {
            ty: ParamType::INT,
            default: ParamDefault::PipelineSeed,
            help: "random seed",
        },
        source: Option<String> {
            ty: ParamType::Str,
            default: ParamDefault::Optional,
            help: "a file whose content seeds the weights",
        },
    }
}

static LOAD: KindSchema = KindSchema {
    kind: "toy-load",
    version: 1,
    help: "Makes a deterministic weight vector from a seed (and a source file's bytes).",
    inputs: &[],
    params: LoadParams::PARAMS,
    output: ArtifactType::Model,
};

struct ToyLoad;

impl Stage for ToyLoad {
    fn schema(&self) -> &'static KindSchema {
        &LOAD
    }
    fn check(&self, params: &Map<String, Json>) -> Result<(), String> {
        typed_params::<LoadParams>(params).map(|_| ())
    }
    fn identity(&self, params: &Map<String, Json>, files: &rpt_flow::exec::FileHasher) -> Result<Option<Json>, String> {
        let p: LoadParams = typed_params(params)?;
        match p.source {
            None => Ok(None),
            Some(path) => {
                let hash = files.hash_file(Path::new(&path)).map_err(|e| format!("source: {e:#}"))?;
                Ok(Some(json!({ "source_blake3": hash })))
            }
        }
    }
    fn run(&self, ctx: &StageContext) -> Result<Json> {
        let p: LoadParams = ctx.params()?;
        log_computation(ctx)?;
        let mut seed = p.seed as u64;
        if let Some(path) = &p.source {
            seed ^= u64::from_le_bytes(blake3::hash(&std::fs::read(path)?).as_bytes()[..8].try_into()?);
        }
        let mut next = lcg(seed);
        let w: Vec<f64> = (0..p.size).map(|_| next()).collect();
        write_weights(ctx.out_dir, &w)?;
        Ok(json!({ "size": p.size, "sum": w.iter().sum::<f64>() }))
    }
}

// ---- toy-scale: multi-step, resumable -----------------------------------------------------

rpt_flow::stage_params! {
    struct ScaleParams {
        factor: f64 {
            ty: ParamType::FLOAT,
            default: ParamDefault::Required,
            help: "multiplier per step",
        },
        steps: u64 {
            ty: ParamType::Int { min: Some(1), max: None },
            default: ParamDefault::Json("1"),
            help: "number of steps",
        },
        sleep_ms: u64 {
            ty: ParamType::UINT,
            default: ParamDefault::Json("0"),
            help: "pause per step (tests)",
        },
        checkpoint_every: u64 {
            ty: ParamType::Int { min: Some(1), max: None },
            default: ParamDefault::Json("1"),
            help: "steps between checkpoints",
        },
        fail_at_step: Option<u64> {
            ty: ParamType::UINT,
            default: ParamDefault::Optional,
            help: "fail when reaching this step (tests)",
        },
    }
}

static SCALE: KindSchema = KindSchema {
    kind: "toy-scale",
    version: 1,
    help:
        "Multiplies the weights by `factor` and adds a step-dependent term, `steps` times, with resumable checkpoints.",
    inputs: &[InputDef { name: "input", ty: ArtifactType::Model, required: true, help: "weights to transform" }],
    params: ScaleParams::PARAMS,
    output: ArtifactType::Model,
};

struct ToyScale;

#[derive(serde::Serialize, Deserialize)]
struct ScaleState {
    step: u64,
    weights: Vec<f64>,
    history: Vec<f64>,
}

impl Stage for ToyScale {
    fn schema(&self) -> &'static KindSchema {
        &SCALE
    }
    fn check(&self, params: &Map<String, Json>) -> Result<(), String> {
        typed_params::<ScaleParams>(params).map(|_| ())
    }
    fn run(&self, ctx: &StageContext) -> Result<Json> {
        let p: ScaleParams = ctx.params()?;
        log_computation(ctx)?;
        log_span(ctx, "start")?;
        let mut state = match ctx.partial.latest()? {
            Some(ck) => {
                let s: ScaleState = serde_json::from_str(&std::fs::read_to_string(ck.dir.join("state.json"))?)?;
                eprintln!("toy-scale: resumed at step {}", s.step);
                s
            }
            None => ScaleState { step: 0, weights: read_weights(&ctx.input("input")?.dir)?, history: vec![] },
        };
        ctx.progress.set_length(p.steps);
        while state.step < p.steps {
            ctx.check_cancelled()?;
            if p.fail_at_step == Some(state.step) {
                bail!("toy failure at step {}", state.step);
            }
            std::thread::sleep(Duration::from_millis(p.sleep_ms));
            let t = state.step as f64 * 1e-3;
            for w in state.weights.iter_mut() {
                *w = *w * p.factor + t;
            }
            state.history.push(state.weights.iter().sum());
            state.step += 1;
            ctx.progress.set_position(state.step);
            if state.step % p.checkpoint_every == 0 && state.step < p.steps {
                let text = serde_json::to_string(&state)?;
                ctx.partial.save(state.step, |dir| Ok(std::fs::write(dir.join("state.json"), &text)?))?;
            }
        }
        write_weights(ctx.out_dir, &state.weights)?;
        log_span(ctx, "end")?;
        let mean = state.weights.iter().sum::<f64>() / state.weights.len() as f64;
        Ok(json!({ "steps": p.steps, "mean": mean, "history": state.history }))
    }
}

// ---- toy-eval / toy-text / toy-count / toy-fail -------------------------------------------

static EVAL_V1: KindSchema = KindSchema {
    kind: "toy-eval",
    version: 1,
    help: "Mean and norm of the weights (plus an offset).",
    inputs: &[InputDef { name: "input", ty: ArtifactType::Model, required: true, help: "weights" }],
    params: &[ParamDef {
        name: "offset",
        ty: ParamType::FLOAT,
        default: ParamDefault::Json("0.0"),
        help: "added to the mean",
    }],
    output: ArtifactType::Metrics,
};
/// The same kind after a semantic change (TOY_EVAL_VERSION=2): old entries must stop matching.
static EVAL_V2: KindSchema = KindSchema { version: 2, ..EVAL_V1 };

struct ToyEval;

impl Stage for ToyEval {
    fn schema(&self) -> &'static KindSchema {
        if std::env::var("TOY_EVAL_VERSION").as_deref() == Ok("2") {
            &EVAL_V2
        } else {
            &EVAL_V1
        }
    }
    fn run(&self, ctx: &StageContext) -> Result<Json> {
        log_computation(ctx)?;
        let offset = ctx.params.get("offset").and_then(Json::as_f64).unwrap_or(0.0);
        let w = read_weights(&ctx.input("input")?.dir)?;
        let mean = w.iter().sum::<f64>() / w.len() as f64 + offset;
        let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        Ok(json!({ "mean": mean, "norm": norm }))
    }
}

static TEXT: KindSchema = KindSchema {
    kind: "toy-text",
    version: 1,
    help: "Writes the weights as words.",
    inputs: &[InputDef { name: "input", ty: ArtifactType::Model, required: true, help: "weights" }],
    params: &[ParamDef {
        name: "style",
        ty: ParamType::Enum(&["plain", "shout"]),
        default: ParamDefault::Json("\"plain\""),
        help: "how to write",
    }],
    output: ArtifactType::Text,
};

struct ToyText;

impl Stage for ToyText {
    fn schema(&self) -> &'static KindSchema {
        &TEXT
    }
    fn run(&self, ctx: &StageContext) -> Result<Json> {
        log_computation(ctx)?;
        let w = read_weights(&ctx.input("input")?.dir)?;
        let mut text: String = w.iter().map(|x| if *x >= 0.0 { "up " } else { "down " }).collect();
        if ctx.params.get("style").and_then(Json::as_str) == Some("shout") {
            text = text.to_uppercase();
        }
        std::fs::write(ctx.out_dir.join("text.txt"), &text)?;
        Ok(json!({ "words": w.len() }))
    }
}

static COUNT: KindSchema = KindSchema {
    kind: "toy-count",
    version: 1,
    help: "Counts words of a text.",
    inputs: &[InputDef { name: "text", ty: ArtifactType::Text, required: true, help: "text to count" }],
    params: &[ParamDef {
        name: "word",
        ty: ParamType::Str,
        default: ParamDefault::Json("\"up\""),
        help: "word to count",
    }],
    output: ArtifactType::Metrics,
};

struct ToyCount;

impl Stage for ToyCount {
    fn schema(&self) -> &'static KindSchema {
        &COUNT
    }
    fn run(&self, ctx: &StageContext) -> Result<Json> {
        log_computation(ctx)?;
        let text = std::fs::read_to_string(ctx.input("text")?.dir.join("text.txt"))?;
        let word = ctx.params.get("word").and_then(Json::as_str).unwrap_or("up");
        Ok(json!({ "count": text.split_whitespace().filter(|w| w.eq_ignore_ascii_case(word)).count() }))
    }
}

static FAIL: KindSchema = KindSchema {
    kind: "toy-fail",
    version: 1,
    help: "Always fails (tests of failure handling).",
    inputs: &[InputDef { name: "input", ty: ArtifactType::Model, required: true, help: "anything" }],
    params: &[ParamDef {
        name: "message",
        ty: ParamType::Str,
        default: ParamDefault::Json("\"toy failure\""),
        help: "error text",
    }],
    output: ArtifactType::Metrics,
};

struct ToyFail;

impl Stage for ToyFail {
    fn schema(&self) -> &'static KindSchema {
        &FAIL
    }
    fn run(&self, ctx: &StageContext) -> Result<Json> {
        log_computation(ctx)?;
        std::fs::write(ctx.out_dir.join("half-written.txt"), "must never become an entry")?;
        let message = ctx.params.get("message").and_then(Json::as_str).unwrap_or("toy failure");
        // A message starting `panic:` panics instead (a stage bug, not an error it returns).
        if let Some(why) = message.strip_prefix("panic:") {
            panic!("{why}");
        }
        bail!("{message}")
    }
}

pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(ToyLoad).register(ToyScale).register(ToyEval).register(ToyText).register(ToyCount).register(ToyFail);
    r
}
