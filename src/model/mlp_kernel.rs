//! BitNet's MLP for CPU inference, one block of tokens at a time:
//! `down(sub_norm(relu(gate(x))² ⊙ up(x)))` with every intermediate of a block in L2.
//!
//! Run op by op, the MLP of 1024 tokens writes and rereads four `[1024, ffn]` f32 intermediates
//! (gate, up, their product, its norm) and the norm's int8 codes: ~40 MB per layer at ffn 1376
//! that stream through L3 or memory, while the kernel's sums themselves are compute-bound. Here a task
//! takes [`BLOCK_TOKENS`] tokens through all of it — quantise, gate and up, relu²·up, sub-norm,
//! quantise, down — and writes only the block's output rows. Each step is the op-by-op path's
//! own function on whole rows (the kernel's exact sums and scaling, `relu2_times`,
//! `rms_norm_rows`, the per-row quantiser), so the output has the same bits (tested).

use super::cpu_values::filled;
use super::simd::wide;
use super::ternary_kernel::{self as kernel, PackedTernary, QuantRows};
use super::train_ops::{relu2_times, rms_norm_rows};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Tokens per task: the kernel's own task size, so the weights are read as often as op by op.
pub(crate) const BLOCK_TOKENS: usize = 32;

/// The MLP's packed projections and its sub-norm.
pub(crate) struct MlpWeights<'a> {
    pub gate: &'a PackedTernary,
    pub up: &'a PackedTernary,
    pub down: &'a PackedTernary,
    /// The sub-norm's gain (`ffn` values) and epsilon.
    pub norm: &'a [f32],
    pub eps: f32,
}

impl MlpWeights<'_> {
    /// Whether the shapes chain: `hidden → ffn` (gate, up), the norm over `ffn`, `ffn → hidden`.
    fn check(&self, hidden: usize) {
        let ffn = self.gate.out;
        assert!(
            self.gate.k == hidden
                && self.up.k == hidden
                && self.up.out == ffn
                && self.norm.len() == ffn
                && self.down.k == ffn
                && ffn > 0,
            "MLP weight shapes do not chain"
        );
    }
}

/// The MLP of `x [m, hidden]` (row-major) as `[m, down.out]`.
pub(crate) fn forward(x: &[f32], m: usize, hidden: usize, w: &MlpWeights<'_>) -> Vec<f32> {
    assert_eq!(x.len(), m * hidden, "MLP input shape");
    w.check(hidden);
    let out = w.down.out;
    // Every value written: each task writes all of its block's rows.
    filled(m * out, |y| {
        y.par_chunks_mut(BLOCK_TOKENS * out.max(1))
            .zip(x.par_chunks(BLOCK_TOKENS * hidden.max(1)))
            .for_each(|(y, x)| block(x, hidden, w, y))
    })
}

/// A thread's block intermediates (gate, up, their normed product), kept from block to block
/// rather than three fresh `[32, ffn]` buffers per block (768 allocations a forward at the
/// mid-size bench's shape).
#[derive(Default)]
struct Scratch {
    g: Vec<f32>,
    u: Vec<f32>,
    normed: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// `v` resized to `n` values as a slice for a function that writes all of them.
fn out_slice(v: &mut Vec<f32>, n: usize) -> &mut [MaybeUninit<f32>] {
    v.resize(n, 0.0);
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout; the writers here store only initialised
    // values, so `v` stays initialised.
    unsafe { &mut *(v.as_mut_slice() as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// One block of tokens through the whole MLP into its output rows `y`.
fn block(x: &[f32], hidden: usize, w: &MlpWeights<'_>, y: &mut [MaybeUninit<f32>]) {
    let (rows, isa) = (x.len() / hidden.max(1), kernel::best_isa());
    // Taken, not borrowed: a thread waiting inside a parallel call below may run another block,
    // which then finds empty buffers and grows its own.
    let mut s = SCRATCH.with(|c| c.take());
    let xq = QuantRows::new_with(x, rows, hidden, isa);
    let n = rows * w.gate.out;
    kernel::matmul_into(&xq, w.gate, isa, out_slice(&mut s.g, n));
    kernel::matmul_into(&xq, w.up, isa, out_slice(&mut s.u, n));
    let (g, u) = (&mut s.g[..n], &s.u[..n]);
    wide(|| g.iter_mut().zip(u).for_each(|(g, &u)| *g = relu2_times(*g, u)));
    rms_norm_rows(&s.g[..n], w.norm, w.eps, out_slice(&mut s.normed, n));
    let hq = QuantRows::new_with(&s.normed[..n], rows, w.gate.out, isa);
    kernel::matmul_into(&hq, w.down, isa, y);
    SCRATCH.with(|c| c.set(s));
}
