//! Next-token cross-entropy: the fused CPU op (`train_ops::cross_entropy`) for f32 on CPU,
//! `candle_nn::loss::cross_entropy` elsewhere.

use super::train_ops;
use candle_core::{DType, Result, Tensor};

/// Mean next-token negative log-likelihood of `ids [b, t]` under `logits [b, t, V]`
/// (positions 0..t-1 predict 1..t). A scalar tensor with a backward.
pub fn causal_lm_loss(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if train_ops::fused(logits) && t > 1 {
        // The fused op scores `[b, t, V]` in place: the last position's target is IGNORE, so no
        // slice of the logits (and of their gradient) is copied.
        let ignore = Tensor::full(train_ops::IGNORE, (b, 1), ids.device())?;
        let target = Tensor::cat(&[&ids.narrow(1, 1, t - 1)?.to_dtype(DType::U32)?, &ignore], 1)?;
        return train_ops::cross_entropy(logits, &target);
    }
    let pred = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?.to_dtype(DType::F32)?;
    let target = ids.narrow(1, 1, t - 1)?.reshape(b * (t - 1))?.to_dtype(DType::U32)?;
    cross_entropy(&pred, &target)
}

/// Mean negative log-likelihood of `targets [..]` under `logits [.., V]` (f32): a scalar
/// tensor with a backward.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if train_ops::fused(logits) {
        train_ops::cross_entropy(logits, targets)
    } else {
        let v = logits.dim(candle_core::D::Minus1)?;
        candle_nn::loss::cross_entropy(&logits.reshape(((), v))?, &targets.flatten_all()?.to_dtype(DType::U32)?)
    }
}
