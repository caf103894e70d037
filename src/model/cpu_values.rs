//! Borrowing a tensor's values in place, for the hand-written CPU kernels.

use candle_core::{CpuStorage, Storage, Tensor};

/// Runs `f` on the f32 values of `t` when `t` is a contiguous f32 CPU tensor (no copy); `None`
/// otherwise, for the caller's general path.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Some(f(&v[a..b])),
        _ => None,
    }
}
