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

use crate::analysis::norm;
use crate::analysis::perturb::{branching_summary, frobenius_deviation, growth, relative_deviation};
use crate::data::SplitMix64;
use crate::exec::{
    typed_params, ArtifactType, FileHasher, InputDef, KindSchema, ParamDefault, ParamType, Stage, StageContext,
};
use crate::model::{HookPoint, Hooks};
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

/// Standard normal deviates by the Box–Muller transform on SplitMix64 uniforms.
struct Gaussian {
    rng: SplitMix64,
    spare: Option<f64>,
}

impl Gaussian {
    fn new(rng: SplitMix64) -> Gaussian {
        Gaussian { rng, spare: None }
    }

    fn next(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // u1 in (0, 1] (never 0, so the log is finite), u2 in [0, 1).
        let u1 = ((self.rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let u2 = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }
}

/// The noise for one window's embedding output `x` (`[tokens, hidden]`, f32): per token, i.i.d.
/// N(0, σ²) with σ = eps · RMS(token) (relative) or σ = eps (absolute).
fn noise(x: &[f32], hidden: usize, eps: f64, relative: bool, rng: SplitMix64) -> Vec<f32> {
    let mut g = Gaussian::new(rng);
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(hidden) {
        let sigma = if relative { eps * norm(row) / (hidden as f64).sqrt() } else { eps };
        out.extend((0..hidden).map(|_| (sigma * g.next()) as f32));
    }
    out
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

pub struct Perturb;

impl Stage for Perturb {
    fn schema(&self) -> &'static KindSchema {
        &SCHEMA
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
        let open = artifact::open(ctx.input("input")?, &device)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_muller_gives_standard_normals() {
        let mut g = Gaussian::new(SplitMix64::new(7));
        let z: Vec<f64> = (0..20000).map(|_| g.next()).collect();
        let mean = z.iter().sum::<f64>() / z.len() as f64;
        let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / z.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
        assert!(z.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn relative_noise_has_the_token_rms_times_eps() {
        let hidden = 4096;
        let x: Vec<f32> = (0..2 * hidden).map(|j| if j < hidden { 3.0 } else { 0.0 }).collect();
        let n = noise(&x, hidden, 0.01, true, SplitMix64::new(1));
        let rms = norm(&n[..hidden]) / (hidden as f64).sqrt();
        assert!((rms - 0.03).abs() < 0.002, "rms {rms}");
        assert!(n[hidden..].iter().all(|v| *v == 0.0), "a zero token gets no relative noise");
        assert_eq!(n, noise(&x, hidden, 0.01, true, SplitMix64::new(1)), "seeded");
    }
}
