//! `hook-residuals`: per-layer statistics of the residual-stream corrections c = h_out − h_in
//! (h_in = `ResidPre(l)`, h_out = `ResidPost(l)`) over the `chunks` windows of a text source, and
//! optionally a pruning intervention on c (absolute threshold or per-token percentile) with the
//! resulting perplexity and generations. Definitions: `docs/stages.md`.

use std::cell::RefCell;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::{json, Map, Value as Json};

use super::generate::{generate_labelled, prompts_of};
use super::model_artifact as artifact;
use super::scoring;
use super::text_param;
use crate::analysis::residual::{
    zero_below_tensor_percentile, zero_below_threshold, zero_below_token_percentile, Cut, LayerAccumulator,
};
use crate::exec::{
    typed_params, ArtifactType, FileHasher, InputDef, KindSchema, ParamDef, ParamDefault, ParamType, Stage,
    StageContext,
};
use crate::model::{Bos, GenerateOptions, HookPoint, Hooks, Sampling};

pub static SCHEMA: KindSchema = KindSchema {
    kind: "hook-residuals",
    version: 2,
    help: "Per-layer statistics of the residual corrections c = h_out − h_in over the windows or texts of a text source; optionally zeroes small entries of c (absolute threshold, or a percentile per token or per layer tensor) and reports the zeroed fractions, perplexity and generations.",
    inputs: &[InputDef { name: "input", ty: ArtifactType::Model, required: true, help: "the model to analyse" }],
    params: &[
        text_param::DATA,
        text_param::TEXTS,
        text_param::TEXT_PROTOCOL,
        text_param::ENCODE,
        text_param::MIN_ROW_CHARS,
        text_param::WINDOW_SEQ_LEN,
        text_param::WINDOW_MAX,
        text_param::WINDOW_BOS,
        text_param::TEXTS_LONGER_THAN,
        text_param::TEXT_CHARS,
        text_param::MAX_TEXTS,
        ParamDef {
            name: "rel_tol",
            ty: ParamType::Float { min: Some(0.0), max: None },
            default: ParamDefault::Json("0.001"),
            help: "near-zero: |c| ≤ rel_tol · ‖h_in‖/√d of its token",
        },
        ParamDef {
            name: "threshold",
            ty: ParamType::Float { min: Some(0.0), max: None },
            default: ParamDefault::Optional,
            help: "intervention: zero the entries of c with |c| < threshold",
        },
        ParamDef {
            name: "percentile",
            ty: ParamType::Float { min: Some(0.0), max: Some(100.0) },
            default: ParamDefault::Optional,
            help: "intervention: zero the entries of c below the p-th percentile of |c| (of their token, or of the layer's whole tensor: percentile_scope)",
        },
        ParamDef {
            name: "percentile_scope",
            ty: ParamType::Enum(&["token", "tensor"]),
            default: ParamDefault::Json("\"token\""),
            help: "token = each token's own percentile (100 zeroes all); tensor = one percentile over the layer's whole correction of a forward pass (the notebook's code)",
        },
        ParamDef {
            name: "layers",
            ty: ParamType::Either(&[ParamType::Enum(&["all"]), ParamType::List(&ParamType::UINT)]),
            default: ParamDefault::Json("\"all\""),
            help: "layers the intervention applies to: \"all\" or a list of indices",
        },
        ParamDef {
            name: "generate",
            ty: ParamType::Either(&[ParamType::Bool, ParamType::Str, ParamType::List(&ParamType::Any)]),
            default: ParamDefault::Json("false"),
            help: "also generate (greedy, with the intervention): true = the \"facts\" prompt set, or a set name / list as in generate",
        },
        ParamDef {
            name: "max_new_tokens",
            ty: ParamType::Int { min: Some(1), max: Some(1_000_000) },
            default: ParamDefault::Json("16"),
            help: "tokens to generate per prompt",
        },
    ],
    output: ArtifactType::Metrics,
};

/// (No `deny_unknown_fields`: serde cannot combine it with `flatten`; the schema check has
/// already refused unknown parameters.)
#[derive(Deserialize)]
struct Params {
    #[serde(flatten)]
    text: text_param::TextParams,
    rel_tol: f64,
    threshold: Option<f64>,
    percentile: Option<f64>,
    percentile_scope: String,
    layers: Json,
    generate: Json,
    max_new_tokens: usize,
}

/// Which entries of c an intervention zeroes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pruning {
    /// |c| < value (entries already 0 are not counted as zeroed).
    Threshold(f64),
    /// |c| below the token's p-th percentile of |c|; 100 zeroes every entry.
    Percentile(f64),
    /// |c| below the p-th percentile of |c| over the layer's whole correction in one forward pass.
    TensorPercentile(f64),
}

