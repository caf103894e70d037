//! Causal softmax attention for f32 inference on CPU without a KV cache, one task per
//! (sequence, head) (issue #18).
//!
//! The fused path (`train_ops`) lays the keys out transposed and the key–value heads repeated
//! for every query head they serve, computes `q · kᵀ` for all `t × T` query–key pairs into a
//! zero-filled `[b, h, t, T]` tensor, a causal softmax into another, `p · v` into a third and
//! merges the heads in a fourth. Here each block of [`BLOCK`] queries computes only the keys it
//! sees (at `T = t` about five eighths of the score products), reading the keys and values of its
//! key–value head in place, softmaxes its rows in a small scratch and sums `p · v`, for
//! `T ≤ 512`, only over the keys seen (half the products).
//!
//! The values are the fused path's bit for bit (tested): the products are candle's gemm with the
//! arguments candle's matmul passes but for strides, and gemm sums each dot product as one FMA
//! chain over `k` when `k ≤ 512` whatever `m` and `n` are (longer sums it splits into blocks whose
//! bounds depend on the shape) — except for products of at most 256 values, which it computes
//! with another kernel when the right operand is column-major, as `kᵀ` read in place is: the
//! kernel serves `t > 16` only, where no block is that small. So `q · kᵀ` (`k = d`) may skip
//! keys, and `p · v` (`k` = keys) may stop at the block's last seen key while `T ≤ 512`: the terms
//! left out are `0 · v`, which add `+0`. Beyond, `p · v` runs per head with candle's own
//! `(t, d, T)`. The softmax is the fused path's row function
//! ([`train_ops::causal_softmax_row`]).

use super::cpu_values::{filled, gemm_as_candle};
use super::train_ops::{self, causal_softmax_row, softmax_row_zeros};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Queries per block.
const BLOCK: usize = 64;

/// The longest sum gemm computes as one chain whatever the shape (`gemm-common`: `kc` is
/// `min(k, 512)` for small products and at least 512 otherwise).
const ONE_CHAIN: usize = 512;

/// Fewest queries served: with more, every score product exceeds 256 values (see above).
const MIN_QUERIES: usize = 17;

/// Whether [`causal_attention`] serves `t` queries of heads of size `d`: `q · kᵀ` must be one
/// chain of the packed kernel, and every product more than 256 values.
pub fn applies(t: usize, d: usize) -> bool {
    t >= MIN_QUERIES && (3..=ONE_CHAIN).contains(&d)
}

/// `softmax(q · kᵀ · scale + causal mask) · v` for queries at `offset..offset + t`, merged:
/// `q [b, h, t, d]`, `k`, `v [b, kv, T, d]` (f32 CPU, contiguous; query head `i` reads key–value
/// head `i / (h / kv)`) → `[b, t, h·d]`. Not differentiable (inference only).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, offset: usize) -> Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &CausalAttention { scale, offset })
}

struct CausalAttention {
    scale: f32,
    offset: usize,
}

/// Query blocks `[start, end)`: [`BLOCK`] rows each, a short remainder joined to the block before
/// (so that no product has a single row: gemm takes another path there).
fn blocks(t: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = (0..t).step_by(BLOCK).map(|s| (s, (s + BLOCK).min(t))).collect();
    if out.len() > 1 && out[out.len() - 1].1 - out[out.len() - 1].0 < 8 {
        let (_, end) = out.pop().expect("two blocks");
        out.last_mut().expect("one block").1 = end;
    }
    out
}

/// `dst = lhs · rhs` for row-major `lhs [m, k]` (row stride `lhs_rs`), `rhs [k, n]` with strides
/// `(rhs_rs, rhs_cs)` and row-major `dst [m, n]` (row stride `dst_rs`), with the other arguments
/// candle's matmul gives gemm, on this thread.
///
/// # Safety
/// The three matrices must lie within their buffers with these strides.
unsafe fn gemm_rows(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    rhs_strides: (usize, usize),
) {
    gemm_as_candle((m, n, k), dst, dst_rs, lhs, (lhs_rs, 1), rhs, rhs_strides, gemm::Parallelism::None)
}

/// The merged output's buffer, shared by the per-head tasks, which write disjoint values.
struct MergedOut(*mut f32);

// SAFETY: the tasks write disjoint values of one buffer that outlives them (`head`'s contract).
unsafe impl Sync for MergedOut {}

