//! Borrowing a tensor's values in place, and fresh outputs without a zero fill, for the
//! hand-written CPU kernels.

use candle_core::{CpuStorage, Storage, Tensor};
use std::mem::MaybeUninit;

/// Runs `f` on the f32 values of `t` when `t` is a contiguous f32 CPU tensor (no copy); `None`
/// otherwise, for the caller's general path.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Some(f(&v[a..b])),
        _ => None,
    }
}

/// A vector of `n` values that `fill` writes, every one of them, without zero-filling it first:
/// `vec![0; n]` of memory the allocator reuses is a memset (its zero pages are only free the
/// first time), ~7 % of a forward's body across the kernels' outputs.
pub(crate) fn filled<T: Copy>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut y: Vec<MaybeUninit<T>> = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` needs no initialisation; the length is within the capacity.
    unsafe { y.set_len(n) };
    fill(&mut y);
    // SAFETY: every caller's `fill` writes all `n` values (each says why), or panics, unwinding
    // past this; `MaybeUninit<T>` has `T`'s layout.
    let mut y = std::mem::ManuallyDrop::new(y);
    unsafe { Vec::from_raw_parts(y.as_mut_ptr() as *mut T, y.len(), y.capacity()) }
}