impl Pruning {
    fn mode(&self) -> &'static str {
        match self {
            Pruning::Threshold(_) => "threshold",
            Pruning::Percentile(_) => "percentile",
            Pruning::TensorPercentile(_) => "tensor-percentile",
        }
    }
    fn value(&self) -> f64 {
        match *self {
            Pruning::Threshold(t) => t,
            Pruning::Percentile(p) | Pruning::TensorPercentile(p) => p,
        }
    }

    /// Zeroes entries of `c` (`[tokens, hidden]`) in place.
    pub fn apply(&self, c: &mut [f32], hidden: usize) -> Cut {
        const TOKENS_PER_TASK: usize = 64;
        let block = hidden * TOKENS_PER_TASK;
        let sum = |a: Cut, b: Cut| a + b;
        match *self {
            Pruning::Threshold(t) => {
                c.par_chunks_mut(block).map(|b| zero_below_threshold(b, t as f32)).reduce(Cut::default, sum)
            }
            Pruning::Percentile(p) => {
                c.par_chunks_mut(block).map(|b| zero_below_token_percentile(b, hidden, p)).reduce(Cut::default, sum)
            }
            Pruning::TensorPercentile(p) => zero_below_tensor_percentile(c, p),
        }
    }
}

/// A pruning and the layers it applies to (`None`: all).
struct Intervention {
    pruning: Pruning,
    layers: Option<Vec<usize>>,
}

/// Parses `threshold` / `percentile` / `layers`.
fn intervention_of(p: &Params) -> Result<Option<Intervention>, String> {
    let pruning = match (p.threshold, p.percentile) {
        (Some(_), Some(_)) => return Err("give either `threshold` or `percentile`, not both".into()),
        (Some(t), None) => Some(Pruning::Threshold(t)),
        (None, Some(q)) if p.percentile_scope == "tensor" => Some(Pruning::TensorPercentile(q)),
        (None, Some(q)) => Some(Pruning::Percentile(q)),
        (None, None) => None,
    };
    let layers = match &p.layers {
        Json::String(s) if s == "all" => None,
        Json::Array(items) => {
            let v: Vec<usize> = items
                .iter()
                .map(|i| i.as_u64().map(|x| x as usize).ok_or("layers: a list of layer indices (integers ≥ 0)"))
                .collect::<Result<_, _>>()?;
            if v.is_empty() {
                return Err("layers: an empty list (use \"all\" or name at least one layer)".into());
            }
            Some(v)
        }
        _ => return Err("layers: \"all\" or a list of layer indices".into()),
    };
    if pruning.is_none() && layers.is_some() {
        return Err("`layers` selects where the intervention applies: give `threshold` or `percentile` too".into());
    }
    Ok(pruning.map(|pruning| Intervention { pruning, layers }))
}

/// The prompts to generate from, if any.
fn generation_prompts(v: &Json) -> Result<Option<Vec<super::generate::Prompt>>, String> {
    match v {
        Json::Bool(false) => Ok(None),
        Json::Bool(true) => prompts_of(&json!("facts")).map(Some),
        other => {
            let p = prompts_of(other).map_err(|e| format!("generate: {e}"))?;
            if p.is_empty() {
                return Err("generate: the prompt list is empty".into());
            }
            Ok(Some(p))
        }
    }
}

/// What the residual hooks of one forward pass (or one generation) do: remember h_in at
/// `ResidPre(l)`; at `ResidPost(l)` optionally prune c and optionally add (h_in, h_out) to the
/// statistics of layer l.
pub struct ResidualTap {
    hidden: usize,
    pruning: Option<Pruning>,
    /// Per layer: does the intervention apply?
    intervened: Vec<bool>,
    /// `None`: no statistics (generation).
    pub stats: Option<Vec<LayerAccumulator>>,
    /// Per layer: what the intervention cut, and entries of c seen, at intervened layers.
    pub cut: Vec<Cut>,
    pub entries: Vec<u64>,
    h_in: Option<Tensor>,
}

