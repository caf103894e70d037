//! Fused training ops for f32 on CPU, each with a hand-written backward (issue #18).
//!
//! candle's autograd runs every composed op as its own pass and, for every gradient it
//! accumulates, allocates a zero tensor and adds into it; a BitNet layer built from ~100 small
//! ops spent more time there than in its matrix products. These ops do one pass forward and one
//! or two backward:
//!
//! - [`rms_norm`], [`causal_softmax`] and [`rope`] compute their forward with the same arithmetic
//!   as candle's inference kernels (`candle_nn::ops::rms_norm`, `softmax_last_dim` after the scale
//!   and the causal mask, `rotary_emb::rope`), so the training forward equals the inference
//!   forward bit for bit;
//! - [`act_quant_ste`] and [`weight_quant_ste`] are the quantisers under the straight-through
//!   estimator (value quantised, gradient passed unchanged), with the quantisers' exact
//!   arithmetic (`quant.rs`);
//! - [`relu2_mul`] is BitNet's `relu(g)² ⊙ u`; [`cross_entropy`] the mean next-token NLL.
//!
//! Reductions over rows (the gains' gradients) run in fixed chunks summed in order, so results do
//! not depend on the thread count. Other devices and dtypes use the composed candle ops
//! ([`fused`] says which).

use super::cpu_values::{candle_parallelism, filled, gemm_as_candle, matmul};
use super::expf::exp_minus;
use super::quant::{act_code, act_scale, rne};
use super::simd::wide;
use super::ternary_kernel::{self as kernel, PackedTernary, QuantRows};
use candle_core::cpu::kernels::VecOps;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::Mutex;

thread_local! {
    static ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Whether the fused ops serve `x`: f32 on CPU (unless [`composed`] turned them off).
pub fn fused(x: &Tensor) -> bool {
    ENABLED.with(|e| e.get()) && x.device().is_cpu() && x.dtype() == DType::F32
}

/// Runs `f` with the composed candle ops in place of the fused ones on this thread: the
/// reference the tests and the benchmark compare the fused ops with.
pub fn composed<R>(f: impl FnOnce() -> R) -> R {
    let was = ENABLED.with(|e| e.replace(false));
    let out = f();
    ENABLED.with(|e| e.set(was));
    out
}

/// The contiguous f32 slice of a storage (the ops require contiguous f32 inputs).
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{what}: f32 only") };
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{what}: input must be contiguous") };
    Ok(&v[a..b])
}

/// Rows per task of the row-reductions: fixed, so sums do not depend on the thread count.
const ROW_CHUNK: usize = 64;

