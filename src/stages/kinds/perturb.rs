//! `perturb`: how a small Gaussian perturbation of the embedding output grows through the layers.
//! Each text (window) is run clean and with noise added at `hook_embed`; per text and layer
//! boundary δ = ‖h'_l − h_l‖_F / ‖h_l‖_F over the whole output, averaged over texts (the per-token
//! mean is kept as `delta_token_mean`); growth, the Lyapunov estimate from layer 0's output (the
//! notebook's convention) and from the embedding, and the clean run's branching ratios.
//! Definitions: `docs/stages.md`.

use std::cell::RefCell;

use anyhow::Result;
use candle_core::{DType, Tensor};
use serde_json::{json, Map, Value as Json};

use crate::analysis::perturb::{branching_summary, frobenius_deviation, growth, noise, relative_deviation};
use crate::exec::{
    typed_params, ArtifactType, FileHasher, InputDef, KindSchema, MetricDef, ParamDefault, ParamType, ReportContract,
    Role, Stage, StageContext,
};
use crate::model::{HookPoint, Hooks};
use crate::rng::SplitMix64;
use crate::stages::common::model_artifact as artifact;
use crate::stages::common::residual_tap::ResidualTap;
use crate::stages::common::scoring;
use crate::stages::common::text_param;

pub static SCHEMA: KindSchema = KindSchema {
    kind: "perturb",
    version: 2,
    help: "Adds seeded Gaussian noise to the embedding output and measures the relative deviation δ at every layer boundary: amplification, Lyapunov exponent, local exponents, branching ratios.",
    inputs: &[InputDef { name: "input", ty: ArtifactType::Model, required: true, help: "the model to analyse" }],
    params: Params::PARAMS,
    output: ArtifactType::Metrics,
};

crate::stage_params! {
    struct Params {
        ..text: text_param::TextParams,
        eps: f64 {
            ty: ParamType::Float { min: Some(0.0), max: None },
            default: ParamDefault::Json("0.01"),
            help: "noise scale (relative: a fraction of each token's embedding RMS; absolute: the standard deviation)",
        },
        scale: String {
            ty: ParamType::Enum(&["absolute", "relative"]),
            default: ParamDefault::Json("\"absolute\""),
            help: "how eps is read: absolute = σ (the notebook: randn · 0.01), relative = a fraction of each token's RMS",
        },
        seed: u64 {
            ty: ParamType::UINT,
            default: ParamDefault::PipelineSeed,
            help: "noise seed",
        },
    }
}