impl ResidualTap {
    /// `intervened = None` with a pruning: every layer.
    pub fn new(
        n_layers: usize,
        hidden: usize,
        pruning: Option<Pruning>,
        intervened: Option<&[usize]>,
        stats_rel_tol: Option<f64>,
    ) -> ResidualTap {
        let mut on = vec![pruning.is_some() && intervened.is_none(); n_layers];
        if pruning.is_some() {
            for &l in intervened.unwrap_or(&[]) {
                on[l] = true;
            }
        }
        ResidualTap {
            hidden,
            pruning,
            intervened: on,
            stats: stats_rel_tol.map(|tol| vec![LayerAccumulator::new(hidden, tol); n_layers]),
            cut: vec![Cut::default(); n_layers],
            entries: vec![0; n_layers],
            h_in: None,
        }
    }

    fn at(&mut self, point: HookPoint, x: &Tensor) -> candle_core::Result<Tensor> {
        match point {
            HookPoint::ResidPre(_) => {
                self.h_in = Some(x.clone());
                Ok(x.clone())
            }
            HookPoint::ResidPost(l) => {
                let h_in =
                    self.h_in.take().ok_or_else(|| candle_core::Error::Msg("resid_post before resid_pre".into()))?;
                let pruning = self.pruning.filter(|_| self.intervened[l]);
                if pruning.is_none() && self.stats.is_none() {
                    return Ok(x.clone());
                }
                let a = h_in.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let mut b = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let mut changed = false;
                if let Some(pr) = pruning {
                    let mut c: Vec<f32> = b.iter().zip(&a).map(|(o, i)| o - i).collect();
                    let cut = pr.apply(&mut c, self.hidden);
                    self.cut[l] = self.cut[l] + cut;
                    self.entries[l] += c.len() as u64;
                    if cut.zeroed > 0 {
                        // A zeroed entry becomes h_in exactly; every other entry keeps h_out exactly
                        // (not h_in + c, which can differ from h_out by a rounding).
                        for ((o, i), cj) in b.iter_mut().zip(&a).zip(&c) {
                            if *cj == 0.0 {
                                *o = *i;
                            }
                        }
                        changed = true;
                    }
                }
                if let Some(stats) = self.stats.as_mut() {
                    stats[l].add(&a, &b);
                }
                if changed {
                    Tensor::from_vec(b, x.shape(), x.device())?.to_dtype(x.dtype())
                } else {
                    Ok(x.clone())
                }
            }
            _ => Ok(x.clone()),
        }
    }

    /// Ends a text (one forward pass) for the per-text statistics.
    pub fn end_text(&mut self) {
        self.stats.iter_mut().flatten().for_each(LayerAccumulator::end_text);
    }

    /// Hooks running this tap at every residual point.
    pub fn hooks(tap: &RefCell<ResidualTap>) -> Hooks<'_> {
        let mut h = Hooks::new();
        h.intervene(None, move |p, x| tap.borrow_mut().at(p, x));
        h
    }
}

/// The per-layer statistics as tensors: one f64 `[L]` tensor per numeric field of `layers`.
pub const STATS_FILE: &str = "layer_stats.safetensors";

fn write_stats_tensors(path: &std::path::Path, layers: &[Json]) -> Result<()> {
    let mut tensors = std::collections::HashMap::new();
    for key in layers[0].as_object().into_iter().flat_map(|o| o.keys()).filter(|k| *k != "layer") {
        let v: Vec<f64> = layers.iter().map(|r| r[key].as_f64().unwrap_or(f64::NAN)).collect();
        tensors.insert(key.clone(), Tensor::from_vec(v, layers.len(), &candle_core::Device::Cpu)?);
    }
    candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}

pub struct HookResiduals;