/// Column sums `Σ_rows f(row)` of `rows` rows of length `n`, in fixed chunks summed in order.
fn column_sums(rows: usize, n: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let parts: Vec<Vec<f32>> = (0..rows.div_ceil(ROW_CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0f32; n];
            for r in c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(rows) {
                f(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut out = vec![0f32; n];
    for p in parts {
        out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// `y = x / sqrt(mean(x²) + eps) · w` over the last dimension (f32 CPU, differentiable in x and w).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f32,
}

/// The RMSNorm forward without a graph node: what f32 CPU inference runs (the same bits as
/// candle's `rms_norm`, tested).
pub fn rms_norm_infer(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &RmsNorm { eps })
}

/// `sqrt(mean(x²) + eps)` of one row, summed as candle's kernel does (sequentially in f32).
fn rms(row: &[f32], eps: f32) -> f32 {
    let sum2 = row.iter().map(|v| v * v).sum::<f32>();
    (sum2 / row.len() as f32 + eps).sqrt()
}

/// Rows whose sums of squares run side by side in [`rms_rows`].
const NORM_ROWS: usize = 8;

/// [`rms`] of up to [`NORM_ROWS`] rows of length `n` (`x` holds them back to back) into `out`.
/// A row's sum is one chain of dependent adds (4 cycles each); eight rows' chains interleaved keep
/// the adders busy, and each row is still summed in its own order, so the bits are [`rms`]'s.
fn rms_rows(x: &[f32], n: usize, eps: f32, out: &mut [f32; NORM_ROWS]) {
    if x.len() < NORM_ROWS * n {
        for (o, row) in out.iter_mut().zip(x.chunks_exact(n)) {
            *o = rms(row, eps);
        }
        return;
    }
    let rows: [&[f32]; NORM_ROWS] = std::array::from_fn(|r| &x[r * n..(r + 1) * n]);
    let acc = match () {
        // SAFETY: AVX2 detected; the rows are n long.
        #[cfg(target_arch = "x86_64")]
        _ if super::simd::has_avx2() => unsafe { squares_avx2(rows, n) },
        _ => squares(rows, 0, [0f32; NORM_ROWS]),
    };
    for (o, a) in out.iter_mut().zip(acc) {
        *o = (a / n as f32 + eps).sqrt();
    }
}

/// Continues the eight rows' sums of squares `acc` from element `from` on, each row in order.
fn squares(rows: [&[f32]; NORM_ROWS], from: usize, mut acc: [f32; NORM_ROWS]) -> [f32; NORM_ROWS] {
    for i in from..rows[0].len() {
        for (a, row) in acc.iter_mut().zip(&rows) {
            *a += row[i] * row[i];
        }
    }
    acc
}

/// [`squares`] of eight rows with one vector holding the eight sums: eight elements of each
/// row loaded, transposed (vector `c` then holds element `i + c` of every row) and added in
/// element order, so each lane sums its row in the scalar order (the same bits) — one add per
/// eight rows instead of a scalar load, multiply and add per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn squares_avx2(rows: [&[f32]; NORM_ROWS], n: usize) -> [f32; NORM_ROWS] {
    use std::arch::x86_64::*;
    const _: () = assert!(NORM_ROWS == 8);
    assert!(rows.iter().all(|r| r.len() == n));
    let mut acc = _mm256_setzero_ps();
    let n8 = n / 8 * 8;
    for i in (0..n8).step_by(8) {
        // SAFETY: i + 8 ≤ n = each row's length.
        let r: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(rows[j].as_ptr().add(i)));
        // Pairs, then quads of rows per element, then the 128-bit halves: columns 0–7.
        let lo = |a, b| _mm256_unpacklo_ps(a, b);
        let hi = |a, b| _mm256_unpackhi_ps(a, b);
        let t = [lo(r[0], r[1]), hi(r[0], r[1]), lo(r[2], r[3]), hi(r[2], r[3])];
        let u = [lo(r[4], r[5]), hi(r[4], r[5]), lo(r[6], r[7]), hi(r[6], r[7])];
        let q = |a: &[__m256; 4]| {
            [
                _mm256_shuffle_ps::<0x44>(a[0], a[2]),
                _mm256_shuffle_ps::<0xEE>(a[0], a[2]),
                _mm256_shuffle_ps::<0x44>(a[1], a[3]),
                _mm256_shuffle_ps::<0xEE>(a[1], a[3]),
            ]
        };
        let (s, v) = (q(&t), q(&u));
        let cols = [
            _mm256_permute2f128_ps::<0x20>(s[0], v[0]),
            _mm256_permute2f128_ps::<0x20>(s[1], v[1]),
            _mm256_permute2f128_ps::<0x20>(s[2], v[2]),
            _mm256_permute2f128_ps::<0x20>(s[3], v[3]),
            _mm256_permute2f128_ps::<0x31>(s[0], v[0]),
            _mm256_permute2f128_ps::<0x31>(s[1], v[1]),
            _mm256_permute2f128_ps::<0x31>(s[2], v[2]),
            _mm256_permute2f128_ps::<0x31>(s[3], v[3]),
        ];
        for c in cols {
            acc = _mm256_add_ps(acc, _mm256_mul_ps(c, c));
        }
    }
    let mut sums = [0f32; NORM_ROWS];
    _mm256_storeu_ps(sums.as_mut_ptr(), acc);
    squares(rows, n8, sums)
}

/// RMSNorm of whole rows `x` (each `w.len()` long) into `out`, every value written: [`rms_rows`]
/// eight rows at a time, then `x / rms · w` — candle's fused kernel's bits.
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    let n = w.len();
    assert!(n > 0 && x.len().is_multiple_of(n) && out.len() == x.len(), "rms-norm rows");
    for (d, s) in out.chunks_mut(NORM_ROWS * n).zip(x.chunks(NORM_ROWS * n)) {
        let mut m = [0f32; NORM_ROWS];
        rms_rows(s, n, eps, &mut m);
        for ((d, s), m) in d.chunks_exact_mut(n).zip(s.chunks_exact(n)).zip(m) {
            wide(move || {
                for ((d, s), a) in d.iter_mut().zip(s).zip(w) {
                    d.write(*s / m * *a);
                }
            });
        }
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-train"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1, "rms-norm")?, slice(s2, l2, "rms-norm")?);
        let n = w.len();
        if n == 0 {
            return Ok((CpuStorage::F32(vec![]), l1.shape().clone()));
        }
        if !x.len().is_multiple_of(n) {
            candle_core::bail!("rms-norm: {} values are not rows of {n}", x.len());
        }
        // Every value written: whole rows, each element of each.
        let out = filled(x.len(), |out| {
            out.par_chunks_mut(NORM_ROWS * n)
                .zip(x.par_chunks(NORM_ROWS * n))
                .for_each(|(d, s)| rms_norm_rows(s, w, self.eps, d))
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &dy, &RmsNormBwdX { eps: self.eps })?;
        let dw = x.apply_op2_no_bwd(&dy, &RmsNormBwdW { eps: self.eps })?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `dx = (w ⊙ dy) / m − x · Σ(w ⊙ dy ⊙ x) / (n · m³)` per row.
struct RmsNormBwdX {
    eps: f32,
}

impl CustomOp3 for RmsNormBwdX {
    fn name(&self) -> &'static str {
        "rms-norm-train-bwd-x"
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
        let (x, w, dy) = (slice(s1, l1, "rms-norm")?, slice(s2, l2, "rms-norm")?, slice(s3, l3, "rms-norm")?);
        let n = w.len();
        if dy.len() != x.len() {
            candle_core::bail!("rms-norm: a gradient of {} values for {} inputs", dy.len(), x.len());
        }
        // Every value written: rows of n cover the output.
        let out = filled(x.len(), |out| {
            out.par_chunks_mut(n).zip(x.par_chunks(n).zip(dy.par_chunks(n))).for_each(|(d, (x, dy))| {
                let m = rms(x, self.eps);
                let dot: f32 = x.iter().zip(dy).zip(w).map(|((x, g), w)| x * g * w).sum();
                let c = dot / (n as f32 * m * m * m);
                for (((d, x), g), w) in d.iter_mut().zip(x).zip(dy).zip(w) {
                    d.write(g * w / m - x * c);
                }
            })
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `dw = Σ_rows dy ⊙ x / m`.
struct RmsNormBwdW {
    eps: f32,
}

impl CustomOp2 for RmsNormBwdW {
    fn name(&self) -> &'static str {
        "rms-norm-train-bwd-w"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (slice(s1, l1, "rms-norm")?, slice(s2, l2, "rms-norm")?);
        let n = *l1.dims().last().unwrap_or(&1);
        let rows = x.len() / n.max(1);
        let dw = column_sums(rows, n, |r, acc| {
            let (x, dy) = (&x[r * n..(r + 1) * n], &dy[r * n..(r + 1) * n]);
            let m = rms(x, self.eps);
            acc.iter_mut().zip(x).zip(dy).for_each(|((a, x), g)| *a += g * x / m);
        });
        Ok((CpuStorage::F32(dw), Shape::from(n)))
    }
}

// ---------------------------------------------------------------------------------------------
// Causal softmax

/// `softmax(s · scale + mask)` over the last dimension of attention scores `[.., t, T]`, the mask
/// hiding key `j > offset + i` from query `i` (f32 CPU, differentiable in `s`).
pub fn causal_softmax(s: &Tensor, scale: f32, offset: usize) -> Result<Tensor> {
    s.contiguous()?.apply_op1(CausalSoftmax { scale, offset })
}

/// Values candle's f32 `vec_reduce_sum` adds per step (8-wide lanes, 4 of them) on every SIMD
/// target it has; the scalar fallback adds one at a time, which any multiple of 1 matches.
const SUM_STEP: usize = 32;

/// One query's causal softmax in place: `row[..seen]` holds its scores for the keys it sees,
/// `row[seen..]` up to [`softmax_row_zeros`]' bound zeros; the rest is not read. The inference
/// path's `(s · scale + 0) + mask`, then candle's softmax_last_dim — with the masked keys
/// (`exp(−∞) = 0`) skipped, in the same bits: `max` ignores −∞, and candle's sum adds 32 values
/// per step in 8-wide lanes, so stopping after the step that holds the last seen key leaves out
/// only additions of +0.
pub(crate) fn causal_softmax_row(row: &mut [f32], seen: usize, scale: f32) {
    let seen = seen.min(row.len());
    wide(|| row[..seen].iter_mut().for_each(|v| *v = *v * scale + 0.0));
    let mut max = f32::NEG_INFINITY;
    // SAFETY: both reductions read within `row` (`seen` ≤ its length, the sum bound too).
    unsafe { f32::vec_reduce_max(row.as_ptr(), &mut max, seen) };
    exp_minus(&mut row[..seen], max);
    let mut sum = 0f32;
    unsafe { f32::vec_reduce_sum(row.as_ptr(), &mut sum, sum_bound(seen, row.len())) };
    wide(|| row[..seen].iter_mut().for_each(|v| *v /= sum));
}

/// Where [`causal_softmax_row`]'s sum stops for `seen` of `total` keys.
fn sum_bound(seen: usize, total: usize) -> usize {
    seen.next_multiple_of(SUM_STEP).min(total)
}

/// Zeros `row[seen..]` up to `clear` and up to [`causal_softmax_row`]'s summation bound (the
/// precondition of a row whose masked keys hold something else).
pub(crate) fn softmax_row_zeros(row: &mut [f32], seen: usize, clear: usize) {
    let end = clear.max(sum_bound(seen, row.len())).min(row.len());
    if seen < end {
        row[seen..end].fill(0.0);
    }
}

struct CausalSoftmax {
    scale: f32,
    offset: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = slice(s, l, "causal-softmax")?;
        let dims = l.dims();
        let (t, total) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(total).zip(src.par_chunks(total)).enumerate().for_each(|(r, (d, s))| {
            let seen = (self.offset + r % t + 1).min(total); // keys this query sees
            d[..seen].copy_from_slice(&s[..seen]);
            causal_softmax_row(d, seen, self.scale);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxBwd { scale: self.scale })?))
    }
}

/// `ds = scale · y ⊙ (dy − Σ dy ⊙ y)` per row.
struct SoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "causal-softmax-train-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, dy) = (slice(s1, l1, "causal-softmax")?, slice(s2, l2, "causal-softmax")?);
        let n = *l1.dims().last().unwrap_or(&1);
        if dy.len() != y.len() {
            candle_core::bail!("causal-softmax: a gradient of {} values for {} outputs", dy.len(), y.len());
        }
        // Every value written: rows of n cover the output.
        let out = filled(y.len(), |out| {
            out.par_chunks_mut(n).zip(y.par_chunks(n).zip(dy.par_chunks(n))).for_each(|(d, (y, dy))| {
                let dot: f32 = y.iter().zip(dy).map(|(y, g)| y * g).sum();
                for ((d, y), g) in d.iter_mut().zip(y).zip(dy) {
                    d.write(self.scale * (y * (g - dot)));
                }
            })
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// Rotate-half RoPE of `x [b, h, t, d]` with tables `cos`, `sin` `[t, d/2]` (f32 CPU,
/// differentiable in `x`).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { inverse: false })
}

/// `inverse` rotates by −θ: the backward of the forward rotation.
struct Rope {
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope-train"
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
        let (x, cos, sin) = (slice(s1, l1, "rope")?, slice(s2, l2, "rope")?, slice(s3, l3, "rope")?);
        let (_, _, t, d) = l1.shape().dims4()?;
        let half = d / 2;
        if cos.len() < t * half || sin.len() < t * half {
            candle_core::bail!("rope: tables shorter than {t} positions");
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t * d).zip(x.par_chunks(t * d)).for_each(|(dst, src)| {
            for p in 0..t {
                for i in 0..half {
                    let (i1, i2, c) = (p * d + i, p * d + i + half, p * half + i);
                    let (c, s) = (cos[c], if self.inverse { -sin[c] } else { sin[c] });
                    // candle's rope kernel, term for term.
                    dst[i1] = src[i1] * c - src[i2] * s;
                    dst[i2] = src[i1] * s + src[i2] * c;
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy.contiguous()?.apply_op3_no_bwd(cos, sin, &Rope { inverse: !self.inverse })?;
        Ok((Some(dx), None, None))
    }
}

// ---------------------------------------------------------------------------------------------
// Attention heads

/// How [`split_heads`] lays out a projection's output.
#[derive(Clone, Copy)]
pub struct HeadLayout {
    /// Heads in the input (`heads · d` features).
    pub heads: usize,
    /// Each input head serves this many output heads (grouped-query attention's repeat_kv).
    pub repeat: usize,
    /// Rotate by the RoPE tables (queries and keys).
    pub rope: bool,
    /// `[b, heads·repeat, d, t]` (keys, ready for `q · kᵀ`) instead of `[b, heads·repeat, t, d]`.
    pub transposed: bool,
}

/// A projection's output `y [b, t, heads·d]` as attention heads: split, RoPE-rotated with
/// `cos`, `sin` `[t, d/2]` (rope only), repeated for grouped queries, and laid out contiguous for
/// the attention products — the inference path's reshape, transpose, rope, repeat_kv and copies
/// in one pass, the same values (f32 CPU, differentiable in `y`).
pub fn split_heads(y: &Tensor, cos: &Tensor, sin: &Tensor, layout: HeadLayout) -> Result<Tensor> {
    y.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, SplitHeads { layout, backward: false })
}

/// Forward: `y [b, t, heads·d]` → heads. Backward (`backward`): the heads' gradient →
/// `dy [b, t, heads·d]`, summed over the repeats and rotated back.
struct SplitHeads {
    layout: HeadLayout,
    backward: bool,
}

impl SplitHeads {
    /// `(b, t, d)` from the layout of the tensor in `[b, t, heads·d]` form.
    fn dims(&self, flat: &[usize]) -> Result<(usize, usize, usize)> {
        let [b, t, f] = flat else { candle_core::bail!("split-heads: expected [b, t, heads·d], got {flat:?}") };
        let h = self.layout.heads;
        if h == 0 || !f.is_multiple_of(h) || !(f / h).is_multiple_of(2) {
            candle_core::bail!("split-heads: {f} features are not {h} heads of even size");
        }
        Ok((*b, *t, f / h))
    }
}

impl CustomOp3 for SplitHeads {
    fn name(&self) -> &'static str {
        "split-heads-train"
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
        let (src, cos, sin) =
            (slice(s1, l1, "split-heads")?, slice(s2, l2, "split-heads")?, slice(s3, l3, "split-heads")?);
        let HeadLayout { heads: h, repeat: rep, rope, transposed } = self.layout;
        let rep = rep.max(1);
        // Position p, feature i of head `head` in the output's layout.
        let at = |t: usize, d: usize, p: usize, i: usize| if transposed { i * t + p } else { p * d + i };
        // The rotation of one head row (candle's rope kernel, term for term); `back` rotates by −θ.
        let rotate = |row: &[f32], p: usize, half: usize, out: &mut [f32], back: bool| {
            if !rope {
                out.copy_from_slice(row);
                return;
            }
            // Slices and zips, so that the loop vectorises (the same operations per value).
            let (x0, x1) = row.split_at(half);
            let (o0, o1) = out.split_at_mut(half);
            let (cs, sn) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
            for ((((o0, o1), &x0), &x1), (&c, &s)) in o0.iter_mut().zip(o1).zip(x0).zip(x1).zip(cs.iter().zip(sn)) {
                let s = if back { -s } else { s };
                *o0 = x0 * c - x1 * s;
                *o1 = x0 * s + x1 * c;
            }
        };
        if !self.backward {
            let (b, t, d) = self.dims(l1.dims())?;
            let half = d / 2;
            if rope && (cos.len() < t * half || sin.len() < t * half) {
                candle_core::bail!("split-heads: RoPE tables shorter than {t} positions");
            }
            // Every value written: each head's t positions × d features (`at` is a bijection).
            let out = filled(b * h * rep * t * d, |out| {
                out.par_chunks_mut(rep * t * d).enumerate().for_each(|(bh, dst)| {
                    let (bi, hi) = (bh / h, bh % h);
                    let mut row = vec![0f32; d];
                    wide(|| {
                        for p in 0..t {
                            let start = ((bi * t + p) * h + hi) * d;
                            rotate(&src[start..start + d], p, half, &mut row, false);
                            for r in 0..rep {
                                let head = &mut dst[r * t * d..(r + 1) * t * d];
                                if transposed {
                                    for (i, v) in row.iter().enumerate() {
                                        head[at(t, d, p, i)].write(*v);
                                    }
                                } else {
                                    for (o, v) in head[p * d..(p + 1) * d].iter_mut().zip(&row) {
                                        o.write(*v);
                                    }
                                }
                            }
                        }
                    })
                })
            });
            let shape = if transposed { (b, h * rep, d, t) } else { (b, h * rep, t, d) };
            return Ok((CpuStorage::F32(out), Shape::from(shape)));
        }
        // Backward: src is the heads' gradient in the forward's output layout.
        let dims = l1.dims();
        let [b, hr, x, y] = dims else { candle_core::bail!("split-heads: gradient of rank {}", dims.len()) };
        let (b, (t, d)) = (*b, if transposed { (*y, *x) } else { (*x, *y) });
        if *hr != h * rep {
            candle_core::bail!("split-heads: gradient of {hr} heads for {h} × {rep}");
        }
        let half = d / 2;
        let mut out = vec![0f32; b * t * h * d];
        out.par_chunks_mut(t * h * d).enumerate().for_each(|(bi, dst)| {
            let (mut sum, mut row) = (vec![0f32; d], vec![0f32; d]);
            for hi in 0..h {
                for p in 0..t {
                    sum.iter_mut().for_each(|v| *v = 0.0);
                    for r in 0..rep {
                        let head = &src[((bi * h + hi) * rep + r) * t * d..][..t * d];
                        sum.iter_mut().enumerate().for_each(|(i, v)| *v += head[at(t, d, p, i)]);
                    }
                    rotate(&sum, p, half, &mut row, true);
                    dst[(p * h + hi) * d..][..d].copy_from_slice(&row);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, t, h * d))))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = SplitHeads { layout: self.layout, backward: true };
        Ok((Some(dy.contiguous()?.apply_op3_no_bwd(cos, sin, &back)?), None, None))
    }
}

/// Attention output heads `o [b, heads, t, d]` back to `[b, t, heads·d]` (the inference path's
/// transpose and reshape; f32 CPU, differentiable).
pub fn merge_heads(o: &Tensor) -> Result<Tensor> {
    o.contiguous()?.apply_op1(MergeHeads { backward: false })
}

/// Forward `[b, h, t, d] → [b, t, h·d]`; backward (`backward`) the reverse, given `h`.
struct MergeHeads {
    backward: bool,
}

/// Copies `[b, h, t, d]` into `[b, t, h, d]` (`merge`) or back.
fn permute_heads(src: &[f32], (b, h, t, d): (usize, usize, usize, usize), merge: bool) -> Vec<f32> {
    assert_eq!(src.len(), b * h * t * d, "permute-heads shape");
    // Every value written: each of b × h × t rows of d.
    filled(src.len(), |out| {
        out.par_chunks_mut(h * t * d).zip(src.par_chunks(h * t * d)).for_each(|(dst, src)| {
            for hi in 0..h {
                for p in 0..t {
                    let (a, z) = ((hi * t + p) * d, (p * h + hi) * d);
                    let (from, to) = if merge { (a, z) } else { (z, a) };
                    for (o, v) in dst[to..to + d].iter_mut().zip(&src[from..from + d]) {
                        o.write(*v);
                    }
                }
            }
        })
    })
}

impl CustomOp1 for MergeHeads {
    fn name(&self) -> &'static str {
        "merge-heads-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = slice(s, l, "merge-heads")?;
        let (b, h, t, d) = l.shape().dims4()?;
        if self.backward {
            // Here the shape is [b, h, t, d] only nominally: the gradient arrives as [b, t, h·d]
            // reshaped by `bwd`.
            return Ok((CpuStorage::F32(permute_heads(src, (b, h, t, d), false)), Shape::from((b, h, t, d))));
        }
        Ok((CpuStorage::F32(permute_heads(src, (b, h, t, d), true)), Shape::from((b, t, h * d))))
    }

    fn bwd(&self, o: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        // `dy [b, t, h·d]` viewed with o's dims so the op knows (b, h, t, d).
        let dy = dy.contiguous()?.reshape(o.dims())?;
        Ok(Some(dy.apply_op1_no_bwd(&MergeHeads { backward: true })?))
    }
}

// ---------------------------------------------------------------------------------------------
// Quantisers under the straight-through estimator

/// Per-token absmax int8 fake-quant of `x` (`quant::act_fake_quant`'s value), gradient passed
/// straight through.
pub fn act_quant_ste(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ActQuantSte)
}

struct ActQuantSte;

impl CustomOp1 for ActQuantSte {
    fn name(&self) -> &'static str {
        "act-quant-ste"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "act-quant")?;
        let n = *l.dims().last().unwrap_or(&1);
        // Every value written: rows of n cover the output.
        let out = filled(x.len(), |out| {
            out.par_chunks_mut(n.max(1)).zip(x.par_chunks(n.max(1))).for_each(|(d, r)| {
                let s = act_scale(r);
                d.iter_mut().zip(r).for_each(|(d, v)| {
                    d.write(act_code(*v, s) / s);
                });
            })
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.clone()))
    }
}

/// Ternary weight fake-quant `clamp(round(W·s), −1, 1) / s` for the scale `s` of
/// `quant::weight_inv_scale` (`quant::weight_fake_quant`'s value), gradient passed straight
/// through.
pub fn weight_quant_ste(w: &Tensor, inv_scale: f32) -> Result<Tensor> {
    w.contiguous()?.apply_op1(WeightQuantSte { s: inv_scale })
}

struct WeightQuantSte {
    s: f32,
}

impl CustomOp1 for WeightQuantSte {
    fn name(&self) -> &'static str {
        "weight-quant-ste"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = slice(st, l, "weight-quant")?;
        let s = self.s;
        // Every value written: equal chunks of input and output.
        let out = filled(w.len(), |out| {
            out.par_chunks_mut(1 << 16).zip(w.par_chunks(1 << 16)).for_each(|(d, w)| {
                // quant::ternarize then `/ s`, op for op.
                d.iter_mut().zip(w).for_each(|(d, w)| {
                    d.write(rne((w * s).clamp(-2.0, 2.0)).clamp(-1.0, 1.0) / s);
                });
            })
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _w: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Ternary projection

/// A ternary projection in training, `x̂ · Ŵᵀ` for `x [.., k]` and the latent `w [out, k]`: the
/// product by the int8 × 2-bit kernel (`ternary_kernel.rs`: exact integer sums, the inference
/// forward's numbers), the backward the straight-through estimator's float products
/// `dx = dy · Ŵ`, `dW = dyᵀ · x̂` with `x̂`, `Ŵ` the fake-quantised operands.
pub fn ternary_linear(x: &Tensor, w: &Tensor, inv_scale: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, TernaryLinear { s: inv_scale })
}

struct TernaryLinear {
    s: f32,
}

impl CustomOp2 for TernaryLinear {
    fn name(&self) -> &'static str {
        "ternary-linear-train"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1, "ternary-linear")?, slice(s2, l2, "ternary-linear")?);
        let (out, k) = l2.shape().dims2()?;
        if l1.dims().last() != Some(&k) {
            candle_core::bail!("ternary-linear: input {:?} for a weight of {k} features", l1.dims());
        }
        let rows = QuantRows::new(x, x.len() / k.max(1), k);
        let packed = PackedTernary::from_latent(w, out, k, self.s).map_err(candle_core::Error::wrap)?;
        let mut shape = l1.dims().to_vec();
        *shape.last_mut().expect("checked above") = out;
        Ok((CpuStorage::F32(kernel::matmul(&rows, &packed)), Shape::from(shape)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (out, k) = w.dims2()?;
        let xq = x.apply_op1_no_bwd(&ActQuantSte)?.reshape(((), k))?;
        let wq = w.apply_op1_no_bwd(&WeightQuantSte { s: self.s })?;
        let dy = dy.reshape(((), out))?;
        Ok((Some(matmul(&dy, &wq)?.reshape(x.dims())?), Some(matmul(&dy.t()?, &xq)?)))
    }
}

// ---------------------------------------------------------------------------------------------
// relu² gate

/// BitNet's gated activation `relu(g)² ⊙ u` (f32 CPU, differentiable in both).
pub fn relu2_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op2(&u.contiguous()?, Relu2Mul)
}

struct Relu2Mul;

/// `relu(g)² · u`, as [`relu2_mul`] computes each value.
#[inline]
pub(crate) fn relu2_times(g: f32, u: f32) -> f32 {
    let r = g.max(0.0);
    r * r * u
}

fn pairs<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
    what: &str,
) -> Result<(&'a [f32], &'a [f32])> {
    let (a, b) = (slice(s1, l1, what)?, slice(s2, l2, what)?);
    if a.len() != b.len() {
        candle_core::bail!("{what}: operands of different sizes");
    }
    Ok((a, b))
}

