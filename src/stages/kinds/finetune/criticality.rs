//! The criticality regulariser: `λ · mean_l (BR_l − target)²` added to the fine-tune loss, with
//! BR_l the branching ratio of layer l computed in the training forward — the criticality
//! notebook's measure (mean over tokens of ‖out_t‖ over mean over tokens of ‖in_t‖, per sequence,
//! averaged over the sequences), kept differentiable so the term has a gradient (the original
//! regulariser never had one).

use candle_core::{DType, Result, Tensor, D};
use serde::Deserialize;

use crate::model::{HookPoint, Hooks, Model};

/// `criticality_layers`: a named choice or a list of layer indices.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum LayerChoice {
    Named(String),
    List(Vec<usize>),
}

/// A regulariser as the fine-tune's parameters set it.
#[derive(Clone, Debug)]
pub struct Criticality {
    pub lambda: f64,
    pub target: f64,
    /// Layers whose branching ratio enters the term, ascending.
    pub layers: Vec<usize>,
}

impl Criticality {
    /// From `criticality_lambda` (absent: no regulariser), `criticality_target` (default 1) and
    /// `criticality_layers` ("all", "all-but-first" — the report's choice, the default — or a list).
    pub fn from_params(
        lambda: Option<f64>,
        target: Option<f64>,
        layers: Option<&LayerChoice>,
        num_layers: Option<usize>,
    ) -> std::result::Result<Option<Criticality>, String> {
        let Some(lambda) = lambda else {
            if target.is_some() || layers.is_some() {
                return Err("criticality_target / criticality_layers set without criticality_lambda: give \
                            criticality_lambda (the term's weight) too"
                    .into());
            }
            return Ok(None);
        };
        let n = num_layers.unwrap_or(usize::MAX);
        let layers = match layers {
            None => (1..num_layers.unwrap_or(1)).collect(),
            Some(LayerChoice::Named(s)) if s == "all-but-first" => (1..num_layers.unwrap_or(1)).collect(),
            Some(LayerChoice::Named(s)) if s == "all" => (0..num_layers.unwrap_or(0)).collect(),
            Some(LayerChoice::List(a)) => {
                let mut v = a.clone();
                v.sort_unstable();
                v.dedup();
                if v.is_empty() {
                    return Err(
                        "criticality_layers: an empty list (use \"all\", \"all-but-first\" or name layers)".into()
                    );
                }
                if let Some(&l) = v.iter().find(|&&l| l >= n) {
                    return Err(format!("criticality_layers: layer {l} does not exist (the model has {n} layers)"));
                }
                v
            }
            Some(LayerChoice::Named(other)) => {
                return Err(format!("criticality_layers: \"{other}\" is not \"all\", \"all-but-first\" or a list"))
            }
        };
        if num_layers.is_some() && layers.is_empty() {
            return Err(
                "criticality_layers selects no layer of this model (a one-layer model has no layer after the first)"
                    .into(),
            );
        }
        Ok(Some(Criticality { lambda, target: target.unwrap_or(1.0), layers }))
    }

    /// Training logits with the inputs and outputs of the chosen layers kept in the graph.
    pub fn forward(&self, model: &Model, ids: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let mut taps: Vec<(HookPoint, Tensor)> = Vec::new();
        let logits = {
            let mut hooks = Hooks::new();
            hooks.observe(None, |pt, x| {
                let wanted = match pt {
                    HookPoint::ResidPre(l) | HookPoint::ResidPost(l) => self.layers.contains(&l),
                    _ => false,
                };
                if wanted {
                    taps.push((pt, x.clone()));
                }
                Ok(())
            });
            model.forward_train_with_hooks(ids, &mut hooks)?
        };
        let find = |p: HookPoint| taps.iter().find(|(q, _)| *q == p).map(|(_, t)| t.clone());
        let pairs = self
            .layers
            .iter()
            .map(|&l| match (find(HookPoint::ResidPre(l)), find(HookPoint::ResidPost(l))) {
                (Some(i), Some(o)) => Ok((i, o)),
                _ => candle_core::bail!("layer {l}: its input and output were not seen in the forward"),
            })
            .collect::<Result<_>>()?;
        Ok((logits, pairs))
    }

    /// The per-layer branching ratios (scalars, in the graph) and the term
    /// `mean_l (BR_l − target)²` (without λ).
    pub fn term(&self, pairs: &[(Tensor, Tensor)]) -> Result<(Vec<Tensor>, Tensor)> {
        let ratios = pairs.iter().map(|(i, o)| branching_ratio(i, o)).collect::<Result<Vec<_>>>()?;
        let sq = ratios.iter().map(|r| (r - self.target)?.sqr()).collect::<Result<Vec<_>>>()?;
        let term = (Tensor::stack(&sq, 0)?.sum_all()? / sq.len() as f64)?;
        Ok((ratios, term))
    }
}

