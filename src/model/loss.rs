//! Next-token cross-entropy (differentiable: `candle_nn::loss::cross_entropy`).

use candle_core::{DType, Result, Tensor};

/// Mean next-token negative log-likelihood of `ids [b, t]` under `logits [b, t, V]`
/// (positions 0..t-1 predict 1..t). A scalar tensor with a backward.
pub fn causal_lm_loss(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let pred = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?.to_dtype(DType::F32)?;
    let target = ids.narrow(1, 1, t - 1)?.reshape(b * (t - 1))?.to_dtype(DType::U32)?;
    candle_nn::loss::cross_entropy(&pred, &target)
}