const ELEM_CHUNK: usize = 1 << 14;

impl CustomOp2 for Relu2Mul {
    fn name(&self) -> &'static str {
        "relu2-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = pairs(s1, l1, s2, l2, "relu2-mul")?;
        // Every value written (`pairs` checked that g and u have the same length).
        let out = filled(g.len(), |out| {
            out.par_chunks_mut(ELEM_CHUNK).zip(g.par_chunks(ELEM_CHUNK).zip(u.par_chunks(ELEM_CHUNK))).for_each(
                |(d, (g, u))| {
                    for ((d, g), u) in d.iter_mut().zip(g).zip(u) {
                        d.write(relu2_times(*g, *u));
                    }
                },
            )
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dg = g.apply_op3_no_bwd(u, &dy, &Relu2MulBwd { wrt_gate: true })?;
        let du = g.apply_op3_no_bwd(u, &dy, &Relu2MulBwd { wrt_gate: false })?;
        Ok((Some(dg), Some(du)))
    }
}

/// `dg = 2 · relu(g) · u · dy` or `du = relu(g)² · dy`.
struct Relu2MulBwd {
    wrt_gate: bool,
}

impl CustomOp3 for Relu2MulBwd {
    fn name(&self) -> &'static str {
        "relu2-mul-bwd"
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
        let (g, u) = pairs(s1, l1, s2, l2, "relu2-mul")?;
        let dy = slice(s3, l3, "relu2-mul")?;
        if dy.len() != g.len() {
            candle_core::bail!("relu2-mul: a gradient of {} values for {} outputs", dy.len(), g.len());
        }
        let chunks = g.par_chunks(ELEM_CHUNK).zip(u.par_chunks(ELEM_CHUNK)).zip(dy.par_chunks(ELEM_CHUNK));
        // Every value written: equal chunks of the inputs and the output.
        let out = filled(g.len(), |out| {
            out.par_chunks_mut(ELEM_CHUNK).zip(chunks).for_each(|(d, ((g, u), dy))| {
                for (((d, g), u), dy) in d.iter_mut().zip(g).zip(u).zip(dy) {
                    let r = g.max(0.0);
                    d.write(if self.wrt_gate { 2.0 * r * u * dy } else { r * r * dy });
                }
            })
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

/// Mean negative log-likelihood of `targets [..]` ([`IGNORE`] skips a row) under the logits
/// `h · Eᵀ` of hidden states `h [.., H]` and the vocabulary matrix `e [V, H]` (f32 CPU),
/// differentiable in both. The logits are computed by the gemm candle's matmul runs, with its
/// arguments (the same values as `h.matmul(e.t())`), and never become a graph node: the
/// op keeps `softmax − onehot` in their place for the backward, so candle allocates, zero-fills
/// and adds no `[rows, V]` gradient of its own (two per step before; 131 MB each on the bench).
pub fn head_cross_entropy(h: &Tensor, e: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
    h.contiguous()?.apply_op2(&e.contiguous()?, HeadCrossEntropy { targets, dlogits: Mutex::new(None) })
}

struct HeadCrossEntropy {
    targets: Vec<u32>,
    /// `(softmax − onehot) / scored` of the forward's logits, `[rows, V]`.
    dlogits: Mutex<Option<Tensor>>,
}

impl CustomOp2 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (h, e) = (slice(s1, l1, "head-cross-entropy")?, slice(s2, l2, "head-cross-entropy")?);
        let (v, hidden) = l2.shape().dims2()?;
        if l1.dims().last() != Some(&hidden) || v == 0 {
            candle_core::bail!("head-cross-entropy: hidden states {:?} for a [{v}, {hidden}] matrix", l1.dims());
        }
        let n = h.len() / hidden.max(1);
        let tg = &self.targets;
        let count = check_targets(tg, n, v)?;
        // Every value written: gemm with `read_dst = false` sets each of the n × v outputs
        // (hidden ≥ 1: a zero-width matrix has no rows, so n = 0).
        let mut logits = filled(n * v, |dst| {
            // SAFETY: dst is n × v, lhs n × hidden row-major, rhs = eᵀ read from e (v × hidden
            // row-major) with row stride 1 and column stride hidden: all in bounds.
            unsafe {
                gemm_as_candle(
                    (n, v, hidden),
                    dst.as_mut_ptr() as *mut f32,
                    v,
                    h.as_ptr(),
                    (hidden, 1),
                    e.as_ptr(),
                    (1, hidden),
                    candle_parallelism(),
                )
            }
        });
        let inv = 1.0 / count as f32;
        let losses: Vec<f64> = logits
            .par_chunks_mut(v)
            .zip(tg.par_iter())
            .map(|(row, &t)| {
                if t == IGNORE {
                    row.iter_mut().for_each(|x| *x = 0.0);
                    return 0.0;
                }
                let (sum, loss) = row_nll_to_exps(row, t);
                row.iter_mut().for_each(|x| *x = *x / sum * inv);
                row[t as usize] -= inv;
                loss
            })
            .collect();
        let loss = losses.iter().sum::<f64>() / count as f64;
        *self.dlogits.lock().expect("head-cross-entropy state") =
            Some(Tensor::from_vec(logits, (n, v), &candle_core::Device::Cpu)?);
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(&self, h: &Tensor, e: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(dl) = self.dlogits.lock().expect("head-cross-entropy state").clone() else {
            candle_core::bail!("head-cross-entropy: backward without its forward");
        };
        let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0] as f64;
        let h2 = h.reshape(((), e.dim(1)?))?;
        let scaled = |t: Tensor| if g == 1.0 { Ok(t) } else { t * g };
        let dh = scaled(matmul(&dl, e)?.reshape(h.dims())?)?;
        let de = scaled(matmul(&dl.t()?, &h2)?)?;
        Ok((Some(dh), Some(de)))
    }
}

/// A target that is not scored (its row adds nothing to the loss and gets no gradient).
pub const IGNORE: u32 = u32::MAX;

/// Mean negative log-likelihood of `targets [..]` (u32; [`IGNORE`] skips a row) under
/// `logits [.., V]` (f32 CPU) over the scored rows: a scalar, differentiable in the logits.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?.flatten_all()?.contiguous()?;
    logits.contiguous()?.apply_op2(&targets, CrossEntropy { rows: Mutex::new(vec![]) })
}

/// The forward keeps each row's `(max, Σ exp(x − max))` for the backward.
struct CrossEntropy {
    rows: Mutex<Vec<(f32, f32)>>,
}

fn targets<'a>(s: &'a CpuStorage, l: &Layout, rows: usize, v: usize) -> Result<&'a [u32]> {
    let CpuStorage::U32(t) = s else { candle_core::bail!("cross-entropy: targets must be u32") };
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("cross-entropy: targets must be contiguous") };
    let t = &t[a..b];
    check_targets(t, rows, v)?;
    Ok(t)
}

