//! The residual tap: hooks that remember h_in at `ResidPre(l)` and, at `ResidPost(l)`, optionally
//! prune the correction c = h_out − h_in and accumulate per-layer statistics. Shared by
//! `hook-residuals` and `perturb`.

use std::cell::RefCell;

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::analysis::residual::{
    zero_below_tensor_percentile, zero_below_threshold, zero_below_token_percentile, Cut, LayerAccumulator,
};
use crate::model::{HookPoint, Hooks};

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
    pub fn mode(&self) -> &'static str {
        match self {
            Pruning::Threshold(_) => "threshold",
            Pruning::Percentile(_) => "percentile",
            Pruning::TensorPercentile(_) => "tensor-percentile",
        }
    }
    pub fn value(&self) -> f64 {
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

/// What the residual hooks of one forward pass (or one generation) do: remember h_in at
/// `ResidPre(l)`; at `ResidPost(l)` optionally prune c and optionally add (h_in, h_out) to the
/// statistics of layer l.
pub struct ResidualTap {
    hidden: usize,
    pruning: Option<Pruning>,
    /// Per layer: does the intervention apply?
    pub intervened: Vec<bool>,
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