fn to_f32(x: &Tensor) -> candle_core::Result<Vec<f32>> {
    x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Boundary index of a hook point: 0 = layer 0's input (the embedding output), l + 1 = layer l's
/// output.
fn boundary(p: HookPoint) -> Option<usize> {
    match p {
        HookPoint::ResidPre(0) => Some(0),
        HookPoint::ResidPost(l) => Some(l + 1),
        _ => None,
    }
}

/// Its role for reports and every top-level metric `run` writes.
pub static REPORT: ReportContract = ReportContract {
    roles: &[Role::Perturbation],
    metrics: &[
        MetricDef {
            name: "delta",
            always: true,
            help:
                "relative perturbation ‖h̃ − h‖_F / ‖h‖_F after the embedding and after each layer, averaged over texts",
        },
        MetricDef { name: "delta_token_mean", always: true, help: "the same, averaged per token" },
        MetricDef { name: "peak_layer", always: true, help: "the boundary where delta peaks" },
        MetricDef {
            name: "amplification",
            always: true,
            help: "delta of the last layer / delta of layer 0 (the notebook's convention)",
        },
        MetricDef { name: "lyapunov", always: true, help: "(ln delta_last − ln delta_layer0)/(L − 1)" },
        MetricDef {
            name: "amplification_from_embedding",
            always: true,
            help: "delta of the last layer / delta at the embedding",
        },
        MetricDef { name: "lyapunov_from_embedding", always: true, help: "the exponent measured from the embedding" },
        MetricDef { name: "local_exponents", always: true, help: "ln(delta_l / delta_l−1) per layer" },
        MetricDef {
            name: "branching", always: true, help: "per-layer branching ratio ‖out‖/‖in‖ and its means"
        },
        MetricDef { name: "eps", always: true, help: "noise size" },
        MetricDef {
            name: "scale",
            always: true,
            help: "how eps scales the noise (absolute or relative to the embedding norm)",
        },
        MetricDef { name: "seed", always: true, help: "noise seed" },
        MetricDef { name: "windows", always: true, help: "windows (or texts) perturbed" },
        MetricDef { name: "tokens", always: true, help: "tokens covered" },
        MetricDef { name: "protocol", always: true, help: "the protocol echoed" },
    ],
};

pub struct Perturb;

impl Stage for Perturb {
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
        Ok(())
    }

    fn identity(&self, params: &Map<String, Json>, files: &FileHasher) -> Result<Option<Json>, String> {
        let p: Params = typed_params(params)?;
        text_param::identity(&p.text.data, files)
    }

    fn run(&self, ctx: &StageContext) -> Result<Json> {
        let p: Params = ctx.params()?;
        let device = artifact::device(ctx.device)?;
        let open = artifact::open_for_inference(ctx.input("input")?, &device)?;
        let model = &open.model;
        let n_layers = model.num_layers();
        let hidden = model.config().hidden_size;
        let relative = p.scale == "relative";
        let eval = p.text.windows(&open, ctx.base_dir)?;
        ctx.progress.set_length(eval.windows.len() as u64);

        // Per boundary: Σ over texts of the whole-output δ (and texts counted); Σ over tokens of
        // the per-token δ (and tokens counted).
        let mut frob_sum = vec![0.0f64; n_layers + 1];
        let mut frob_n = vec![0u64; n_layers + 1];
        let mut token_sum = vec![0.0f64; n_layers + 1];
        let mut token_n = vec![0u64; n_layers + 1];
        let tap = RefCell::new(ResidualTap::new(n_layers, hidden, None, None, Some(0.0)));
        let mut positions = 0u64;
        for (i, w) in eval.windows.iter().enumerate() {
            ctx.check_cancelled()?;
            let ids = scoring::window_ids(model, std::slice::from_ref(w))?;

            // Clean run: the stream at every boundary, and the branching statistics.
            let clean: RefCell<Vec<Vec<f32>>> = RefCell::new(vec![Vec::new(); n_layers + 1]);
            {
                let mut hooks = ResidualTap::hooks(&tap);
                hooks.observe(None, |pt, x| {
                    if let Some(b) = boundary(pt) {
                        clean.borrow_mut()[b] = to_f32(x)?;
                    }
                    Ok(())
                });
                model.forward_with_hooks(&ids, &mut hooks)?;
            }
            tap.borrow_mut().end_text();
            let clean = clean.into_inner();

            // Perturbed run: noise on the embedding output, δ at every boundary.
            let rng = SplitMix64::keyed(p.seed, &[i as u64]);
            let mut hooks = Hooks::new();
            hooks.intervene(Some(HookPoint::Embed), |_, x| {
                let n = noise(&to_f32(x)?, hidden, p.eps, relative, rng.clone());
                x + Tensor::from_vec(n, x.shape(), x.device())?.to_dtype(x.dtype())?
            });
            hooks.observe(None, |pt, x| {
                if let Some(b) = boundary(pt) {
                    let noisy = to_f32(x)?;
                    if let Some(d) = frobenius_deviation(&clean[b], &noisy) {
                        frob_sum[b] += d;
                        frob_n[b] += 1;
                    }
                    let (d, n) = relative_deviation(&clean[b], &noisy, hidden);
                    token_sum[b] += d * n as f64;
                    token_n[b] += n;
                }
                Ok(())
            });
            model.forward_with_hooks(&ids, &mut hooks)?;
            drop(hooks);
            positions += w.input_ids.len() as u64;
            ctx.progress.set_position(i as u64 + 1);
        }

        let mean = |s: &[f64], n: &[u64]| -> Vec<f64> {
            s.iter().zip(n).map(|(s, n)| if *n > 0 { s / *n as f64 } else { 0.0 }).collect()
        };
        let g = growth(&mean(&frob_sum, &frob_n));
        let tap = tap.into_inner();
        let ratios: Vec<f64> =
            tap.stats.as_ref().expect("statistics").iter().map(|a| a.finish().branching_ratio).collect();
        let b = branching_summary(&ratios);
        tracing::info!(
            instance = %ctx.instance, windows = eval.windows.len(), lyapunov = ?g.lyapunov,
            amplification = ?g.amplification,
            peak_layer = ?g.peak_layer, mean_branching = ?b.mean, "perturb done"
        );
        tracing::debug!(instance = %ctx.instance, delta = ?g.delta, branching = ?ratios, "perturb per layer");
        Ok(json!({
            "delta": g.delta,
            "delta_token_mean": mean(&token_sum, &token_n),
            "peak_layer": g.peak_layer,
            "amplification": g.amplification,
            "lyapunov": g.lyapunov,
            "amplification_from_embedding": g.amplification_from_embedding,
            "lyapunov_from_embedding": g.lyapunov_from_embedding,
            "local_exponents": g.local_exponents,
            "branching": {
                "per_layer": ratios,
                "mean": b.mean,
                "mean_without_first": b.mean_without_first,
                "near_critical_layers": b.near_critical_layers,
            },
            "eps": p.eps,
            "scale": p.scale,
            "seed": p.seed,
            "windows": eval.windows.len(),
            "tokens": positions,
            "protocol": eval.protocol_json(&open),
        }))
    }
}