/// Checks one target per row, each in the vocabulary or [`IGNORE`], at least one scored; the
/// number scored.
fn check_targets(t: &[u32], rows: usize, v: usize) -> Result<usize> {
    if t.len() != rows {
        candle_core::bail!("cross-entropy: {rows} rows of logits but {} targets", t.len());
    }
    if let Some(bad) = t.iter().find(|&&t| t != IGNORE && t as usize >= v) {
        candle_core::bail!("cross-entropy: target {bad} outside the vocabulary of {v}");
    }
    match scored(t) {
        0 => candle_core::bail!("cross-entropy: no position to score"),
        count => Ok(count),
    }
}

/// `(max, Σ exp(x − max), −log softmax(x)[t])` of one row of logits.
fn row_nll(row: &[f32], t: u32) -> (f32, f32, f64) {
    let mut max = f32::NEG_INFINITY;
    // SAFETY: rows are non-empty (V > 0 is checked by the callers).
    unsafe { f32::vec_reduce_max(row.as_ptr(), &mut max, row.len()) };
    // The exps through a small buffer, summed in row order (the values are ≥ +0, so the sum's
    // start value does not matter).
    let mut buf = [0f32; 256];
    let mut sum = 0f32;
    for chunk in row.chunks(buf.len()) {
        let exps = &mut buf[..chunk.len()];
        exps.copy_from_slice(chunk);
        exp_minus(exps, max);
        sum = exps.iter().fold(sum, |s, e| s + e);
    }
    (max, sum, (sum.ln() - (row[t as usize] - max)) as f64)
}