impl Stage for HookResiduals {
    fn schema(&self) -> &'static KindSchema {
        &SCHEMA
    }

    fn check(&self, params: &Map<String, Json>) -> Result<(), String> {
        let p: Params = typed_params(params)?;
        text_param::source(&p.text.data)?;
        p.text.selection()?;
        intervention_of(&p)?;
        generation_prompts(&p.generate)?;
        Ok(())
    }

    fn identity(&self, params: &Map<String, Json>, files: &FileHasher) -> Result<Option<Json>, String> {
        let p: Params = typed_params(params)?;
        text_param::identity(&p.text.data, files)
    }

    fn run(&self, ctx: &StageContext) -> Result<Json> {
        let p: Params = ctx.params()?;
        let intervention = intervention_of(&p).map_err(anyhow::Error::msg)?;
        let prompts = generation_prompts(&p.generate).map_err(anyhow::Error::msg)?;
        let device = artifact::device(ctx.device)?;
        let open = artifact::open(ctx.input("input")?, &device)?;
        let n_layers = open.model.num_layers();
        let hidden = open.model.config().hidden_size;
        let (pruning, chosen) = match &intervention {
            Some(iv) => (Some(iv.pruning), iv.layers.clone()),
            None => (None, None),
        };
        if let Some(bad) = chosen.iter().flatten().find(|l| **l >= n_layers) {
            bail!("layers: layer {bad} does not exist (the model has {n_layers} layers, 0..{})", n_layers - 1);
        }
        let eval = p.text.windows(&open, ctx.base_dir)?;
        let n_prompts = prompts.as_ref().map_or(0, Vec::len);
        ctx.progress.set_length((eval.windows.len() + n_prompts) as u64);

        let tap = RefCell::new(ResidualTap::new(n_layers, hidden, pruning, chosen.as_deref(), Some(p.rel_tol)));
        let mut per_window = Vec::with_capacity(eval.windows.len());
        let mut positions = 0u64;
        for (i, w) in eval.windows.iter().enumerate() {
            ctx.check_cancelled()?;
            let ids = scoring::window_ids(&open.model, std::slice::from_ref(w))?;
            let logits = open.model.forward_with_hooks(&ids, &mut ResidualTap::hooks(&tap))?;
            tap.borrow_mut().end_text();
            per_window.extend(scoring::nlls_of_logits(&logits, std::slice::from_ref(w))?);
            positions += w.input_ids.len() as u64;
            ctx.progress.set_position(i as u64 + 1);
        }
        let tap = tap.into_inner();
        let layers: Vec<Json> = tap
            .stats
            .as_ref()
            .expect("statistics were collected")
            .iter()
            .enumerate()
            .map(|(l, acc)| {
                let mut row = json!({ "layer": l });
                row.as_object_mut()
                    .unwrap()
                    .extend(serde_json::to_value(acc.finish()).unwrap().as_object().cloned().unwrap());
                row
            })
            .collect();
        write_stats_tensors(&ctx.out_dir.join(STATS_FILE), &layers)?;

        let mut metrics = eval.ppl_metrics(&open, &per_window)?;
        let m = metrics.as_object_mut().unwrap();
        m.insert("layers".into(), Json::Array(layers));
        m.insert("positions".into(), json!(positions));
        m.insert("rel_tol".into(), json!(p.rel_tol));
        if let Some(pr) = pruning {
            let idx: Vec<usize> = (0..n_layers).filter(|l| tap.intervened[*l]).collect();
            let cut = idx.iter().fold(Cut::default(), |a, l| a + tap.cut[*l]);
            let entries: u64 = idx.iter().map(|l| tap.entries[*l]).sum();
            let frac = |z: u64, e: u64| if e > 0 { z as f64 / e as f64 } else { 0.0 };
            m.insert(
                "intervention".into(),
                json!({
                    "mode": pr.mode(),
                    "value": pr.value(),
                    "layers": chosen.as_ref().map_or(json!("all"), |v| json!(v)),
                    "zeroed_fraction": frac(cut.zeroed, entries),
                    "masked_fraction": frac(cut.masked, entries),
                    "zeroed": cut.zeroed,
                    "masked": cut.masked,
                    "entries": entries,
                    "per_layer": idx.iter().map(|&l| json!({
                        "layer": l,
                        "zeroed_fraction": frac(tap.cut[l].zeroed, tap.entries[l]),
                        "masked_fraction": frac(tap.cut[l].masked, tap.entries[l]),
                    })).collect::<Vec<_>>(),
                }),
            );
        }

        if let Some(prompts) = prompts {
            let tok = open.tokenizer()?;
            let opts = GenerateOptions {
                max_new_tokens: p.max_new_tokens,
                sampling: Sampling::Greedy,
                stop_tokens: tok.stop_ids(),
            };
            let gen_taps: Vec<RefCell<ResidualTap>> = prompts
                .iter()
                .map(|_| RefCell::new(ResidualTap::new(n_layers, hidden, pruning, chosen.as_deref(), None)))
                .collect();
            let mut next = gen_taps.iter();
            let base = eval.windows.len() as u64;
            let labelled = generate_labelled(
                &open,
                &prompts,
                &opts,
                Bos::Add,
                0.5,
                || pruning.map(|_| ResidualTap::hooks(next.next().expect("one tap per prompt"))),
                |i| {
                    ctx.check_cancelled()?;
                    ctx.progress.set_position(base + i as u64);
                    Ok(())
                },
            )?;
            std::fs::write(ctx.out_dir.join("generations.json"), serde_json::to_string_pretty(&labelled["outputs"])?)?;
            for k in ["outputs", "counts", "accuracy", "label"] {
                m.insert(k.into(), labelled[k].clone());
            }
        }
        Ok(metrics)
    }
}
