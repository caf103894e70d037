//! The f32 LM head of many positions on AVX-512 CPUs: `logits = h · Eᵀ` with gemm's bits, faster.
//!
//! candle's matmul (the `gemm` crate) takes the inner dimension in one block when it is at most
//! 512 (`gemm_common::cache::kernel_params`: `kc = max(…, 512).min(k)`), so each logit is one
//! chain of fused multiply-adds over the hidden size, from zero, in order. This loop computes the
//! same chain, so the logits keep their bits (tested against candle's matmul), and is laid out
//! for this product: a panel of 48 embedding rows is transposed once into an L2 buffer (one
//! vector load gives 16 vocabulary entries of one input), then every position passes over it
//! eight at a time, each of its hidden values broadcast into 3 × 8 accumulators. No packing of
//! `h`, and the tile's 8 × 48 logits are stored as 8 row pieces where `y` holds them. At the
//! mid-size bench shape (1024 × 512 × 32000, one thread, Zen 5) it reaches ~106 GMAC/s against
//! gemm's 85–99 (the core's peak is ~120).
//!
//! Hidden sizes above 512 (gemm splits the sum, in blocks that depend on the cache sizes, so its
//! bits could not be kept) and CPUs without AVX-512 use candle's matmul.

use super::cpu_values::{filled, with_f32};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The largest hidden size whose sums gemm takes in one block (and so this loop reproduces).
pub const MAX_HIDDEN: usize = 512;
/// Fewer positions than this go to the matmul: a panel's transposition would serve too few
/// (one position: gemm's matrix-vector loop streams the embedding once, 2× faster here).
pub const MIN_ROWS: usize = 8;
/// Vocabulary entries per panel (three 16-lane vectors).
const PANEL: usize = 48;
/// Positions per tile.
const TOKENS: usize = 8;

/// `h [rows, hidden] · eᵀ` for the f32 head matrix `e [vocab, hidden]`, as `[rows, vocab]`, when
/// this loop applies (f32 CPU tensors, contiguous, hidden ≤ [`MAX_HIDDEN`], at least
/// [`MIN_ROWS`] positions, AVX-512); `None`
/// for the caller's matmul otherwise.
pub fn logits(h: &Tensor, e: &Tensor) -> Result<Option<Tensor>> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let (Ok((rows, hidden)), Ok((vocab, eh))) = (h.dims2(), e.dims2()) else { return Ok(None) };
    if !available()
        || !cpu_f32(h)
        || !cpu_f32(e)
        || hidden != eh
        || hidden == 0
        || hidden > MAX_HIDDEN
        || rows < MIN_ROWS
    {
        return Ok(None);
    }
    let y = with_f32(h, |hv| with_f32(e, |ev| filled(rows * vocab, |y| product(hv, ev, rows, vocab, hidden, y))));
    match y.flatten() {
        Some(y) => Ok(Some(Tensor::from_vec(y, (rows, vocab), h.device())?)),
        None => Ok(None),
    }
}

/// Whether this CPU runs the loop (AVX-512 F).
fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A raw output pointer shared by tasks that write disjoint columns of it.
#[derive(Clone, Copy)]
struct Cells(*mut f32);
// SAFETY: each task writes only its own panels' columns (`product`).
unsafe impl Send for Cells {}
unsafe impl Sync for Cells {}
impl Cells {
    /// Through a method, so closures capture the whole (Sync) wrapper, not the bare pointer.
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Every value of `y [rows, vocab]`: tasks own runs of panels, each written for every position.
fn product(h: &[f32], e: &[f32], rows: usize, vocab: usize, k: usize, y: &mut [MaybeUninit<f32>]) {
    assert!(h.len() == rows * k && e.len() == vocab * k && y.len() == rows * vocab && (1..=MAX_HIDDEN).contains(&k));
    assert!(available(), "the head's tiles need AVX-512");
    let panels = vocab.div_ceil(PANEL);
    let per_task = panels.div_ceil(4 * rayon::current_num_threads()).max(1);
    let y = Cells(y.as_mut_ptr() as *mut f32);
    (0..panels.div_ceil(per_task)).into_par_iter().for_each_init(
        || vec![0f32; PANEL * k],
        |panel, task| {
            for p in task * per_task..((task + 1) * per_task).min(panels) {
                let (v0, cols) = (p * PANEL, PANEL.min(vocab - p * PANEL));
                pack(&e[v0 * k..(v0 + cols) * k], k, panel);
                for r in (0..rows).step_by(TOKENS) {
                    let tile = Tile { panel, h: &h[r * k..], k, cols, y: y.at(r * vocab + v0), vocab };
                    // SAFETY: AVX-512 checked above; the tile's rows r.. < rows and columns
                    // v0 .. v0 + cols are this task's (panel p), within `y`.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        tile.run(TOKENS.min(rows - r))
                    };
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = tile; // not reached: `available()` is false there
                }
            }
        },
    );
}