/// [`row_nll`]'s `(sum, nll)`, leaving `exp(x − max)` in the row: the softmax's numerators,
/// computed once (the same values [`row_nll`] sums, in its order, so the same bits).
fn row_nll_to_exps(row: &mut [f32], t: u32) -> (f32, f64) {
    let mut max = f32::NEG_INFINITY;
    // SAFETY: rows are non-empty (V > 0 is checked by the callers).
    unsafe { f32::vec_reduce_max(row.as_ptr(), &mut max, row.len()) };
    let target = row[t as usize];
    exp_minus(row, max);
    let sum: f32 = row.iter().sum();
    (sum, (sum.ln() - (target - max)) as f64)
}

/// `(rows, V)` of logits `[.., V]`.
fn rows_of(l: &Layout) -> Result<(usize, usize)> {
    let v = *l.dims().last().unwrap_or(&0);
    if l.dims().len() < 2 || v == 0 {
        candle_core::bail!("cross-entropy: logits must be [.., V] with V > 0, got {:?}", l.dims());
    }
    Ok((l.shape().elem_count() / v, v))
}

fn scored(tg: &[u32]) -> usize {
    tg.iter().filter(|&&t| t != IGNORE).count()
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "cross-entropy")?;
        let (n, v) = rows_of(l1)?;
        let tg = targets(s2, l2, n, v)?;
        let count = scored(tg);
        let rows: Vec<(f32, f32, f64)> = x
            .par_chunks(v)
            .zip(tg.par_iter())
            .map(|(row, &t)| if t == IGNORE { (0.0, 1.0, 0.0) } else { row_nll(row, t) })
            .collect();
        let loss = rows.iter().map(|r| r.2).sum::<f64>() / count as f64;
        *self.rows.lock().expect("cross-entropy state") = rows.iter().map(|r| (r.0, r.1)).collect();
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, t: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let rows = self.rows.lock().expect("cross-entropy state").clone();
        let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0];
        let dx = x.apply_op2_no_bwd(t, &CrossEntropyBwd { rows, g })?;
        Ok((Some(dx), None))
    }
}

