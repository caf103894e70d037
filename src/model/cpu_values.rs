//! Borrowing a tensor's values in place (to read, or to update), and fresh outputs without a
//! zero fill, for the hand-written CPU kernels.

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor};
use std::cell::Cell;
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

/// Runs `f` on the f32 values of `t` to update them in place, when `t` is a contiguous f32 CPU
/// tensor (`Ok(None)` otherwise, for the caller's general path). Every tensor that shares `t`'s
/// storage sees the change, as with `Var::set`. `f` must not touch `t`'s storage through another
/// tensor (its lock is held: that would deadlock); [`same_storage`] tells.
pub(crate) fn with_f32_mut<R>(t: &Tensor, f: impl FnOnce(&mut [f32]) -> R) -> candle_core::Result<Option<R>> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 || !t.is_contiguous() {
        return Ok(None);
    }
    let op = InPlace { f: Cell::new(Some(f)), out: Cell::new(None) };
    t.inplace_op1(&op)?;
    Ok(op.out.into_inner())
}

/// The in-place op behind [`with_f32_mut`]: candle hands it the storage under its write lock.
struct InPlace<F, R> {
    f: Cell<Option<F>>,
    out: Cell<Option<R>>,
}

impl<F: FnOnce(&mut [f32]) -> R, R> InplaceOp1 for InPlace<F, R> {
    fn name(&self) -> &'static str {
        "f32-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        if let (CpuStorage::F32(v), Some((a, b))) = (storage, layout.contiguous_offsets()) {
            if let Some(f) = self.f.take() {
                self.out.set(Some(f(&mut v[a..b])));
            }
        }
        Ok(())
    }
}

/// Whether two tensors share one storage (a view, a clone, a `Var` and its tensor).
pub(crate) fn same_storage(a: &Tensor, b: &Tensor) -> bool {
    let (sa, _) = a.storage_and_layout();
    let pa: *const Storage = &*sa;
    drop(sa);
    let (sb, _) = b.storage_and_layout();
    std::ptr::eq(pa, &*sb)
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

/// `lhs · rhs` for 2-D f32 CPU tensors of any strides: candle's matmul — the same `gemm` call,
/// so the same bits — without zero-filling the output first. Other inputs go to candle's.
pub(crate) fn matmul(lhs: &Tensor, rhs: &Tensor) -> candle_core::Result<Tensor> {
    let (Ok((m, k)), Ok((k2, n))) = (lhs.dims2(), rhs.dims2()) else { return lhs.matmul(rhs) };
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if k != k2 || m == 0 || n == 0 || k == 0 || !cpu_f32(lhs) || !cpu_f32(rhs) {
        return lhs.matmul(rhs);
    }
    let (ls, ll) = lhs.storage_and_layout();
    let (rs, rl) = rhs.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(a)), Storage::Cpu(CpuStorage::F32(b))) = (&*ls, &*rs) else {
        unreachable!("checked: f32 CPU tensors")
    };
    // The last element each operand reads lies in its buffer (strides from the layouts).
    let last = |l: &Layout, rows: usize, cols: usize| {
        l.start_offset() + (rows - 1) * l.stride()[0] + (cols - 1) * l.stride()[1]
    };
    if last(ll, m, k) >= a.len() || last(rl, k, n) >= b.len() {
        candle_core::bail!("matmul: operand layouts outside their storage");
    }
    // Every value written: gemm with `read_dst = false` and k ≥ 1 sets each of the m × n outputs.
    let out = filled::<f32>(m * n, |dst| {
        // SAFETY: dst is m × n row-major; the operands' last elements are in bounds (above).
        unsafe {
            gemm_as_candle(
                (m, n, k),
                dst.as_mut_ptr() as *mut f32,
                n,
                a[ll.start_offset()..].as_ptr(),
                (ll.stride()[0], ll.stride()[1]),
                b[rl.start_offset()..].as_ptr(),
                (rl.stride()[0], rl.stride()[1]),
                candle_parallelism(),
            )
        }
    });
    drop((ls, rs));
    Tensor::from_vec(out, (m, n), lhs.device())
}

/// The thread setting candle's CPU matmul gives gemm (`CANDLE_NUM_THREADS`).
pub(crate) fn candle_parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        threads if threads > 1 => gemm::Parallelism::Rayon(threads),
        _ => gemm::Parallelism::None,
    }
}

/// `dst = lhs · rhs` into a row-major `dst [m, n]` (row stride `dst_rs`) for `lhs [m, k]` and
/// `rhs [k, n]` with (row, column) strides, with the other arguments candle's CPU matmul gives
/// gemm (`read_dst = false`, α = 0, β = 1), so the products are candle's bit for bit.
///
/// # Safety
/// The three matrices must lie within their buffers with these strides; `dst` must be valid for
/// writes (it is not read).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_as_candle(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        0f32,
        1f32,
        false,
        false,
        false,
        parallelism,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn normal(shape: (usize, usize), seed: u64) -> Tensor {
        let mut rng = crate::rng::SplitMix64::new(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
    }

    /// The same bits as candle's matmul for plain, transposed and offset operands, with inner
    /// sizes below and above gemm's 512-term chains.
    #[test]
    fn matmul_equals_candles_bit_for_bit() {
        for (m, k, n) in [(1, 1, 1), (7, 5, 3), (64, 513, 33), (130, 1100, 17), (3, 2000, 200)] {
            let a = normal((m, k), 1);
            let b = normal((k, n), 2);
            let at = normal((k, m), 3).t().unwrap(); // strided lhs
            let bt = normal((n, k), 4).t().unwrap(); // strided rhs
            let wide = normal((m + 2, k + 3), 5);
            let view = wide.narrow(0, 2, m).unwrap().narrow(1, 3, k).unwrap(); // offset, row stride k + 3
            for (l, r) in [(&a, &b), (&at, &b), (&a, &bt), (&at, &bt), (&view, &b)] {
                let want = l.matmul(r).unwrap();
                let got = matmul(l, r).unwrap();
                assert_eq!(got.dims(), want.dims());
                assert_eq!(bits(&got), bits(&want), "{m}×{k}×{n}, strides {:?} · {:?}", l.stride(), r.stride());
            }
        }
    }

    /// An in-place update changes the tensor and every clone of it, and declines other dtypes.
    #[test]
    fn in_place_updates_shared_storage() {
        let t = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let clone = t.clone();
        let done = with_f32_mut(&t, |v| v.iter_mut().for_each(|x| *x *= 2.0)).unwrap();
        assert_eq!(done, Some(()));
        assert_eq!(clone.to_vec1::<f32>().unwrap(), [2.0, 4.0, 6.0]);
        assert!(same_storage(&t, &clone) && !same_storage(&t, &t.copy().unwrap()));
        let bf = t.to_dtype(DType::BF16).unwrap();
        assert_eq!(with_f32_mut(&bf, |_| ()).unwrap(), None);
        let strided = normal((3, 4), 1).t().unwrap();
        assert_eq!(with_f32_mut(&strided, |_| ()).unwrap(), None);
    }
}
