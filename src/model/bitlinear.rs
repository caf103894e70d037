//! A projection (q/k/v/o/gate/up/down): a plain linear map for Llama, a BitLinear for BitNet.
//!
//! Weight storage:
//! - [`ProjWeight::Dense`]: a full-precision `[out, in]` matrix. With ternary quantisation it is the
//!   latent weight, fake-quantised on every forward (transformers' online `AutoBitLinear`).
//! - [`ProjWeight::Packed`]: the unpacked ternary codes `T ∈ {-1,0,1}` `[out, in]` and the
//!   per-tensor `weight_scale`; `y = (x̂ · Tᵀ) · weight_scale` (offline `AutoBitLinear`).

use super::config::Quantization;
use super::mode::Mode;
use super::quant::{act_fake_quant, ste, weight_fake_quant};
use candle_core::{Result, Tensor, Var};
use std::sync::{Arc, RwLock};

/// The stored weight of a projection.
#[derive(Debug, Clone)]
pub enum ProjWeight {
    Dense(Var),
    Packed { codes: Var, scale: Tensor },
}

/// One projection layer.
#[derive(Debug, Clone)]
pub struct Projection {
    pub(crate) weight: ProjWeight,
    pub(crate) quant: Quantization,
    /// Inference-only cache of the effective (fake-quantised) weight; cleared on every write.
    cache: Arc<RwLock<Option<Tensor>>>,
}

impl Projection {
    pub fn new(weight: ProjWeight, quant: Quantization) -> Self {
        Self { weight, quant, cache: Arc::new(RwLock::new(None)) }
    }

    /// The tensor that holds this projection's weight (latent matrix or ternary codes).
    pub fn var(&self) -> &Var {
        match &self.weight {
            ProjWeight::Dense(v) => v,
            ProjWeight::Packed { codes, .. } => codes,
        }
    }

    /// Drop the cached quantised weight (call after the weight was changed).
    pub fn invalidate(&self) {
        *self.cache.write().expect("projection cache lock") = None;
    }

    fn infer_weight(&self, cache: bool) -> Result<Tensor> {
        if cache {
            if let Some(w) = self.cache.read().expect("projection cache lock").as_ref() {
                return Ok(w.clone());
            }
        }
        let w = match (&self.weight, self.quant) {
            (ProjWeight::Dense(v), Quantization::Ternary) => weight_fake_quant(v.as_tensor())?,
            (ProjWeight::Dense(v), Quantization::None) => v.as_detached_tensor(),
            (ProjWeight::Packed { codes, .. }, _) => codes.as_detached_tensor(),
        };
        let w = w.detach();
        if cache {
            *self.cache.write().expect("projection cache lock") = Some(w.clone());
        }
        Ok(w)
    }

    /// The input as this projection multiplies it: activation fake-quant for ternary (under a
    /// straight-through estimator in training), unchanged otherwise. Projections that read the
    /// same tensor (q/k/v, gate/up) share one call.
    pub fn prepare_input(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match (self.quant, mode) {
            (Quantization::None, _) => Ok(x.clone()),
            (Quantization::Ternary, Mode::Infer) => act_fake_quant(x),
            (Quantization::Ternary, Mode::Train) => ste(x, &act_fake_quant(x)?),
        }
    }

    /// `x [.., in] → [.., out]`. `cache` allows reusing the quantised weight between calls
    /// (inference only; the model turns it off while its parameters are being trained).
    pub fn forward(&self, x: &Tensor, mode: Mode, cache: bool) -> Result<Tensor> {
        self.apply(&self.prepare_input(x, mode)?, mode, cache)
    }

    /// Multiply an input already passed through [`Projection::prepare_input`].
    pub fn apply(&self, x: &Tensor, mode: Mode, cache: bool) -> Result<Tensor> {
        let ternary = self.quant == Quantization::Ternary;
        let w = match mode {
            Mode::Infer => self.infer_weight(cache)?,
            Mode::Train => match &self.weight {
                ProjWeight::Dense(v) if ternary => ste(v.as_tensor(), &weight_fake_quant(v.as_tensor())?)?,
                ProjWeight::Dense(v) => v.as_tensor().clone(),
                ProjWeight::Packed { codes, .. } => codes.as_detached_tensor(),
            },
        };
        let dims = x.dims().to_vec();
        let (out, inp) = w.dims2()?;
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((rows, inp))?.matmul(&w.t()?)?;
        let y = match &self.weight {
            ProjWeight::Packed { scale, .. } => y.broadcast_mul(scale)?,
            ProjWeight::Dense(_) => y,
        };
        let mut shape = dims;
        *shape.last_mut().expect("non-scalar input") = out;
        y.reshape(shape)
    }
}
