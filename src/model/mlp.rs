//! The gated MLP: `down(sub_norm(act(gate(x)) ⊙ up(x)))`; relu² + `ffn_sub_norm` for BitNet,
//! SiLU without sub-norm for Llama.

use super::bitlinear::Projection;
use super::config::Activation;
use super::mode::Mode;
use super::norm::RmsNorm;
use candle_core::{DType, Result, Tensor};

/// The MLP of one layer.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub(crate) gate_proj: Projection,
    pub(crate) up_proj: Projection,
    pub(crate) down_proj: Projection,
    pub(crate) sub_norm: Option<RmsNorm>,
    pub(crate) activation: Activation,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor, mode: Mode, cache_w: bool) -> Result<Tensor> {
        let xq = self.gate_proj.prepare_input(x, mode)?; // shared by gate and up
        let g = self.gate_proj.apply(&xq, mode, cache_w)?;
        let u = self.up_proj.apply(&xq, mode, cache_w)?;
        let g = match self.activation {
            Activation::Relu2 => g.relu()?.sqr()?,
            // torch evaluates SiLU of bf16 in f32 and rounds once.
            Activation::Silu => candle_nn::ops::silu(&g.to_dtype(DType::F32)?)?.to_dtype(g.dtype())?,
        };
        let h = (g * u)?;
        let h = match &self.sub_norm {
            Some(n) => n.forward(&h, mode)?,
            None => h,
        };
        self.down_proj.forward(&h, mode, cache_w)
    }
}
