//! The 16-row layout of the packed weights and its AVX-512 VNNI loop, which needs no horizontal
//! sums.
//!
//! In the row layout (the parent module's) each (weight row, token) pair has an accumulator of
//! 16 partial sums, added across lanes at the end and stored one value at a time: at k = 512 (four
//! blocks a row, the mid-size model's q, k, v, o, gate and up) those sums and stores took ~40 % of
//! the 512-bit loop. Here a 32-bit lane *is* an output row. Sixteen weight rows are interleaved
//! so that one 64-byte chunk holds their codes of 16 inputs: byte `4j + i` of chunk `c` holds row
//! `j`'s codes (`w + 1`) of inputs `16c + i`, `16c + 4 + i`, `16c + 8 + i`, `16c + 12 + i` in bits
//! 0–1, 2–3, 4–5, 6–7. A shift and a mask give 16 rows × 4 inputs, which one `vpdpbusd` multiplies
//! by a token's 4 activations broadcast to every lane. The accumulator ends as that token's 16
//! outputs side by side, as `y` holds them: the offset `Σ q` is subtracted and the scaling applied
//! in the register, and 16 outputs stored at once. The integers are the other loops' (tested).

use super::{Output, PackedTernary, QuantRows, BLOCK, BLOCK_BYTES, ROW_CHUNK_BYTES, TOKENS_PER_TASK};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Weight rows per group (the lanes of a 512-bit vector of i32).
pub(super) const GROUP_ROWS: usize = 16;
/// Inputs per chunk of a group.
const CHUNK_INPUTS: usize = 16;
/// Bytes per chunk: 16 rows × 16 inputs × 2 bits.
const CHUNK_BYTES: usize = 64;
/// Tokens per step: their accumulators and the step's codes fill the 32 vector registers.
const TOKENS: usize = 8;

/// Chunks per group row for `blocks` blocks of inputs (the activation rows' padded length, so
/// every chunk's activations exist).
fn chunks(blocks: usize) -> usize {
    blocks * BLOCK / CHUNK_INPUTS
}

/// Byte and bit shift of the code of (`row`, input `i`) in a weight of `blocks` blocks a row.
pub(super) fn position(row: usize, i: usize, blocks: usize) -> (usize, u32) {
    let (g, j) = (row / GROUP_ROWS, row % GROUP_ROWS);
    let (c, w) = (i / CHUNK_INPUTS, i % CHUNK_INPUTS);
    ((g * chunks(blocks) + c) * CHUNK_BYTES + 4 * j + w % 4, 2 * (w / 4) as u32)
}

/// Bytes of a weight of `out` rows: whole groups (the last one padded with zero weights).
pub(super) fn bytes(out: usize, blocks: usize) -> usize {
    out.div_ceil(GROUP_ROWS) * GROUP_ROWS * blocks * BLOCK_BYTES
}

/// A raw output pointer shared by tasks that write disjoint columns of it.
#[derive(Clone, Copy)]
struct Cells(*mut u32);
// SAFETY: every task writes only its own columns (`few_tokens`).
unsafe impl Send for Cells {}
unsafe impl Sync for Cells {}
impl Cells {
    /// Through a method, so closures capture the whole (Sync) wrapper, not the bare pointer.
    fn at(self, i: usize) -> *mut u32 {
        self.0.wrapping_add(i)
    }
}

