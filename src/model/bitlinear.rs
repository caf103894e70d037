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
use super::vb::{Param, Role, Vb};
use candle_core::{Result, Tensor, Var};
use std::sync::{Arc, RwLock};

/// The stored weight of a projection.
#[derive(Debug, Clone)]
pub(crate) enum ProjWeight {
    Dense(Param),
    Packed { codes: Param, scale: Param },
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
    /// `weight [out, in]` under `vb`, or for a packed checkpoint its ternary codes and
    /// `weight_scale`.
    pub(crate) fn load(mut vb: Vb<'_>, shape: [usize; 2], packed: bool, quant: Quantization) -> anyhow::Result<Self> {
        let w = vb.param(&shape, "weight", if packed { Role::Codes } else { Role::Projection })?;
        let weight = if packed {
            ProjWeight::Packed { codes: w, scale: vb.param(&[1], "weight_scale", Role::Scale)? }
        } else {
            ProjWeight::Dense(w)
        };
        Ok(Self { weight, quant, cache: Arc::new(RwLock::new(None)) })
    }

    /// The stored weight (latent matrix or ternary codes) and its checkpoint name.
    pub(crate) fn param(&self) -> &Param {
        match &self.weight {
            ProjWeight::Dense(p) => p,
            ProjWeight::Packed { codes, .. } => codes,
        }
    }

    /// The tensor that holds this projection's weight (latent matrix or ternary codes).
    pub fn var(&self) -> &Var {
        &self.param().var
    }

    /// Drop the cached quantised weight (call after the weight was changed).
    pub fn invalidate(&self) {
        *self.cache.write().expect("projection cache lock") = None;
    }

    /// The weight the inference forward multiplies by (quantised if ternary; a packed
    /// projection's codes without its per-tensor scale).
    pub(crate) fn effective_weight(&self) -> Result<Tensor> {
        self.infer_weight(false)
    }

    fn infer_weight(&self, cache: bool) -> Result<Tensor> {
        if cache {
            if let Some(w) = self.cache.read().expect("projection cache lock").as_ref() {
                return Ok(w.clone());
            }
        }
        let w = match (&self.weight, self.quant) {
            (ProjWeight::Dense(p), Quantization::Ternary) => weight_fake_quant(p.var.as_tensor())?,
            (ProjWeight::Dense(p), Quantization::None) => p.var.as_detached_tensor(),
            (ProjWeight::Packed { codes, .. }, _) => codes.var.as_detached_tensor(),
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
                ProjWeight::Dense(p) if ternary => ste(p.var.as_tensor(), &weight_fake_quant(p.var.as_tensor())?)?,
                ProjWeight::Dense(p) => p.var.as_tensor().clone(),
                ProjWeight::Packed { codes, .. } => codes.var.as_detached_tensor(),
            },
        };
        let dims = x.dims().to_vec();
        let (out, inp) = w.dims2()?;
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((rows, inp))?.matmul(&w.t()?)?;
        let y = match &self.weight {
            ProjWeight::Packed { scale, .. } => y.broadcast_mul(&scale.var.as_detached_tensor())?,
            ProjWeight::Dense(_) => y,
        };
        let mut shape = dims;
        *shape.last_mut().expect("non-scalar input") = out;
        y.reshape(shape)
    }
}
