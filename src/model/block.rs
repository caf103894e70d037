//! One pre-norm decoder layer with its residual hook points.

use super::attention::Attention;
use super::hooks::{apply, HookPoint, Hooks};
use super::mlp::Mlp;
use super::mode::Mode;
use super::norm::RmsNorm;
use super::rope::Rope;
use candle_core::{Result, Tensor};

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
    pub cache_w: bool,
}

impl Block {
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
        let a = self.self_attn.forward(&a, ctx.rope, ctx.offset, kv, ctx.mode, ctx.cache_w)?;
        let h = (h + a)?;
        let h = apply(hooks, HookPoint::ResidMid(layer), h)?;
        let m = self.post_attention_layernorm.forward(&h, ctx.mode)?;
        let m = self.mlp.forward(&m, ctx.mode, ctx.cache_w)?;
        let h = (h + m)?;
        apply(hooks, HookPoint::ResidPost(layer), h)
    }
}
