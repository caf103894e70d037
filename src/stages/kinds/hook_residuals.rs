//! `hook-residuals`: per-layer statistics of the residual-stream corrections c = h_out − h_in
//! (h_in = `ResidPre(l)`, h_out = `ResidPost(l)`) over the `chunks` windows of a text source, and
//! optionally a pruning intervention on c (absolute threshold or per-token percentile) with the
//! resulting perplexity and generations. Definitions: `docs/stages.md`.

use std::cell::RefCell;

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde_json::{json, Map, Value as Json};

use crate::analysis::residual::Cut;
use crate::exec::{
    metric_list, sometimes, typed_params, ArtifactType, FileHasher, InputDef, KindSchema, MetricDef, ParamDefault,
    ParamType, ReportContract, Role, Stage, StageContext,
};
use crate::model::{Bos, GenerateOptions, Sampling};
use crate::stages::common::generation::{self, generate_labelled, prompts_of, Prompt};
use crate::stages::common::model_artifact as artifact;
use crate::stages::common::residual_tap::{Pruning, ResidualTap};
use crate::stages::common::scoring;
use crate::stages::common::text_param;

pub static SCHEMA: KindSchema = KindSchema {
    kind: "hook-residuals",
    version: 2,
    help: "Per-layer statistics of the residual corrections c = h_out − h_in over the windows or texts of a text source; optionally zeroes small entries of c (absolute threshold, or a percentile per token or per layer tensor) and reports the zeroed fractions, perplexity and generations.",
    inputs: &[InputDef { name: "input", ty: ArtifactType::Model, required: true, help: "the model to analyse" }],
    params: Params::PARAMS,
    output: ArtifactType::Metrics,
};

crate::stage_params! {
    struct Params {
        ..text: text_param::TextParams,
        rel_tol: f64 {
            ty: ParamType::Float { min: Some(0.0), max: None },
            default: ParamDefault::Json("0.001"),
            help: "near-zero: |c| ≤ rel_tol · ‖h_in‖/√d of its token",
        },
        threshold: Option<f64> {
            ty: ParamType::Float { min: Some(0.0), max: None },
            default: ParamDefault::Optional,
            help: "intervention: zero the entries of c with |c| < threshold",
        },
        percentile: Option<f64> {
            ty: ParamType::Float { min: Some(0.0), max: Some(100.0) },
            default: ParamDefault::Optional,
            help: "intervention: zero the entries of c below the p-th percentile of |c| (of their token, or of the layer's whole tensor: percentile_scope)",
        },
        percentile_scope: String {
            ty: ParamType::Enum(&["token", "tensor"]),
            default: ParamDefault::Json("\"token\""),
            help: "token = each token's own percentile (100 zeroes all); tensor = one percentile over the layer's whole correction of a forward pass (the notebook's code)",
        },
        layers: Json {
            ty: ParamType::Either(&[ParamType::Enum(&["all"]), ParamType::List(&ParamType::UINT)]),
            default: ParamDefault::Json("\"all\""),
            help: "layers the intervention applies to: \"all\" or a list of indices",
        },
        generate: Json {
            ty: ParamType::Either(&[ParamType::Bool, ParamType::Str, ParamType::List(&ParamType::Any)]),
            default: ParamDefault::Json("false"),
            help: "also generate (greedy, with the intervention): true = the \"facts\" prompt set, or a set name / list as in generate",
        },
        max_new_tokens: usize {
            ty: ParamType::Int { min: Some(1), max: Some(1_000_000) },
            default: ParamDefault::Json("16"),
            help: "tokens to generate per prompt",
        },
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
fn generation_prompts(v: &Json) -> Result<Option<Vec<Prompt>>, String> {
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

/// Its role for reports and every top-level metric `run` writes.
pub static REPORT: ReportContract = ReportContract { roles: &[Role::Residuals], metrics: &METRICS };

/// The scoring's metrics (under the intervention, if any), the statistics, and with `generate` the
/// generations' metrics.
static METRICS: [MetricDef; 14] = metric_list(
    metric_list::<6, 4, 10>(
        scoring::PPL_METRICS,
        [
            MetricDef {
                name: "layers",
                always: true,
                help: "per layer: statistics of the correction c = h_out − h_in (mean and max |c|, exact-zero and near-zero fractions at rel_tol, …)",
            },
            MetricDef { name: "positions", always: true, help: "token positions the statistics cover" },
            MetricDef {
                name: "rel_tol",
                always: true,
                help: "the relative tolerance below which an entry of c counts as zero",
            },
            MetricDef {
                name: "intervention",
                always: false,
                help: "with threshold or percentile: mode, value, layers, zeroed and masked fractions",
            },
        ],
    ),
    sometimes(generation::METRICS),
);

pub struct HookResiduals;

impl Stage for HookResiduals {
    fn schema(&self) -> &'static KindSchema {
        &SCHEMA
    }

    fn report(&self) -> &'static ReportContract {
        &REPORT
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
        let open = artifact::open_for_inference(ctx.input("input")?, &device)?;
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
            let one = std::slice::from_ref(w);
            let mut hooks = ResidualTap::hooks(&tap);
            let nlls = if scoring::scores_from_hidden(&open.model, one) {
                let h = open.model.forward_hidden(&ids, Some(&mut hooks))?;
                scoring::nlls_of_hidden(&open.model, &h, one)?
            } else {
                scoring::nlls_of_logits(&open.model.forward_with_hooks(&ids, &mut hooks)?, one)?
            };
            drop(hooks);
            tap.borrow_mut().end_text();
            per_window.extend(nlls);
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
        let intervention = metrics.get("intervention").map_or(
            Json::Null,
            |i| json!({ "mode": i["mode"], "value": i["value"], "zeroed_fraction": i["zeroed_fraction"] }),
        );
        tracing::info!(
            instance = %ctx.instance, ppl = %metrics["ppl"], layers = n_layers, windows = eval.windows.len(),
            intervention = %intervention,
            label = %metrics.get("label").and_then(Json::as_str).unwrap_or_default(), "hook-residuals done"
        );
        tracing::debug!(instance = %ctx.instance, layers = %metrics["layers"], "hook-residuals per layer");
        Ok(metrics)
    }
}
