//! Next-token cross-entropy: the fused CPU op (`train_ops::cross_entropy`) for f32 on CPU,
//! `candle_nn::loss::cross_entropy` elsewhere.

use super::train_ops;
use candle_core::{DType, Result, Tensor};

/// Mean next-token negative log-likelihood of `ids [b, t]` under `logits [b, t, V]`
/// (positions 0..t-1 predict 1..t). A scalar tensor with a backward.
pub fn causal_lm_loss(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let pred = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?.to_dtype(DType::F32)?;
    let target = ids.narrow(1, 1, t - 1)?.reshape(b * (t - 1))?.to_dtype(DType::U32)?;
    cross_entropy(&pred, &target)
}

/// Mean negative log-likelihood of `targets [n]` under `logits [n, V]` (f32). A scalar tensor
/// with a backward.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if train_ops::fused(logits) {
        train_ops::cross_entropy(logits, targets)
    } else {
        candle_nn::loss::cross_entropy(logits, &targets.to_dtype(DType::U32)?)
    }
}
