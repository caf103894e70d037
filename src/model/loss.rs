//! Next-token cross-entropy: the fused CPU ops (`train_ops::cross_entropy`,
//! `train_ops::head_cross_entropy`) for f32 on CPU, `candle_nn::loss::cross_entropy` elsewhere.

use super::train_ops::{self, IGNORE};
use candle_core::{DType, Device, Result, Tensor, D};

/// Mean next-token negative log-likelihood of `ids [b, t]` under `logits [b, t, V]`
/// (positions 0..t-1 predict 1..t). A scalar tensor with a backward.
pub fn causal_lm_loss(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    cross_entropy(logits, &next_token_targets(ids)?)
}

/// The targets of next-token prediction for `ids [b, t]`: `ids[:, 1:]` followed by [`IGNORE`]
/// (the last position predicts nothing), `[b, t]` u32.
pub fn next_token_targets(ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let ignore = Tensor::full(IGNORE, (b, 1), ids.device())?;
    if t < 2 {
        return Ok(ignore);
    }
    Tensor::cat(&[&ids.narrow(1, 1, t - 1)?.to_dtype(DType::U32)?, &ignore], 1)
}

/// Mean negative log-likelihood of `targets [..]` ([`IGNORE`] skips a position) under
/// `logits [.., V]` (f32): a scalar tensor with a backward.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if train_ops::fused(logits) {
        return train_ops::cross_entropy(logits, targets);
    }
    let v = logits.dim(D::Minus1)?;
    let (logits, targets) = (logits.reshape(((), v))?, targets.flatten_all()?.to_dtype(DType::U32)?);
    let all = targets.to_vec1::<u32>()?;
    if !all.contains(&IGNORE) {
        return candle_nn::loss::cross_entropy(&logits, &targets);
    }
    let keep: Vec<u32> = (0..all.len() as u32).filter(|&i| all[i as usize] != IGNORE).collect();
    if keep.is_empty() {
        candle_core::bail!("cross-entropy: no position to score");
    }
    let keep = Tensor::new(keep, &Device::Cpu)?.to_device(logits.device())?;
    candle_nn::loss::cross_entropy(&logits.index_select(&keep, 0)?, &targets.index_select(&keep, 0)?)
}
