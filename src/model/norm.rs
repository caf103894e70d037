//! RMSNorm as in transformers: `w ⊙ cast(x_f32 · rsqrt(mean(x_f32²) + eps))`.

use super::mode::Mode;
use super::train_ops;
use super::vb::{Param, Role, Vb};
use candle_core::{DType, Result, Tensor, D};

/// An RMSNorm layer (input, post-attention, sub-norms and the final norm).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub(crate) weight: Param,
    pub(crate) eps: f64,
}

impl RmsNorm {
    /// The gain `weight [size]` under `vb`.
    pub(crate) fn load(mut vb: Vb<'_>, size: usize, eps: f64) -> anyhow::Result<Self> {
        Ok(Self { weight: vb.param(&[size], "weight", Role::Norm)?, eps })
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            // candle's fused kernel rounds once; transformers rounds to the input dtype before the
            // weight multiply. Same result in f32; in bf16 we follow transformers exactly.
            Mode::Infer if x.dtype() == DType::F32 => {
                let w = self.weight.value(mode);
                if train_ops::fused(x) {
                    // The same bits, several rows' sums at once (train_ops::rms_rows).
                    train_ops::rms_norm_infer(x, &w, self.eps as f32)
                } else {
                    candle_nn::ops::rms_norm(&x.contiguous()?, &w, self.eps as f32)
                }
            }
            Mode::Train if train_ops::fused(x) && self.weight.var.dtype() == DType::F32 => {
                train_ops::rms_norm(x, self.weight.var.as_tensor(), self.eps as f32)
            }
            _ => {
                // Detached in inference (`Param::value`): a bf16 eval of the 2B model at 4 × 2048
                // tokens once ran a 141 GB GPU out of memory multiplying by the variable here.
                let w = self.weight.value(mode);
                let xf = x.to_dtype(DType::F32)?;
                let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
                let inv = (var + self.eps)?.sqrt()?.recip()?;
                xf.broadcast_mul(&inv)?.to_dtype(x.dtype())?.broadcast_mul(&w)
            }
        }
    }
}