/// Embedding rows `e [cols, k]` (cols ≤ 48) into `panel [k][48]`: input `i` of row `j` at
/// `48i + j`, the columns past `cols` zero.
fn pack(e: &[f32], k: usize, panel: &mut [f32]) {
    let cols = e.len() / k;
    if cols < PANEL {
        panel.fill(0.0);
    }
    for (j, row) in e.chunks_exact(k).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            panel[i * PANEL + j] = v;
        }
    }
}

/// Up to 8 positions against one packed panel.
struct Tile<'a> {
    panel: &'a [f32],
    /// The first position's hidden row, the others following.
    h: &'a [f32],
    k: usize,
    /// Valid columns of the panel (the rest is padding, not stored).
    cols: usize,
    /// Where the first position's logit of the panel's first column goes.
    y: *mut f32,
    vocab: usize,
}

#[cfg(target_arch = "x86_64")]
impl Tile<'_> {
    /// SAFETY: AVX-512 F; `t` ≤ 8 positions in `h`; `y` valid for their rows' `cols` columns.
    unsafe fn run(&self, t: usize) {
        assert!(self.h.len() >= t * self.k && self.panel.len() >= PANEL * self.k && self.cols <= PANEL);
        match t {
            8 => self.tokens::<8>(),
            7 => self.tokens::<7>(),
            6 => self.tokens::<6>(),
            5 => self.tokens::<5>(),
            4 => self.tokens::<4>(),
            3 => self.tokens::<3>(),
            2 => self.tokens::<2>(),
            _ => self.tokens::<1>(),
        }
    }

    /// Each logit one FMA chain over the inputs in order, from zero (gemm's single-block sum).
    #[target_feature(enable = "avx512f")]
    unsafe fn tokens<const T: usize>(&self) {
        use std::arch::x86_64::*;
        let (p, h, k) = (self.panel.as_ptr(), self.h.as_ptr(), self.k);
        let mut acc = [[_mm512_setzero_ps(); 3]; T];
        for i in 0..k {
            // SAFETY (loads): i < k; the panel holds 48·k values, `h` t·k (asserted).
            let e: [__m512; 3] = std::array::from_fn(|j| _mm512_loadu_ps(p.add(i * PANEL + 16 * j)));
            for (t, acc) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*h.add(t * k + i));
                for (a, &e) in acc.iter_mut().zip(&e) {
                    *a = _mm512_fmadd_ps(b, e, *a);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            for (j, &a) in acc.iter().enumerate() {
                let lanes = self.cols.saturating_sub(16 * j).min(16);
                let keep: __mmask16 = if lanes == 16 { !0 } else { (1u32 << lanes) as u16 - 1 };
                _mm512_mask_storeu_ps(self.y.add(t * self.vocab + 16 * j), keep, a);
            }
        }
    }
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
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    /// The logits equal candle's matmul bit for bit, on odd shapes (partial panels and tiles) and
    /// several threads; hidden sizes past 512 are left to the matmul.
    #[test]
    fn logits_equal_candles_matmul() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 (the head's tiles are not used here)");
            return;
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (i, &(rows, vocab, k)) in
            [(8, 1, 1), (17, 47, 7), (9, 48, 64), (33, 49, 300), (100, 1000, 512), (8, 97, 129), (15, 300, 512)]
                .iter()
                .enumerate()
        {
            let h = normal((rows, k), i as u64);
            let e = normal((vocab, k), 100 + i as u64);
            let want = h.matmul(&e.t().unwrap()).unwrap();
            let got = logits(&h, &e).unwrap().expect("applies");
            assert_eq!(got.dims(), &[rows, vocab]);
            assert_eq!(bits(&got), bits(&want), "{rows}×{vocab}×{k}");
            let threaded = pool.install(|| logits(&h, &e)).unwrap().expect("applies");
            assert_eq!(bits(&threaded), bits(&want), "{rows}×{vocab}×{k}, 3 threads");
        }
        let (h, e) = (normal((4, 513), 1), normal((5, 513), 2));
        assert!(logits(&h, &e).unwrap().is_none(), "hidden 513 goes to the matmul");
        let (h, e) = (normal((7, 64), 1), normal((5, 64), 2));
        assert!(logits(&h, &e).unwrap().is_none(), "7 positions go to the matmul");
        assert!(logits(&h.to_dtype(DType::BF16).unwrap(), &e).unwrap().is_none(), "bf16 goes to the matmul");
    }
}
