//! Rotary position embedding, rotate-half layout (HF), plain (no scaling).

use super::mode::Mode;
use super::train_ops;
use candle_core::{DType, Device, Result, Tensor};

/// Precomputed `cos`/`sin` tables `[max_pos, head_dim/2]`, computed in f32 and cast to the model
/// dtype as transformers does.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    max_pos: usize,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, max_pos: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let base = theta as f32;
        let inv: Vec<f32> = (0..half).map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32)).collect();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (max_pos, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_pos, half), dev)?.to_dtype(dtype)?;
        Ok(Self { cos, sin, max_pos })
    }

    /// Positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.max_pos
    }

    /// The `cos`, `sin` tables `[t, head_dim/2]` of positions `offset..offset+t`.
    pub fn tables(&self, offset: usize, t: usize) -> Result<(Tensor, Tensor)> {
        if offset + t > self.max_pos {
            candle_core::bail!("position {} exceeds max_position_embeddings {}", offset + t, self.max_pos);
        }
        Ok((self.cos.narrow(0, offset, t)?, self.sin.narrow(0, offset, t)?))
    }

    /// Rotate `x` `[b, heads, t, head_dim]` for positions `offset..offset+t`.
    pub fn apply(&self, x: &Tensor, offset: usize, mode: Mode) -> Result<Tensor> {
        let (cos, sin) = self.tables(offset, x.dim(2)?)?;
        match mode {
            // transformers rounds `x·cos` and `rotate_half(x)·sin` to the dtype before adding
            // them; candle's CUDA kernel may fuse them into one rounding in bf16/f16, so there the
            // composed form keeps transformers' rounding points (its CPU kernel does already).
            Mode::Infer if x.device().is_cpu() || x.dtype() == DType::F32 => {
                candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
            }
            Mode::Infer => candle_nn::rotary_emb::rope_slow(x, &cos, &sin),
            Mode::Train if train_ops::fused(x) && train_ops::fused(&cos) => train_ops::rope(x, &cos, &sin),
            Mode::Train => candle_nn::rotary_emb::rope_slow(x, &cos, &sin),
        }
    }
}
