//! The gated MLP: `down(sub_norm(act(gate(x)) ⊙ up(x)))`; relu² + `ffn_sub_norm` for BitNet,
//! SiLU without sub-norm for Llama.

use super::bitlinear::{ProjOpts, Projection};
use super::config::{Activation, ModelConfig, Quantization, WeightFormat};
use super::mode::Mode;
use super::norm::RmsNorm;
use super::train_ops;
use super::vb::Vb;
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
    /// `{gate,up,down}_proj` and (BitNet) `ffn_sub_norm` under `vb` (`model.layers.{l}.mlp`), in
    /// this order (random initialisation draws them in load order).
    pub(crate) fn load(mut vb: Vb<'_>, cfg: &ModelConfig, quant: Quantization) -> anyhow::Result<Self> {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let packed = cfg.weight_format == WeightFormat::Packed;
        let mut proj = |name: &str, shape| Projection::load(vb.pp(name), shape, packed, quant);
        let (gate_proj, up_proj, down_proj) =
            (proj("gate_proj", [f, h])?, proj("up_proj", [f, h])?, proj("down_proj", [h, f])?);
        let sub_norm =
            if cfg.is_bitnet() { Some(RmsNorm::load(vb.pp("ffn_sub_norm"), f, cfg.rms_norm_eps)?) } else { None };
        Ok(Self { gate_proj, up_proj, down_proj, sub_norm, activation: cfg.activation })
    }

    pub fn forward(&self, x: &Tensor, mode: Mode, proj: ProjOpts) -> Result<Tensor> {
        let xq = self.gate_proj.prepare_input(x, mode, proj)?; // shared by gate and up
        let g = self.gate_proj.apply(&xq, mode, proj)?;
        let u = self.up_proj.apply(&xq, mode, proj)?;
        if self.activation == Activation::Relu2 && train_ops::fused(&g) && train_ops::fused(&u) {
            // One pass instead of three, the same values.
            let h = train_ops::relu2_mul(&g, &u)?;
            return self.down(h, mode, proj);
        }
        let g = match self.activation {
            Activation::Relu2 => g.relu()?.sqr()?,
            // torch evaluates SiLU of bf16 in f32 and rounds once.
            Activation::Silu => candle_nn::ops::silu(&g.to_dtype(DType::F32)?)?.to_dtype(g.dtype())?,
        };
        self.down((g * u)?, mode, proj)
    }

    /// `down(sub_norm(h))`.
    fn down(&self, h: Tensor, mode: Mode, proj: ProjOpts) -> Result<Tensor> {
        let h = match &self.sub_norm {
            Some(n) => n.forward(&h, mode)?,
            None => h,
        };
        self.down_proj.forward(&h, mode, proj)
    }
}