/// `y [m, out] = O::emit(Σ q·T − …)` from `codes` in this layout, every value written. Many tokens
/// (or `by_tokens`): tasks own [`TOKENS_PER_TASK`] tokens and walk the groups in chunks that stay
/// in L2, as the row layout's loop does. Few tokens: tasks own groups of weight rows.
///
/// Panics unless the CPU has AVX-512 F, BW and VNNI (the caller's `Isa::Avx512Vnni512`).
pub(super) fn tiled<O: Output>(
    x: &QuantRows,
    w: &PackedTernary,
    codes: &[u8],
    y: &mut [MaybeUninit<O>],
    factors: &[f32],
    by_tokens: bool,
) {
    assert!(
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni"),
        "the 16-row loop needs AVX-512 F, BW and VNNI"
    );
    let (m, out, blocks) = (x.m, w.out, w.blocks);
    assert!(x.blocks == blocks && codes.len() == bytes(out, blocks) && factors.len() >= m && x.sum.len() >= m);
    assert!(y.len() == m * out && std::mem::size_of::<O>() == 4);
    if m == 0 || out == 0 {
        return;
    }
    let groups = out.div_ceil(GROUP_ROWS);
    let group_bytes = GROUP_ROWS * blocks * BLOCK_BYTES;
    let step = Step { codes, group_bytes, chunks: chunks(blocks), out, scaled: O::SCALED };
    if by_tokens || m >= 2 * TOKENS_PER_TASK || m >= 4 * rayon::current_num_threads() * TOKENS {
        let chunk_groups = (ROW_CHUNK_BYTES / group_bytes.max(1)).clamp(1, groups);
        y.par_chunks_mut(TOKENS_PER_TASK * out).enumerate().for_each(|(task, dst)| {
            let (r0, rows) = (task * TOKENS_PER_TASK, dst.len() / out);
            let dst = Cells(dst.as_mut_ptr() as *mut u32);
            for g0 in (0..groups).step_by(chunk_groups) {
                let g1 = (g0 + chunk_groups).min(groups);
                for r in (r0..r0 + rows).step_by(TOKENS) {
                    let t = TOKENS.min(r0 + rows - r);
                    // SAFETY: tokens r .. r + t are this task's rows of `y`; groups < `groups`.
                    unsafe { step.tokens(x, factors, r, t, g0, g1, dst.at((r - r0) * out)) };
                }
            }
        });
    } else {
        let per_task = groups.div_ceil(4 * rayon::current_num_threads()).max(1);
        let dst = Cells(y.as_mut_ptr() as *mut u32);
        (0..groups.div_ceil(per_task)).into_par_iter().for_each(|task| {
            let (g0, g1) = (task * per_task, ((task + 1) * per_task).min(groups));
            for r in (0..m).step_by(TOKENS) {
                // SAFETY: this task alone writes the columns of groups g0 .. g1, of every row.
                unsafe { step.tokens(x, factors, r, TOKENS.min(m - r), g0, g1, dst.at(r * out)) };
            }
        });
    }
}

/// What every step of one product shares.
struct Step<'a> {
    codes: &'a [u8],
    group_bytes: usize,
    chunks: usize,
    out: usize,
    scaled: bool,
}

/// Calls `$f::<T, G>` for `$t` tokens, with the most groups `G` whose `T·G` accumulators, `G`
/// code vectors and their unpacked form fit the 32 registers.
macro_rules! by_tokens {
    ($t:expr, $self:ident . $f:ident ($($arg:expr),*)) => {
        match $t {
            8 => $self.$f::<8, 2>($($arg),*),
            7 => $self.$f::<7, 3>($($arg),*),
            6 => $self.$f::<6, 3>($($arg),*),
            5 => $self.$f::<5, 3>($($arg),*),
            4 => $self.$f::<4, 4>($($arg),*),
            3 => $self.$f::<3, 5>($($arg),*),
            2 => $self.$f::<2, 6>($($arg),*),
            _ => $self.$f::<1, 8>($($arg),*),
        }
    };
}

