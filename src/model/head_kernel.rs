//! The vocabulary projection of a few positions of a bf16 model on CPU (token-by-token
//! generation, scoring the last position), and of an f32 model's generation when its embedding
//! is exactly bf16 (a bf16 checkpoint loaded in f32).
//!
//! candle 0.11 has no bf16 gemm on CPU: a bf16 matmul widens both operands to f32 first, so
//! every generated token of the 2B model converted the whole 128256 × 2560 embedding (656 MB)
//! before multiplying. Here each embedding row is widened on the fly inside the dot product, so
//! the cost is one streaming read of the matrix. Sums are f32 (like candle's widened gemm, in
//! another order); the logits are rounded to bf16 as the matmul's bf16 output is.

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Rows up to which [`logits`] is used (beyond, the gemm's reuse wins).
pub const MAX_ROWS: usize = 16;

/// Vocabulary rows per parallel task.
const VOCAB_PER_TASK: usize = 256;

/// Whether [`logits`] applies: a bf16 CPU model and at most [`MAX_ROWS`] positions.
pub fn applies(h: &Tensor, rows: usize) -> bool {
    h.device().is_cpu() && h.dtype() == DType::BF16 && rows <= MAX_ROWS
}

/// `h [rows, hidden] · Eᵀ` for the bf16 matrix `e [vocab, hidden]`, `[rows, vocab]` in f32: for a
/// bf16 `h` rounded to bf16 values (the bf16 matmul's output), for an f32 `h` (an f32 model whose
/// embedding is exactly bf16, `Embedding::exact_bf16`) the f32 sums themselves.
pub fn logits(h: &Tensor, e: &Tensor) -> Result<Tensor> {
    let round = h.dtype() == DType::BF16;
    let (rows, hidden) = h.dims2()?;
    let (vocab, eh) = e.dims2()?;
    if eh != hidden {
        candle_core::bail!("head: hidden {hidden} vs embedding {eh}");
    }
    let hv: Vec<f32> = h.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let e = e.contiguous()?;
    let (storage, layout) = e.storage_and_layout();
    let Storage::Cpu(CpuStorage::BF16(all)) = &*storage else {
        candle_core::bail!("head: bf16 CPU embedding expected")
    };
    let Some((a, b)) = layout.contiguous_offsets() else { candle_core::bail!("head: embedding not contiguous") };
    let ev = &all[a..b];
    // Transposed output [vocab, rows] so that tasks own whole slices.
    let mut t = vec![0f32; vocab * rows];
    t.par_chunks_mut(VOCAB_PER_TASK * rows).enumerate().for_each(|(task, dst)| {
        for (i, out) in dst.chunks_mut(rows).enumerate() {
            let v = task * VOCAB_PER_TASK + i;
            let erow = &ev[v * hidden..(v + 1) * hidden];
            for (r, o) in out.iter_mut().enumerate() {
                let x = dot(&hv[r * hidden..(r + 1) * hidden], erow);
                *o = if round { bf16::from_f32(x).to_f32() } else { x };
            }
        }
    });
    let mut y = vec![0f32; rows * vocab];
    for (v, col) in t.chunks(rows).enumerate() {
        for (r, &x) in col.iter().enumerate() {
            y[r * vocab + v] = x;
        }
    }
    Tensor::from_vec(y, (rows, vocab), h.device())
}

/// f32 dot product with a bf16 row widened on the fly; eight partial sums so that it
/// vectorises.
fn dot(x: &[f32], e: &[bf16]) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, ec) = (x.chunks_exact(8), e.chunks_exact(8));
    let (xr, er) = (xc.remainder(), ec.remainder());
    for (xs, es) in xc.zip(ec) {
        for i in 0..8 {
            acc[i] += xs[i] * f32::from_bits((es[i].to_bits() as u32) << 16);
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (a, b) in xr.iter().zip(er) {
        s += a * b.to_f32();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// f32 hidden states against a bf16-exact matrix: the f32 matmul's values up to summation order.
    #[test]
    fn f32_rows_match_the_f32_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 1.0, (2, 77), &dev)?;
        let e = Tensor::randn(0f32, 0.1, (500, 77), &dev)?.to_dtype(DType::BF16)?;
        let ours = logits(&h, &e)?.to_vec2::<f32>()?;
        let want = h.matmul(&e.to_dtype(DType::F32)?.t()?)?.to_vec2::<f32>()?;
        for (a, b) in ours.iter().flatten().zip(want.iter().flatten()) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn matches_the_widened_matmul_to_bf16_rounding() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 1.0, (3, 77), &dev)?.to_dtype(DType::BF16)?;
        let e = Tensor::randn(0f32, 0.1, (1000, 77), &dev)?.to_dtype(DType::BF16)?;
        let ours = logits(&h, &e)?.to_vec2::<f32>()?;
        let want = h.matmul(&e.t()?)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (a, b) in ours.iter().flatten().zip(want.iter().flatten()) {
            // Different f32 summation orders may round to neighbouring bf16 values.
            assert!((a - b).abs() <= b.abs() * 2f32.powi(-7) + 1e-6, "{a} vs {b}");
        }
        Ok(())
    }
}
