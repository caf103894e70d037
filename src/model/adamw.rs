//! AdamW as torch computes it (decoupled weight decay, bias-corrected moments), with gradient
//! masks for pruned positions and moments that can be checkpointed and restored exactly.
//! (candle's own AdamW keeps its moments private, so a resumed run could not continue it.)
//! Parameters stored in bf16 get f32 master copies: an update of lr = 5e-4 on a latent weight
//! near 1 is below half a bf16 ulp and would otherwise be rounded away. `in_model_dtype` turns
//! that off, as torch's AdamW on a bf16 model does (the RPT notebooks): the moments are kept and
//! the update is written in the parameter's dtype (each step computed in f32, then rounded).

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use candle_core::{DType, Tensor, Var};

use super::cpu_values::{same_storage, with_f32, with_f32_mut};

#[derive(Clone, Copy, Debug)]
pub struct Hyper {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub hyper: Hyper,
    /// Steps taken (for bias correction).
    pub t: u64,
    pub params: Vec<(String, Var)>,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// f32 master weights of parameters stored in another dtype.
    pub master: Vec<Option<Tensor>>,
    /// Moments stored in the parameter's dtype, no master weights.
    pub in_model_dtype: bool,
    /// Update f32 state on CPU in one pass (`fused_step`); off only to test it against the
    /// composed path.
    fused: bool,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, hyper: Hyper, in_model_dtype: bool) -> Result<AdamW> {
        let state_dtype = |p: &Var| if in_model_dtype { p.dtype() } else { DType::F32 };
        let zeros = |p: &Var| Tensor::zeros(p.shape(), state_dtype(p), p.device());
        let m = params.iter().map(|(_, p)| zeros(p)).collect::<candle_core::Result<Vec<_>>>()?;
        let v = params.iter().map(|(_, p)| zeros(p)).collect::<candle_core::Result<Vec<_>>>()?;
        let master = params
            .iter()
            .map(|(_, p)| {
                if p.dtype() == DType::F32 || in_model_dtype {
                    Ok(None)
                } else {
                    p.as_detached_tensor().to_dtype(DType::F32).map(Some)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW { hyper, t: 0, params, m, v, master, in_model_dtype, fused: true })
    }

    /// One update with gradients `grads[i]` for `params[i]` (already masked and clipped).
    /// Moments are kept in f32 whatever the parameter dtype.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let Hyper { beta1, beta2, eps, weight_decay } = self.hyper;
        let bc1 = 1.0 - beta1.powi(self.t as i32);
        let bc2 = 1.0 - beta2.powi(self.t as i32);
        for (i, (_, p)) in self.params.iter().enumerate() {
            if self.fused && !self.in_model_dtype {
                // The f32 weight updated in place: the master, or the parameter itself.
                let w = self.master[i].clone().unwrap_or_else(|| p.as_tensor().clone());
                let coef = Coef::new(self.hyper, lr, bc1, bc2);
                // Gradients in the parameter's dtype are widened first, as the composed path does.
                let g = grads[i].to_dtype(DType::F32)?;
                if fused_step(&g, &self.m[i], &self.v[i], &w, &coef)? {
                    if self.master[i].is_some() {
                        p.set(&w.to_dtype(p.dtype())?)?;
                    }
                    continue;
                }
            }
            let g = grads[i].to_dtype(DType::F32)?;
            let m = ((self.m[i].to_dtype(DType::F32)? * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((self.v[i].to_dtype(DType::F32)? * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let (m, v) = if self.in_model_dtype {
                // Stored rounded to the model's dtype; the update uses the rounded moments.
                (m.to_dtype(p.dtype())?, v.to_dtype(p.dtype())?)
            } else {
                (m, v)
            };
            let (m32, v32) = (m.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
            // The detached value: anything computed from the variable itself records the op, and
            // a master weight computed so kept every earlier step's tensors alive (the 2B
            // fine-tune on a GPU grew by ~29 GB a step and ran out of memory at the second).
            let w = match &self.master[i] {
                Some(w) => w.clone(),
                None => p.as_detached_tensor().to_dtype(DType::F32)?,
            };
            let decayed = (&w * (1.0 - lr * weight_decay))?;
            let update = ((&m32 / bc1)? / ((&v32 / bc2)?.sqrt()? + eps)?)?;
            let next = (decayed - (update * lr)?)?;
            p.set(&next.to_dtype(p.dtype())?)?;
            if self.master[i].is_some() {
                self.master[i] = Some(next);
            }
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moments as named tensors (`m.<name>`, `v.<name>`): copies, since the fused step updates
    /// the optimizer's own in place.
    pub fn state(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].copy()?);
            out.insert(format!("v.{name}"), self.v[i].copy()?);
            if let Some(w) = &self.master[i] {
                out.insert(format!("master.{name}"), w.copy()?);
            }
        }
        Ok(out)
    }

    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>, t: u64) -> Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            let get = |k: String| state.get(&k).with_context(|| format!("checkpoint lacks `{k}`")).cloned();
            // Copies: the fused step updates them in place, and `state` may be shared.
            self.m[i] = get(format!("m.{name}"))?.to_device(p.device())?.to_dtype(self.m[i].dtype())?.copy()?;
            self.v[i] = get(format!("v.{name}"))?.to_device(p.device())?.to_dtype(self.v[i].dtype())?.copy()?;
            if self.master[i].is_some() {
                self.master[i] = Some(get(format!("master.{name}"))?.to_device(p.device())?.copy()?);
            }
        }
        self.t = t;
        Ok(())
    }
}

/// The update's constants as the composed path rounds them to f32 (candle's `affine` takes
/// `T::from_f64` of its factor and offset).
struct Coef {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    decay: f32,
    inv_bc1: f32,
    inv_bc2: f32,
    eps: f32,
    lr: f32,
}

impl Coef {
    fn new(h: Hyper, lr: f64, bc1: f64, bc2: f64) -> Coef {
        Coef {
            beta1: h.beta1 as f32,
            one_minus_beta1: (1.0 - h.beta1) as f32,
            beta2: h.beta2 as f32,
            one_minus_beta2: (1.0 - h.beta2) as f32,
            decay: (1.0 - lr * h.weight_decay) as f32,
            inv_bc1: (1.0 / bc1) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            eps: h.eps as f32,
            lr: lr as f32,
        }
    }
}

/// One AdamW update of an f32 weight `w` (a parameter or its master) with f32 moments on CPU,
/// in place and in one pass: the composed path's operations in its order, each rounded as candle
/// rounds it (`x · c + 0` for an affine map), so both give the same bits (tested). `false`, with
/// nothing changed, when the tensors are not four distinct f32 contiguous CPU tensors of one size
/// (the composed path serves them).
fn fused_step(g: &Tensor, m: &Tensor, v: &Tensor, w: &Tensor, c: &Coef) -> Result<bool> {
    use rayon::prelude::*;
    let n = w.elem_count();
    let all = [g, m, v, w];
    if all.iter().any(|t| t.elem_count() != n) {
        return Ok(false);
    }
    // m, v and w are written under their storages' locks while g is read: four storages.
    for (i, a) in all.iter().enumerate() {
        if all[i + 1..].iter().any(|b| same_storage(a, b)) {
            return Ok(false);
        }
    }
    let update = |g: &[f32], m: &mut [f32], v: &mut [f32], w: &mut [f32]| {
        const CHUNK: usize = 1 << 14;
        let outs = m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)).zip(w.par_chunks_mut(CHUNK));
        outs.zip(g.par_chunks(CHUNK)).for_each(|(((m, v), w), g)| {
            for i in 0..g.len() {
                let g = g[i];
                m[i] = (m[i] * c.beta1 + 0.0) + (g * c.one_minus_beta1 + 0.0);
                v[i] = (v[i] * c.beta2 + 0.0) + (g * g * c.one_minus_beta2 + 0.0);
                let decayed = w[i] * c.decay + 0.0;
                let update = (m[i] * c.inv_bc1 + 0.0) / ((v[i] * c.inv_bc2 + 0.0).sqrt() + c.eps);
                w[i] = decayed - (update * c.lr + 0.0);
            }
        });
        #[cfg(test)]
        FUSED_STEPS.with(|s| s.set(s.get() + 1));
    };
    // Only the innermost closure writes: when any borrow declines, nothing has changed.
    let done =
        with_f32_mut(m, |m| with_f32_mut(v, |v| with_f32_mut(w, |w| with_f32(g, |g| update(g, m, v, w)).is_some())))?;
    Ok(matches!(done, Some(Ok(Some(Ok(Some(true)))))))
}