/// Branching ratio of one layer over a batch `[rows, t, hidden]`: per sequence,
/// mean_t ‖out_t‖ / mean_t ‖in_t‖ (f32), then the mean over the sequences. Differentiable.
pub fn branching_ratio(input: &Tensor, output: &Tensor) -> Result<Tensor> {
    let mean_norm = |x: &Tensor| x.to_dtype(DType::F32)?.sqr()?.sum(D::Minus1)?.sqrt()?.mean(D::Minus1);
    (mean_norm(output)? / mean_norm(input)?)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, LoadOptions, ModelConfig};
    use candle_core::Device;

    fn setup() -> (Model, Tensor, Criticality) {
        let mut cfg = ModelConfig::tiny(Arch::Llama, 40, 16, 32, 3, 2, 1);
        cfg.raw["initializer_range"] = 0.3.into();
        let cfg = ModelConfig::from_json(cfg.raw).unwrap();
        let model = Model::random(&cfg, 5, &LoadOptions::default()).unwrap();
        let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 7 % 40) as u32).collect();
        let ids = Tensor::from_vec(ids, (2, 9), &Device::Cpu).unwrap();
        let c = Criticality::from_params(Some(1.0), Some(0.8), None, Some(3)).unwrap().unwrap();
        (model, ids, c)
    }

    fn term(model: &Model, ids: &Tensor, c: &Criticality) -> f64 {
        let (_, taps) = c.forward(model, ids).unwrap();
        c.term(&taps).unwrap().1.to_scalar::<f32>().unwrap() as f64
    }

    /// The term's gradient is the finite-difference one, for a projection of each chosen layer
    /// and of the layer before them (whose output is their input).
    #[test]
    fn the_terms_gradient_matches_finite_differences() {
        let (model, ids, c) = setup();
        assert_eq!(c.layers, [1, 2], "all but the first layer by default");
        let params = model.named_parameters();
        let (_, taps) = c.forward(&model, &ids).unwrap();
        let grads = c.term(&taps).unwrap().1.backward().unwrap();
        for name in [
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.self_attn.v_proj.weight",
            "model.layers.2.mlp.up_proj.weight",
        ] {
            let var = &params.iter().find(|(n, _)| n == name).unwrap().1;
            let g = grads.get(var.as_tensor()).unwrap();
            let u: Vec<f32> = (0..var.elem_count()).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
            let u = Tensor::from_vec(u, var.shape(), &Device::Cpu).unwrap();
            let analytic = (g * &u).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            let orig = var.as_tensor().copy().unwrap();
            let eps = 1e-3;
            var.set(&(&orig + (&u * eps).unwrap()).unwrap()).unwrap();
            let up = term(&model, &ids, &c);
            var.set(&(&orig - (&u * eps).unwrap()).unwrap()).unwrap();
            let down = term(&model, &ids, &c);
            var.set(&orig).unwrap();
            let numeric = (up - down) / (2.0 * eps);
            assert!(analytic.abs() > 1e-3, "{name}: no gradient ({analytic})");
            let err = (analytic - numeric).abs();
            assert!(err < 2e-2 * numeric.abs() + 1e-4, "{name}: backward {analytic}, finite differences {numeric}");
        }
    }

    #[test]
    fn layer_choices_and_their_errors() {
        let pick = |l: Option<serde_json::Value>| {
            let l: Option<LayerChoice> = l.map(|v| serde_json::from_value(v).unwrap());
            Criticality::from_params(Some(0.5), None, l.as_ref(), Some(4))
        };
        assert_eq!(pick(None).unwrap().unwrap().layers, [1, 2, 3]);
        assert_eq!(pick(Some("all".into())).unwrap().unwrap().layers, [0, 1, 2, 3]);
        assert_eq!(pick(Some(serde_json::json!([3, 1, 3]))).unwrap().unwrap().layers, [1, 3]);
        assert!(pick(Some(serde_json::json!([4]))).unwrap_err().contains("layer 4 does not exist"));
        assert!(pick(Some(serde_json::json!([]))).unwrap_err().contains("empty list"));
        assert!(Criticality::from_params(None, Some(1.0), None, None)
            .unwrap_err()
            .contains("without criticality_lambda"));
        assert!(Criticality::from_params(None, None, None, Some(4)).unwrap().is_none());
        let one = Criticality::from_params(Some(1.0), None, None, Some(1)).unwrap_err();
        assert!(one.contains("selects no layer"), "{one}");
    }
}
