//! Grouped-query self-attention with RoPE, an optional KV cache and (BitNet) `attn_sub_norm`
//! before `o_proj`.

use super::attention_kernel;
use super::bitlinear::{ProjOpts, Projection};
use super::config::{ModelConfig, Quantization, WeightFormat};
use super::holographic::Holo;
use super::mode::Mode;
use super::norm::RmsNorm;
use super::rope::Rope;
use super::train_ops::{self, HeadLayout};
use super::vb::Vb;
use candle_core::{DType, Device, Result, Tensor, D};

/// Self-attention of one layer.
#[derive(Debug, Clone)]
pub struct Attention {
    pub(crate) q_proj: Projection,
    pub(crate) k_proj: Projection,
    pub(crate) v_proj: Projection,
    pub(crate) o_proj: Projection,
    pub(crate) sub_norm: Option<RmsNorm>,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
    /// Holographic attention in place of the full softmax (see `holographic.rs`).
    pub(crate) holo: Option<Holo>,
}

/// Additive causal mask `[t, offset + t]` (0 or −inf), f32.
fn causal_mask(t: usize, offset: usize, dev: &Device) -> Result<Tensor> {
    let total = offset + t;
    let m: Vec<f32> =
        (0..t).flat_map(|i| (0..total).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(m, (t, total), dev)
}

/// `[b, kv, T, d] → [b, kv·rep, T, d]`, kv head `j` serving query heads `j·rep .. j·rep+rep`.
fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?.expand((b, kv, rep, t, d))?.reshape((b, kv * rep, t, d))
}

impl Attention {
    /// `{q,k,v,o}_proj` and (BitNet) `attn_sub_norm` under `vb` (`model.layers.{l}.self_attn`).
    /// q, k, v, o in this order: random initialisation draws them in load order. Layer `layer`
    /// also has the holographic tensors when the config swaps it.
    pub(crate) fn load(mut vb: Vb<'_>, layer: usize, cfg: &ModelConfig, quant: Quantization) -> anyhow::Result<Self> {
        let (h, q, kv) = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let packed = cfg.weight_format == WeightFormat::Packed;
        let mut proj = |name: &str, shape| Projection::load(vb.pp(name), shape, packed, quant);
        let (q_proj, k_proj, v_proj, o_proj) =
            (proj("q_proj", [q, h])?, proj("k_proj", [kv, h])?, proj("v_proj", [kv, h])?, proj("o_proj", [h, q])?);
        // transformers sizes the sub-norm by hidden_size (= heads · head_dim in every BitNet).
        let sub_norm =
            if cfg.is_bitnet() { Some(RmsNorm::load(vb.pp("attn_sub_norm"), h, cfg.rms_norm_eps)?) } else { None };
        let holo = match &cfg.holographic {
            Some(hc) if hc.layers.contains(&layer) => {
                Some(Holo::load(vb.pp("holographic"), hc, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)?)
            }
            _ => None,
        };
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            sub_norm,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            holo,
        })
    }

    /// `x [b, t, hidden]`; `offset` = number of cached positions; `kv` = this layer's cache slot.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        offset: usize,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
        mode: Mode,
        proj: ProjOpts,
    ) -> Result<Tensor> {
        if kv.is_none() && self.holo.is_none() && train_ops::fused(x) {
            return self.forward_fused(x, rope, offset, mode, proj);
        }
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let xq = self.q_proj.prepare_input(x, mode, proj)?; // shared by q, k, v
        let q = self.q_proj.apply(&xq, mode, proj)?;
        let k = self.k_proj.apply(&xq, mode, proj)?;
        let v = self.v_proj.apply(&xq, mode, proj)?;
        let q = q.reshape((b, t, nh, d))?.transpose(1, 2)?;
        let k = k.reshape((b, t, nkv, d))?.transpose(1, 2)?;
        let v = v.reshape((b, t, nkv, d))?.transpose(1, 2)?.contiguous()?;
        let q = rope.apply(&q, offset, mode)?;
        let k = rope.apply(&k, offset, mode)?;
        let (k, v) = match kv {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let o = match &self.holo {
            Some(holo) => holo.forward(&q, &k, &v, mode)?.to_dtype(x.dtype())?,
            None => self.full(&q, &k, &v, offset, mode, x)?,
        };
        let o = o.transpose(1, 2)?.reshape((b, t, nh * d))?;
        let o = match &self.sub_norm {
            Some(n) => n.forward(&o, mode)?,
            None => o,
        };
        self.o_proj.forward(&o, mode, proj)
    }

    /// The forward on CPU in f32 without a KV cache from the fused ops (`train_ops.rs`): the same
    /// values as the composed path below (tested), in a dozen graph nodes instead of forty when
    /// training (each node costs the backward a zero-filled gradient and an add) and with fewer
    /// copies in inference, where the attention itself is one op (`attention_kernel.rs`).
    fn forward_fused(&self, x: &Tensor, rope: &Rope, offset: usize, mode: Mode, proj: ProjOpts) -> Result<Tensor> {
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let xq = self.q_proj.prepare_input(x, mode, proj)?; // shared by q, k, v
        let q = self.q_proj.apply(&xq, mode, proj)?;
        let k = self.k_proj.apply(&xq, mode, proj)?;
        let v = self.v_proj.apply(&xq, mode, proj)?;
        let (cos, sin) = rope.tables(offset, x.dim(1)?)?;
        let heads = |y: &Tensor, heads, repeat, rope, transposed| {
            train_ops::split_heads(y, &cos, &sin, HeadLayout { heads, repeat, rope, transposed })
        };
        let q = heads(&q, nh, 1, true, false)?;
        let scale = (d as f64).powf(-0.5) as f32;
        let o = if mode == Mode::Infer && attention_kernel::applies(x.dim(1)?, d) {
            // Keys and values as their own heads, read in place by the kernel.
            let (k, v) = (heads(&k, nkv, 1, true, false)?, heads(&v, nkv, 1, false, false)?);
            attention_kernel::causal_attention(&q, &k, &v, scale, offset)?
        } else {
            let rep = nh / nkv;
            let (kt, v) = (heads(&k, nkv, rep, true, true)?, heads(&v, nkv, rep, false, false)?);
            let att = train_ops::causal_softmax(&q.matmul(&kt)?, scale, offset)?;
            train_ops::merge_heads(&att.matmul(&v)?)?
        };
        let o = match &self.sub_norm {
            Some(n) => n.forward(&o, mode)?,
            None => o,
        };
        self.o_proj.forward(&o, mode, proj)
    }

    /// Standard causal softmax attention `[b, nh, t, d]` of queries at `offset..offset+t`.
    fn full(&self, q: &Tensor, k: &Tensor, v: &Tensor, offset: usize, mode: Mode, x: &Tensor) -> Result<Tensor> {
        let (t, d) = (q.dim(2)?, self.head_dim);
        let rep = self.num_heads / self.num_kv_heads;
        let k = repeat_kv(k, rep)?;
        let v = repeat_kv(v, rep)?;
        let scale = (d as f64).powf(-0.5);
        let att = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
        let mask = causal_mask(t, offset, x.device())?;
        let att = att.to_dtype(DType::F32)?.broadcast_add(&mask)?;
        let att = match mode {
            Mode::Infer => candle_nn::ops::softmax_last_dim(&att)?,
            Mode::Train => candle_nn::ops::softmax(&att, D::Minus1)?,
        };
        let att = att.to_dtype(x.dtype())?;
        att.matmul(&v.contiguous()?) // [b, nh, t, d]
    }
}