impl MergedOut {
    /// The value `i` values into the buffer (a method, so that closures capture the `Sync`
    /// wrapper rather than its raw field).
    ///
    /// # Safety
    /// `i` must lie within the buffer.
    unsafe fn at(&self, i: usize) -> *mut f32 {
        unsafe { self.0.add(i) }
    }
}

impl CausalAttention {
    /// One head: `q [t, d]`, `k`, `v [T, d]` → `out [t, d]` (rows `out_rs` apart, every value
    /// written).
    ///
    /// # Safety
    /// `out` must be valid for writing `t` rows of `d` values, `out_rs ≥ d` apart.
    unsafe fn head(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (t, d, total): (usize, usize, usize),
        out: *mut f32,
        out_rs: usize,
    ) {
        let blocks = blocks(t);
        // p · v stops at each block's last seen key while that is one chain (module doc).
        let truncate = total <= ONE_CHAIN;
        // Scores of one block, or, when p · v runs per head, of the whole head.
        let rows_kept = if truncate { blocks.iter().map(|(s, e)| e - s).max().unwrap_or(0) } else { t };
        let mut scores = vec![0f32; rows_kept * total];
        for &(start, end) in &blocks {
            let rows = end - start;
            let seen_by_last = self.offset + end; // keys the block's last query sees
            let first = if truncate { 0 } else { start };
            let s = &mut scores[first * total..(first + rows) * total];
            // SAFETY: q rows start..end (stride d), kᵀ = k rows 0..seen_by_last read transposed
            // (k's row stride d), scores rows × seen_by_last (stride total): all in bounds.
            unsafe {
                gemm_rows(
                    (rows, seen_by_last, d),
                    s.as_mut_ptr(),
                    total,
                    q[start * d..].as_ptr(),
                    d,
                    k.as_ptr(),
                    (1, d),
                )
            };
            for (i, row) in s.chunks_mut(total).enumerate() {
                let seen = self.offset + start + i + 1;
                // Keys up to the block's last seen one (or all, for a per-head p · v) and up to
                // the softmax's summation bound hold zeros past the seen ones.
                softmax_row_zeros(row, seen, if truncate { seen_by_last } else { total });
                causal_softmax_row(row, seen, self.scale);
            }
            if truncate {
                // SAFETY: scores rows × seen_by_last (stride total), v seen_by_last × d, out rows
                // start..end (stride out_rs; out holds t such rows): in bounds.
                unsafe {
                    gemm_rows(
                        (rows, d, seen_by_last),
                        out.add(start * out_rs),
                        out_rs,
                        s.as_ptr(),
                        total,
                        v.as_ptr(),
                        (d, 1),
                    )
                };
            }
        }
        if !truncate {
            // SAFETY: scores t × total, v total × d (row-major), out t rows (stride out_rs): in
            // bounds.
            unsafe { gemm_rows((t, d, total), out, out_rs, scores.as_ptr(), total, v.as_ptr(), (d, 1)) };
        }
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention-infer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            train_ops::slice(s1, l1, "attention")?,
            train_ops::slice(s2, l2, "attention")?,
            train_ops::slice(s3, l3, "attention")?,
        );
        let (b, h, t, d) = l1.shape().dims4()?;
        let (kb, kv, total, kd) = l2.shape().dims4()?;
        if (kb, kd) != (b, d)
            || kv == 0
            || h % kv != 0
            || l3.dims() != l2.dims()
            || !applies(t, d)
            || total < self.offset + t
        {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} at offset {} (need [b, h, t, d], [b, kv, T, d] twice, kv dividing h, T ≥ offset + t, t ≥ {MIN_QUERIES}, 3 ≤ d ≤ {ONE_CHAIN})",
                l1.dims(),
                l2.dims(),
                l3.dims(),
                self.offset
            );
        }
        let rep = h / kv;
        // Each head writes its rows straight into the merged layout: head `hi` of sequence `bi`,
        // position p, at [bi, p, hi·d ..], rows h·d apart.
        let merged = filled(b * t * h * d, |merged| {
            let out = MergedOut(merged.as_mut_ptr() as *mut f32);
            (0..b * h).into_par_iter().for_each(|bh| {
                let kvh = bh / h * kv + bh % h / rep; // this query head's key–value head
                let (q, k, v) =
                    (&q[bh * t * d..][..t * d], &k[kvh * total * d..][..total * d], &v[kvh * total * d..][..total * d]);
                let first = (bh / h) * t * h * d + (bh % h) * d;
                // SAFETY: the t rows of d values from `first`, h·d apart, lie in the b·t·h·d
                // buffer, and no two heads share a value; every value is written (the blocks
                // cover rows 0..t, each product all d columns), once the tasks are done.
                unsafe { self.head(q, k, v, (t, d, total), out.at(first), h * d) }
            })
        });
        Ok((CpuStorage::F32(merged), Shape::from((b, t, h * d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The fused path's attention: heads repeated, keys transposed, scores, causal softmax,
    /// `p · v`, merge.
    fn fused(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, offset: usize) -> Result<Tensor> {
        let rep = q.dim(1)? / k.dim(1)?;
        let repeat = |x: &Tensor| -> Result<Tensor> {
            let (b, kv, n, d) = x.dims4()?;
            x.unsqueeze(2)?.expand((b, kv, rep, n, d))?.reshape((b, kv * rep, n, d))?.contiguous()
        };
        let kt = repeat(k)?.transpose(2, 3)?.contiguous()?;
        let att = train_ops::causal_softmax(&q.matmul(&kt)?, scale, offset)?;
        train_ops::merge_heads(&att.matmul(&repeat(v)?)?)
    }

    fn bits(x: &Tensor) -> Result<Vec<u32>> {
        Ok(x.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
    }

    /// Bit for bit the fused path on shapes around the block size and the smallest served,
    /// grouped-query heads, long sums (where `p · v` runs per head) and cached-prefix offsets.
    #[test]
    fn equals_the_fused_path_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        // (b, h, kv, t, d, offset)
        let shapes = [
            (1, 2, 2, 17, 8, 0),
            (1, 1, 1, 17, 3, 9),
            (2, 3, 1, 20, 16, 0),
            (1, 4, 2, 64, 64, 0),
            (1, 1, 1, 65, 32, 0),
            (2, 2, 1, 71, 64, 0),
            (1, 2, 2, 72, 24, 3),
            (1, 4, 2, 130, 64, 5),
            (1, 1, 1, 300, 128, 0),
            (1, 1, 1, 512, 16, 0),
            (1, 2, 1, 520, 64, 0),
            (1, 1, 1, 100, 64, 450),
        ];
        for (b, h, kv, t, d, offset) in shapes {
            assert!(applies(t, d));
            let total = offset + t;
            let q = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (b, kv, total, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, kv, total, d), &dev)?;
            let scale = (d as f32).powf(-0.5);
            let ours = causal_attention(&q, &k, &v, scale, offset)?;
            let want = fused(&q, &k, &v, scale, offset)?;
            assert_eq!(ours.dims(), want.dims());
            let (a, w) = (bits(&ours)?, bits(&want)?);
            let differ = a.iter().zip(&w).filter(|(a, w)| a != w).count();
            assert_eq!(
                differ,
                0,
                "{differ} of {} values differ at (b, h, kv, t, d, offset) = {:?}",
                a.len(),
                (b, h, kv, t, d, offset)
            );
        }
        Ok(())
    }

    #[test]
    fn blocks_cover_the_queries_without_single_rows() {
        for t in [1, 2, 7, 63, 64, 65, 71, 72, 128, 129, 300] {
            let b = blocks(t);
            assert_eq!(b.first().map(|x| x.0), Some(0));
            assert_eq!(b.last().map(|x| x.1), Some(t));
            assert!(b.windows(2).all(|w| w[0].1 == w[1].0), "{t}: {b:?}");
            assert!(b.len() == 1 || b.iter().all(|(s, e)| e - s >= 8), "{t}: {b:?}");
        }
    }

    #[test]
    fn serves_only_shapes_it_computes_exactly() {
        assert!(!applies(16, 64) && applies(17, 64));
        assert!(!applies(100, 2) && !applies(100, 513) && applies(100, 512));
    }

    #[test]
    fn refuses_mismatched_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let zeros = |s: (usize, usize, usize, usize)| Tensor::zeros(s, DType::F32, &dev);
        let q = zeros((1, 2, 20, 8))?;
        let few = zeros((1, 2, 19, 8))?; // fewer keys than queries
        let err = causal_attention(&q, &few, &few, 1.0, 0).unwrap_err().to_string();
        assert!(err.contains("T ≥ offset + t"), "{err}");
        let odd = zeros((1, 3, 20, 8))?; // 3 key–value heads for 2 query heads
        assert!(causal_attention(&q, &odd, &odd, 1.0, 0).is_err());
        Ok(())
    }
}