#[cfg(test)]
thread_local! {
    /// Tensors the fused step has updated on this thread (tests check that it ran).
    static FUSED_STEPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One AdamW step by hand: p = 1, g = 0.5, lr 0.1, wd 0.01 → decayed 0.999, m̂ = 0.5,
    /// v̂ = 0.25, update = 0.5 / (0.5 + 1e-8) ≈ 1 → p ≈ 0.999 − 0.1.
    #[test]
    fn matches_the_torch_formula() {
        let p = Var::from_tensor(&Tensor::new(&[1.0f32, 0.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(
            vec![("p".into(), p.clone())],
            Hyper { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 },
            false,
        )
        .unwrap();
        let g = Tensor::new(&[0.5f32, 0.0], &Device::Cpu).unwrap();
        opt.step(&[g], 0.1).unwrap();
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        assert!((got[0] - (0.999 - 0.1 * (0.5 / (0.5 + 1e-8)))).abs() < 1e-6, "{got:?}");
        assert_eq!(got[1], 0.0, "a zero weight with zero gradient stays exactly zero");
    }

    /// The fused CPU update gives the composed update's bits: f32 parameters and bf16 ones with
    /// f32 masters, with weight decay, over several steps (bias corrections change each step).
    #[test]
    fn fused_update_equals_the_composed_one_bit_for_bit() {
        let dev = Device::Cpu;
        let hyper = Hyper { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        for dtype in [DType::F32, DType::BF16] {
            let run = |composed: bool| {
                let normal = |n: usize, seed: u64| {
                    let mut rng = crate::rng::SplitMix64::new(seed);
                    (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>()
                };
                let w = (Tensor::from_vec(normal(37 * 29, 1), (37, 29), &dev).unwrap() * 0.02).unwrap();
                let w = Tensor::cat(&[&w, &Tensor::zeros((1, 29), DType::F32, &dev).unwrap()], 0).unwrap();
                let p = Var::from_tensor(&w.to_dtype(dtype).unwrap()).unwrap();
                let mut opt = AdamW::new(vec![("p".into(), p.clone())], hyper, false).unwrap();
                opt.fused = !composed;
                let before = FUSED_STEPS.with(|s| s.get());
                for step in 0..4u64 {
                    // Gradients come in the parameter's dtype, as candle's backward gives them.
                    let g =
                        Tensor::from_vec(normal(38 * 29, 7 + step), (38, 29), &dev).unwrap().to_dtype(dtype).unwrap();
                    opt.step(&[g], 1e-3).unwrap();
                }
                let fused_ran = FUSED_STEPS.with(|s| s.get()) - before;
                assert_eq!(fused_ran, if composed { 0 } else { 4 }, "{dtype:?}: steps on the fused path");
                let bits = |t: &Tensor| {
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>()
                };
                let mut out = vec![bits(p.as_tensor()), bits(&opt.m[0]), bits(&opt.v[0])];
                out.extend(opt.master[0].as_ref().map(bits));
                out
            };
            assert_eq!(run(false), run(true), "{dtype:?}");
        }
    }

    /// The optimizer's state records no autograd graph, so a step keeps nothing of the last
    /// one alive: f32 and bf16 parameters, with and without masters, fused and composed.
    #[test]
    fn state_records_no_graph() {
        let hyper = Hyper { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        for (dtype, in_model, fused) in [
            (DType::F32, false, true),
            (DType::F32, false, false),
            (DType::BF16, false, false),
            (DType::BF16, true, false),
        ] {
            let p = Var::from_tensor(&Tensor::new(&[1.0f32, -0.5], &Device::Cpu).unwrap().to_dtype(dtype).unwrap())
                .unwrap();
            let mut opt = AdamW::new(vec![("p".into(), p.clone())], hyper, in_model).unwrap();
            opt.fused = fused;
            for _ in 0..2 {
                let g = Tensor::new(&[0.5f32, 1.0], &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                opt.step(&[g], 1e-3).unwrap();
            }
            let what = format!("{dtype:?} in_model={in_model} fused={fused}");
            assert!(!opt.m[0].track_op() && !opt.v[0].track_op(), "{what}: moments");
            assert!(!opt.master[0].as_ref().is_some_and(|m| m.track_op()), "{what}: master");
        }
    }

    /// In the model's dtype (bf16) a small update on a weight near 1 is rounded away, as in
    /// torch on a bf16 model; with f32 masters it accumulates.
    #[test]
    fn bf16_updates_round_away_without_masters() {
        let run = |in_model: bool| {
            let p = Var::from_tensor(&Tensor::new(&[1.0f32], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap())
                .unwrap();
            let hyper = Hyper { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
            let mut opt = AdamW::new(vec![("p".into(), p.clone())], hyper, in_model).unwrap();
            for _ in 0..10 {
                let g = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
                opt.step(&[g], 5e-4).unwrap();
            }
            assert_eq!(opt.m[0].dtype(), if in_model { DType::BF16 } else { DType::F32 });
            p.as_tensor().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0]
        };
        assert_eq!(run(true), 1.0, "each 5e-4 step is below half a bf16 ulp at 1.0");
        assert!(run(false) < 1.0, "f32 masters accumulate ten steps (5e-3 > half an ulp, 3.9e-3)");
    }
}