impl Step<'_> {
    /// Tokens `r .. r + t` (t ≤ 8) against groups `g0 .. g1`, into `y` (token r's row; token
    /// `r + i` at `y + i·out`).
    ///
    /// SAFETY: the CPU has the loop's features; `y` is valid for rows r .. r + t of `out` cells.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tokens(&self, x: &QuantRows, factors: &[f32], r: usize, t: usize, g0: usize, g1: usize, y: *mut u32) {
        assert!((1..=TOKENS).contains(&t) && r + t <= x.m && g1 * self.group_bytes <= self.codes.len());
        by_tokens!(t, self.groups(x, factors, r, g0, g1, y))
    }

    /// [`Step::tokens`] for `T` tokens, `G` groups at a time and the rest one by one.
    #[allow(clippy::too_many_arguments)]
    unsafe fn groups<const T: usize, const G: usize>(
        &self,
        x: &QuantRows,
        factors: &[f32],
        r: usize,
        g0: usize,
        g1: usize,
        y: *mut u32,
    ) {
        let kp = x.blocks * BLOCK;
        let toks: [*const i8; T] = std::array::from_fn(|i| x.q[(r + i) * kp..].as_ptr());
        let offs: [i32; T] = std::array::from_fn(|i| x.sum[r + i]);
        let facs: [f32; T] = std::array::from_fn(|i| factors[r + i]);
        let tok = Tokens { toks, offs, facs };
        let mut g = g0;
        while g + G <= g1 {
            // SAFETY: groups g .. g + G < g1 exist; the caller vouches for `y` and the CPU.
            unsafe { self.tile::<T, G>(&tok, g, y) };
            g += G;
        }
        for g in g..g1 {
            // SAFETY: as above, one group.
            unsafe { self.tile::<T, 1>(&tok, g, y) };
        }
    }

    /// Groups `g .. g + G` × `T` tokens: the whole sum over the inputs, then `y`'s cells.
    ///
    /// SAFETY: AVX-512 F/BW/VNNI; groups in bounds; `y` valid for the tokens' rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const T: usize, const G: usize>(&self, tok: &Tokens<T>, g: usize, y: *mut u32) {
        use std::arch::x86_64::*;
        let mask = _mm512_set1_epi8(3);
        let base = self.codes.as_ptr().add(g * self.group_bytes);
        let mut acc = [[_mm512_setzero_si512(); T]; G];
        for c in 0..self.chunks {
            // SAFETY (loads): chunk c < chunks of groups in bounds; activation rows hold
            // chunks · 16 bytes. Unaligned.
            let p: [__m512i; G] =
                std::array::from_fn(|i| _mm512_loadu_si512(base.add(i * self.group_bytes + c * CHUNK_BYTES).cast()));
            for s in 0..4 {
                let codes: [__m512i; G] = std::array::from_fn(|i| {
                    let v = match s {
                        0 => p[i],
                        1 => _mm512_srli_epi16::<2>(p[i]),
                        2 => _mm512_srli_epi16::<4>(p[i]),
                        _ => _mm512_srli_epi16::<6>(p[i]),
                    };
                    _mm512_and_si512(v, mask)
                });
                for (t, tok_row) in tok.toks.iter().enumerate() {
                    let a = _mm512_set1_epi32(tok_row.add(CHUNK_INPUTS * c + 4 * s).cast::<i32>().read_unaligned());
                    for (acc, &code) in acc.iter_mut().zip(&codes) {
                        acc[t] = _mm512_dpbusd_epi32(acc[t], code, a);
                    }
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            let n = GROUP_ROWS * (g + i);
            // The last group's rows past `out` are padding: not stored.
            let lanes = self.out.saturating_sub(n).min(GROUP_ROWS);
            let keep: __mmask16 = if lanes == GROUP_ROWS { !0 } else { (1 << lanes) - 1 };
            for (t, &sum) in row.iter().enumerate() {
                let v = _mm512_sub_epi32(sum, _mm512_set1_epi32(tok.offs[t]));
                let dst = y.add(t * self.out + n);
                if self.scaled {
                    // `scale_one`: the i32 converted (round to nearest, exact below 2^24) times the factor.
                    let f = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(tok.facs[t]));
                    _mm512_mask_storeu_ps(dst.cast(), keep, f);
                } else {
                    _mm512_mask_storeu_epi32(dst.cast(), keep, v);
                }
            }
        }
    }
}

/// `T` tokens' activation rows, offsets `Σ q` and scaling factors.
struct Tokens<const T: usize> {
    toks: [*const i8; T],
    offs: [i32; T],
    facs: [f32; T],
}
