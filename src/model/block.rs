//! One pre-norm decoder layer with its residual hook points.

use super::attention::Attention;
use super::bitlinear::{ProjOpts, ProjWeight, Projection};
use super::config::{ModelConfig, Quantization};
use super::hooks::{apply, HookPoint, Hooks};
use super::mlp::Mlp;
use super::mode::Mode;
use super::norm::RmsNorm;
use super::rope::Rope;
use super::vb::Vb;
use candle_core::{Result, Tensor, Var};

/// A decoder layer: `h += attn(norm(h)); h += mlp(norm(h))`.
#[derive(Debug, Clone)]
pub struct Block {
    pub(crate) input_layernorm: RmsNorm,
    pub(crate) self_attn: Attention,
    pub(crate) post_attention_layernorm: RmsNorm,
    pub(crate) mlp: Mlp,
}

/// Per-call context of a block forward.
pub(crate) struct BlockCtx<'r> {
    pub rope: &'r Rope,
    pub offset: usize,
    pub mode: Mode,
    pub proj: ProjOpts,
}

impl Block {
    /// One layer under `vb` (`model.layers.{l}`).
    pub(crate) fn load(mut vb: Vb<'_>, layer: usize, cfg: &ModelConfig, quant: Quantization) -> anyhow::Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(vb.pp("input_layernorm"), h, eps)?,
            self_attn: Attention::load(vb.pp("self_attn"), layer, cfg, quant)?,
            post_attention_layernorm: RmsNorm::load(vb.pp("post_attention_layernorm"), h, eps)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg, quant)?,
        })
    }

    /// The seven projections in checkpoint order: q, k, v, o, gate, up, down.
    pub(crate) fn projections(&self) -> [&Projection; 7] {
        [
            &self.self_attn.q_proj,
            &self.self_attn.k_proj,
            &self.self_attn.v_proj,
            &self.self_attn.o_proj,
            &self.mlp.gate_proj,
            &self.mlp.up_proj,
            &self.mlp.down_proj,
        ]
    }

    /// The layer's trainable tensors by name: norms, sub-norms, the latent projections (packed
    /// ones are frozen), then the holographic tensors if the layer has them.
    pub(crate) fn parameters(&self, out: &mut Vec<(String, Var)>) {
        let norms = [Some(&self.input_layernorm), Some(&self.post_attention_layernorm)];
        let norms = norms.into_iter().chain([self.self_attn.sub_norm.as_ref(), self.mlp.sub_norm.as_ref()]);
        for n in norms.flatten() {
            out.push((n.weight.name.clone(), n.weight.var.clone()));
        }
        for p in self.projections() {
            if let ProjWeight::Dense(w) = &p.weight {
                out.push((w.name.clone(), w.var.clone()));
            }
        }
        for p in self.self_attn.holo.iter().flat_map(|h| h.params()) {
            out.push((p.name.clone(), p.var.clone()));
        }
    }

    pub(crate) fn forward(
        &self,
        layer: usize,
        h: Tensor,
        ctx: &BlockCtx<'_>,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
        hooks: &mut Option<&mut Hooks<'_>>,
    ) -> Result<Tensor> {
        let h = apply(hooks, HookPoint::ResidPre(layer), h)?;
        let a = self.input_layernorm.forward(&h, ctx.mode)?;
        let a = self.self_attn.forward(&a, ctx.rope, ctx.offset, kv, ctx.mode, ctx.proj)?;
        let h = (h + a)?;
        let h = apply(hooks, HookPoint::ResidMid(layer), h)?;
        let m = self.post_attention_layernorm.forward(&h, ctx.mode)?;
        let m = self.mlp.forward(&m, ctx.mode, ctx.proj)?;
        let h = (h + m)?;
        apply(hooks, HookPoint::ResidPost(layer), h)
    }
}