struct CrossEntropyBwd {
    rows: Vec<(f32, f32)>,
    g: f32,
}

impl CustomOp2 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross-entropy-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "cross-entropy")?;
        let (n, v) = rows_of(l1)?;
        let tg = targets(s2, l2, n, v)?;
        if self.rows.len() != n {
            candle_core::bail!("cross-entropy: backward without its forward");
        }
        let scale = self.g / scored(tg) as f32;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(v).zip(x.par_chunks(v)).enumerate().for_each(|(r, (d, x))| {
            if tg[r] == IGNORE {
                return;
            }
            let (max, sum) = self.rows[r];
            d.copy_from_slice(x);
            exp_minus(d, max);
            wide(|| d.iter_mut().for_each(|d| *d = *d / sum * scale));
            d[tg[r] as usize] -= scale;
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::{act_fake_quant, ste, weight_fake_quant, weight_inv_scale};
    use crate::rng::SplitMix64;
    use candle_core::{Device, Var, D};

    fn normal(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let mut rng = SplitMix64::new(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// `|a − b| ≤ tol · max|b|` elementwise.
    fn close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let (a, b) = (values(a), values(b));
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= tol * scale, "{what}[{i}]: fused {x} vs composed {y} (scale {scale})");
        }
    }

    /// Forward values and input gradients (under `Σ y ⊙ r`, r random) of a fused op against the
    /// composed candle ops it replaces.
    fn check(
        what: &str,
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        composed: impl Fn(&[Tensor]) -> Result<Tensor>,
        exact_forward: bool,
    ) {
        let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
            let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts).unwrap();
            let r = normal(y.dims(), 99, 1.0);
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g: Vec<Tensor> = vars.iter().map(|v| grads.get(v.as_tensor()).expect("a gradient").clone()).collect();
            (y, g)
        };
        let (yf, gf) = run(&fused);
        let (yc, gc) = run(&composed);
        if exact_forward {
            assert_eq!(values(&yf), values(&yc), "{what}: forward bits");
        } else {
            close(&format!("{what} forward"), &yf, &yc, 1e-6);
        }
        for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
            close(&format!("{what} grad {i}"), a, b, 2e-5);
        }
    }

    #[test]
    fn rms_norm_matches_candle() {
        let x = normal(&[3, 37, 24], 1, 2.0);
        let w = normal(&[24], 2, 1.0);
        // The forward equals candle's inference kernel bit for bit; gradients the composed form's.
        let infer = candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap();
        assert_eq!(values(&rms_norm(&x, &w, 1e-6).unwrap()), values(&infer));
        // Rows summed eight at a time (and the rest one by one): fewer than, exactly and more
        // than eight rows, rows long and short, values far apart in magnitude.
        for (i, shape) in [[1usize, 5, 300], [2, 4, 513], [1, 19, 1], [1, 8, 64]].iter().enumerate() {
            let x = (normal(shape, 10 + i as u64, 1.0).exp().unwrap() * normal(shape, 20 + i as u64, 3.0)).unwrap();
            let w = normal(&[shape[2]], 30 + i as u64, 1.0);
            let want = values(&candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap());
            assert_eq!(values(&rms_norm_infer(&x, &w, 1e-6).unwrap()), want, "{shape:?}");
        }
        check(
            "rms_norm",
            &[x, w],
            |t| rms_norm(&t[0], &t[1], 1e-6),
            |t| {
                let inv = (t[0].sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?.recip()?;
                t[0].broadcast_mul(&inv)?.broadcast_mul(&t[1])
            },
            false,
        );
    }

    #[test]
    fn causal_softmax_matches_the_masked_softmax() {
        // Rows longer than candle's 32-value summing step, ending inside and after a step
        // (the masked keys are skipped there), and short ones (gradients checked too).
        for (t, offset) in [(7usize, 0usize), (5, 3), (70, 0), (40, 33)] {
            let total = t + offset;
            let s = normal(&[2, 3, t, total], 3, 3.0);
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| (0..total).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (t, total), &Device::Cpu).unwrap();
            let scale = 0.125f64;
            let infer = candle_nn::ops::softmax_last_dim(&(&s * scale).unwrap().broadcast_add(&mask).unwrap()).unwrap();
            let (got, want) = (values(&causal_softmax(&s, scale as f32, offset).unwrap()), values(&infer));
            let differs = got.iter().zip(&want).position(|(g, w)| g.to_bits() != w.to_bits());
            assert_eq!(differs, None, "t {t}, offset {offset}: first differing value");
            if t > 8 {
                continue;
            }
            check(
                "causal_softmax",
                &[s],
                |x| causal_softmax(&x[0], scale as f32, offset),
                |x| candle_nn::ops::softmax(&(&x[0] * scale)?.broadcast_add(&mask)?, D::Minus1),
                false,
            );
        }
    }

    #[test]
    fn rope_matches_candle() {
        let x = normal(&[2, 3, 9, 8], 4, 1.0);
        let cos = normal(&[9, 4], 5, 1.0);
        let sin = normal(&[9, 4], 6, 1.0);
        let infer = candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap();
        assert_eq!(values(&rope(&x, &cos, &sin).unwrap()), values(&infer));
        check(
            "rope",
            &[x],
            |t| rope(&t[0], &cos, &sin),
            |t| candle_nn::rotary_emb::rope_slow(&t[0], &cos, &sin),
            false,
        );
    }

    /// split_heads / merge_heads against the inference path's reshape, transpose, rope,
    /// repeat_kv and copies: the same values, the same gradients.
    #[test]
    fn head_layouts_match_the_composed_ops() {
        let (b, t, h, d, rep) = (2usize, 5usize, 3usize, 8usize, 2usize);
        let y = normal(&[b, t, h * d], 14, 1.0);
        let cos = normal(&[t, d / 2], 15, 1.0);
        let sin = normal(&[t, d / 2], 16, 1.0);
        let composed = |y: &Tensor, rope: bool, transposed: bool| -> Result<Tensor> {
            let x = y.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?;
            let x = if rope { candle_nn::rotary_emb::rope_slow(&x, &cos, &sin)? } else { x };
            let x = x.unsqueeze(2)?.expand((b, h, rep, t, d))?.reshape((b, h * rep, t, d))?;
            if transposed {
                x.t()?.contiguous()
            } else {
                Ok(x)
            }
        };
        for (rope, transposed) in [(true, false), (true, true), (false, false)] {
            let layout = HeadLayout { heads: h, repeat: rep, rope, transposed };
            let fused = split_heads(&y, &cos, &sin, layout).unwrap();
            let infer = composed(&y, rope, transposed).unwrap();
            if rope {
                // The rotation is candle's rope kernel's arithmetic.
                let x = y.reshape((b, t, h, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
                let r = candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap();
                let r = r.unsqueeze(2).unwrap().expand((b, h, rep, t, d)).unwrap().reshape((b, h * rep, t, d)).unwrap();
                let r = if transposed { r.t().unwrap().contiguous().unwrap() } else { r };
                assert_eq!(values(&fused), values(&r), "rope {rope}, transposed {transposed}");
            } else {
                assert_eq!(values(&fused), values(&infer));
            }
            check(
                &format!("split_heads rope {rope} transposed {transposed}"),
                std::slice::from_ref(&y),
                |x| split_heads(&x[0], &cos, &sin, layout),
                |x| composed(&x[0], rope, transposed),
                false,
            );
        }
        let o = normal(&[b, h, t, d], 17, 1.0);
        check("merge_heads", &[o], |x| merge_heads(&x[0]), |x| x[0].transpose(1, 2)?.reshape((b, t, h * d)), true);
    }

    #[test]
    fn quantisers_match_the_straight_through_forms() {
        // Rows with exact .5 ties after scaling, and a zero row.
        let x =
            Tensor::cat(&[&normal(&[5, 33], 7, 3.0), &Tensor::zeros((1, 33), DType::F32, &Device::Cpu).unwrap()], 0)
                .unwrap();
        check("act_quant_ste", &[x], |t| act_quant_ste(&t[0]), |t| ste(&t[0], &act_fake_quant(&t[0])?), true);
        let w = normal(&[12, 20], 8, 0.05);
        let s = values(&weight_inv_scale(&w).unwrap())[0];
        check(
            "weight_quant_ste",
            &[w],
            |t| weight_quant_ste(&t[0], s),
            |t| ste(&t[0], &weight_fake_quant(&t[0])?),
            true,
        );
    }

    #[test]
    fn relu2_mul_matches_the_composed_gate() {
        let g = normal(&[4, 19], 9, 1.0);
        let u = normal(&[4, 19], 10, 1.0);
        check("relu2_mul", &[g, u], |t| relu2_mul(&t[0], &t[1]), |t| t[0].relu()?.sqr()? * &t[1], true);
    }

    #[test]
    fn cross_entropy_matches_candle() {
        let logits = normal(&[6, 50], 11, 4.0);
        let targets = Tensor::new(&[0u32, 49, 7, 7, 13, 20], &Device::Cpu).unwrap();
        let run = |fused: bool| {
            let v = Var::from_tensor(&logits).unwrap();
            let loss = if fused {
                cross_entropy(v.as_tensor(), &targets).unwrap()
            } else {
                candle_nn::loss::cross_entropy(v.as_tensor(), &targets).unwrap()
            };
            let g = (&loss * 3.0).unwrap().backward().unwrap().get(v.as_tensor()).unwrap().clone();
            (loss, g)
        };
        let ((lf, gf), (lc, gc)) = (run(true), run(false));
        close("cross_entropy loss", &lf, &lc, 1e-6);
        close("cross_entropy grad", &gf, &gc, 1e-6);
        // [2, 3, V] logits with the last position of each row unscored: the loss and gradient of
        // the scored rows alone, zero gradient elsewhere.
        let t3 = Tensor::new(&[[0u32, 49, IGNORE], [7, 13, IGNORE]], &Device::Cpu).unwrap();
        let v = Var::from_tensor(&logits.reshape((2, 3, 50)).unwrap()).unwrap();
        let loss = cross_entropy(v.as_tensor(), &t3).unwrap();
        let g = loss.backward().unwrap().get(v.as_tensor()).unwrap().reshape((6, 50)).unwrap();
        let rows = Tensor::new(&[0u32, 1, 3, 4], &Device::Cpu).unwrap();
        let want = candle_nn::loss::cross_entropy(
            &logits.index_select(&rows, 0).unwrap(),
            &t3.flatten_all().unwrap().index_select(&rows, 0).unwrap(),
        )
        .unwrap();
        close("ignored rows: loss", &loss, &want, 1e-6);
        assert_eq!(values(&g.narrow(0, 2, 1).unwrap()), vec![0f32; 50]);
        assert!(values(&g.narrow(0, 1, 1).unwrap()).iter().any(|x| *x != 0.0));
        let none = Tensor::new(&[IGNORE; 6], &Device::Cpu).unwrap();
        assert!(cross_entropy(&logits, &none).unwrap_err().to_string().contains("no position to score"));
        let bad = Tensor::new(&[0u32, 50, 0, 0, 0, 0], &Device::Cpu).unwrap();
        let err = cross_entropy(&logits, &bad).unwrap_err().to_string();
        assert!(err.contains("outside the vocabulary of 50"), "{err}");
    }

    /// The fused head + loss: the loss of `cross_entropy(h · eᵀ)` bit for bit (the same gemm,
    /// the same row arithmetic), its gradients to float rounding, ignored rows included.
    #[test]
    fn head_cross_entropy_matches_the_head_then_the_loss() {
        let h = normal(&[2, 3, 16], 18, 1.0);
        let e = normal(&[40, 16], 19, 0.5);
        let targets = Tensor::new(&[[3u32, 39, IGNORE], [0, 7, IGNORE]], &Device::Cpu).unwrap();
        let run = |fused: bool| {
            let (hv, ev) = (Var::from_tensor(&h).unwrap(), Var::from_tensor(&e).unwrap());
            let loss = if fused {
                head_cross_entropy(hv.as_tensor(), ev.as_tensor(), &targets).unwrap()
            } else {
                let logits = hv.as_tensor().reshape((6, 16)).unwrap().matmul(&ev.as_tensor().t().unwrap()).unwrap();
                cross_entropy(&logits.reshape((2, 3, 40)).unwrap(), &targets).unwrap()
            };
            let grads = (&loss * 2.0).unwrap().backward().unwrap();
            let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
            (values(&loss), g(&hv), g(&ev))
        };
        let ((lf, hf, ef), (lc, hc, ec)) = (run(true), run(false));
        assert_eq!(lf, lc, "loss bits");
        close("head_cross_entropy dh", &hf, &hc, 1e-6);
        close("head_cross_entropy de", &ef, &ec, 1e-6);
    }

    /// The head's one-pass numerators give `row_nll`'s sum and loss bit for bit.
    #[test]
    fn row_nll_to_exps_equals_row_nll() {
        for (v, seed) in [(1usize, 1u64), (7, 2), (33, 3), (1000, 4)] {
            let row = values(&normal(&[v], seed, 4.0));
            for t in [0, v as u32 / 2, v as u32 - 1] {
                let (max, sum, loss) = row_nll(&row, t);
                let mut exps = row.clone();
                let (sum2, loss2) = row_nll_to_exps(&mut exps, t);
                assert_eq!((sum.to_bits(), loss.to_bits()), (sum2.to_bits(), loss2.to_bits()), "V {v}, t {t}");
                let want: Vec<u32> = row.iter().map(|x| (x - max).exp().to_bits()).collect();
                assert_eq!(exps.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want);
            }
        }
    }

    /// Gradients of the chunked row-reduction do not depend on the thread count.
    #[test]
    fn gain_gradients_are_the_same_on_any_thread_count() {
        let x = normal(&[300, 16], 12, 1.0);
        let w = normal(&[16], 13, 1.0);
        let grad = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let v = Var::from_tensor(&w).unwrap();
                let y = rms_norm(&x, v.as_tensor(), 1e-6).unwrap();
                let g = (&y * &x).unwrap().sum_all().unwrap().backward().unwrap();
                values(g.get(v.as_tensor()).unwrap())
            })
        };
        assert_eq!(grad(1), grad(3));
    }
}
