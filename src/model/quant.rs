//! BitNet b1.58 quantisers (notes §3), computed in f32 exactly as transformers'
//! `WeightQuant` / `ActQuant` do, and cast back to the input dtype.
//!
//! Rounding is half-to-even like `torch.round`. candle's `round` rounds half away from zero, so we
//! use the exact f32 identity `rne(x) = (x + 1.5·2²³) − 1.5·2²³`, valid for |x| ≤ 2²², after
//! clamping `x` into a range where the final clamp gives the same answer. It uses only `affine` and
//! `clamp`, so it runs on every device.

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor, D};
use half::bf16;
use rayon::prelude::*;

/// 1.5 · 2²³: adding and subtracting it rounds an f32 with |x| ≤ 2²² to the nearest integer,
/// ties to even (IEEE round-to-nearest-even of the addition).
const RNE_MAGIC: f64 = 12_582_912.0;

/// Round half to even, elementwise, for an f32 tensor whose values lie in [-2²², 2²²].
pub fn round_half_even(x: &Tensor) -> Result<Tensor> {
    debug_assert_eq!(x.dtype(), DType::F32);
    x.affine(1.0, RNE_MAGIC)?.affine(1.0, -RNE_MAGIC)
}

/// Minimum of the scales' denominators (transformers: `clamp_(min=1e-5)`).
const EPS: f64 = 1e-5;

/// Per-tensor absmean scale `s = 1 / max(mean|W|, 1e-5)` as a `[1, 1]` f32 tensor (broadcastable).
pub fn weight_inv_scale(w: &Tensor) -> Result<Tensor> {
    // torch sums in f32 with its own (cascaded) order, so β can differ from ours in the last
    // bit; that only matters if ±β sits on a bf16 rounding boundary.
    let beta = w.to_dtype(DType::F32)?.abs()?.mean_all()?.clamp(EPS, f64::INFINITY)?;
    beta.recip()?.reshape((1, 1))
}

/// Ternary codes `T = clamp(round(W·s), −1, 1)` (f32) and `s` for a 2-D weight.
pub fn ternarize(w: &Tensor) -> Result<(Tensor, Tensor)> {
    let s = weight_inv_scale(w)?;
    let ws = w.to_dtype(DType::F32)?.broadcast_mul(&s)?.clamp(-2.0, 2.0)?;
    let t = round_half_even(&ws)?.clamp(-1.0, 1.0)?;
    Ok((t, s))
}

/// Weight fake-quant `Ŵ = T / s` (notes §3.2), cast back to the weight's dtype.
pub fn weight_fake_quant(w: &Tensor) -> Result<Tensor> {
    let (t, s) = ternarize(w)?;
    t.broadcast_div(&s)?.to_dtype(w.dtype())
}

/// Per-token absmax activation fake-quant (notes §3.1): `s = 127 / max(max|x|, 1e-5)` over the
/// last dim, `x̂ = clamp(round(x·s), −128, 127) / s`, cast back to the activation dtype.
///
/// On CPU this is one fused pass ([`ActQuantCpu`], no backward: use it under [`ste`]); elsewhere
/// the composed form [`act_fake_quant_composed`]. Both are bit-identical (tested).
pub fn act_fake_quant(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::BF16) {
        x.contiguous()?.apply_op1_no_bwd(&ActQuantCpu)
    } else {
        act_fake_quant_composed(x)
    }
}

/// [`act_fake_quant`] from candle ops (any device).
pub fn act_fake_quant_composed(x: &Tensor) -> Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?;
    let gamma = xf.abs()?.max_keepdim(D::Minus1)?.clamp(EPS, f64::INFINITY)?;
    // torch evaluates `127 / gamma` as `reciprocal(gamma) * 127` (two roundings); so do we, or
    // exact .5 ties (common with bf16 inputs) round differently.
    let s = (gamma.recip()? * 127.0)?;
    let q = xf.broadcast_mul(&s)?.clamp(-129.0, 128.0)?;
    let q = round_half_even(&q)?.clamp(-128.0, 127.0)?;
    q.broadcast_div(&s)?.to_dtype(x.dtype())
}

/// Fused CPU activation fake-quant, row by row over the last dimension.
pub struct ActQuantCpu;

/// The activation quantiser's scale of one row: `s = (1 / max(max|x|, 1e-5)) · 127` (torch's two
/// roundings). Shared with the int8 kernel (`ternary_kernel.rs`), so both quantise identically.
#[inline]
pub(crate) fn act_scale(row: &[f32]) -> f32 {
    act_scale_iter(row.iter().copied())
}

fn act_scale_iter(src: impl Iterator<Item = f32>) -> f32 {
    act_scale_of_max(src.fold(0f32, |m, v| m.max(v.abs())))
}

/// The activation scale `127 / max(g, ε)` of a row whose largest magnitude is `g`.
#[inline]
pub(crate) fn act_scale_of_max(g: f32) -> f32 {
    (1.0 / g.max(EPS as f32)) * 127.0
}

/// Round half to even of one f32 with |x| ≤ 2²² (the identity of [`round_half_even`]).
#[inline]
pub(crate) fn rne(x: f32) -> f32 {
    (x + RNE_MAGIC as f32) - RNE_MAGIC as f32
}

/// The integer code `clamp(round_half_even(v·s), −128, 127)` (as f32).
#[inline]
pub(crate) fn act_code(v: f32, s: f32) -> f32 {
    // Same identity as `round_half_even` (vectorises; `round_ties_even` is a libm call without
    // SSE4.1).
    rne((v * s).clamp(-129.0, 128.0)).clamp(-128.0, 127.0)
}

fn act_quant_row(src: impl Iterator<Item = f32> + Clone, mut put: impl FnMut(usize, f32)) {
    let s = act_scale_iter(src.clone());
    for (i, v) in src.enumerate() {
        put(i, act_code(v, s) / s);
    }
}

impl candle_core::CustomOp1 for ActQuantCpu {
    fn name(&self) -> &'static str {
        "bitnet-act-fake-quant"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dim = *layout.dims().last().unwrap_or(&1);
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("act-quant: input must be contiguous")
        };
        let out = match storage {
            CpuStorage::F32(v) => {
                let src = &v[start..end];
                let mut dst = vec![0f32; src.len()];
                dst.par_chunks_mut(dim.max(1))
                    .zip(src.par_chunks(dim.max(1)))
                    .for_each(|(d, r)| act_quant_row(r.iter().copied(), |i, y| d[i] = y));
                CpuStorage::F32(dst)
            }
            CpuStorage::BF16(v) => {
                let src = &v[start..end];
                let mut dst = vec![bf16::ZERO; src.len()];
                dst.par_chunks_mut(dim.max(1))
                    .zip(src.par_chunks(dim.max(1)))
                    .for_each(|(d, r)| act_quant_row(r.iter().map(|x| x.to_f32()), |i, y| d[i] = bf16::from_f32(y)));
                CpuStorage::BF16(dst)
            }
            _ => candle_core::bail!("act-quant: f32 or bf16 only"),
        };
        Ok((out, layout.shape().clone()))
    }
}

/// Straight-through estimator: the value of `q`, the gradient of `x`.
///
/// Written `q.detach() + (x − x.detach())` rather than `x + (q − x).detach()`: the second term is
/// exactly zero, so the forward value is exactly `q` in every dtype (the usual form rounds twice
/// in bf16).
pub fn ste(x: &Tensor, q: &Tensor) -> Result<Tensor> {
    q.detach() + (x - x.detach())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rounds_ties_to_even() -> Result<()> {
        let x = Tensor::new(&[0.5f32, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 126.5, -127.5, 3.7], &Device::Cpu)?;
        let r: Vec<f32> = round_half_even(&x)?.to_vec1()?;
        assert_eq!(r, vec![0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 0.0, 126.0, -128.0, 4.0]);
        Ok(())
    }

    #[test]
    fn fused_act_quant_matches_composed() -> Result<()> {
        let dev = Device::Cpu;
        // Includes exact .5 ties after scaling (bf16 inputs make them common) and a zero row.
        let x = (Tensor::randn(0f32, 1.0, (7, 33), &dev)? * 3.0)?;
        let x = Tensor::cat(&[&x, &Tensor::zeros((1, 33), DType::F32, &dev)?], 0)?;
        for dt in [DType::F32, DType::BF16] {
            let x = x.to_dtype(dt)?;
            let a = act_fake_quant(&x)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let b = act_fake_quant_composed(&x)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            assert_eq!(a, b, "{dt:?}");
        }
        Ok(())
    }

    #[test]
    fn weight_quant_is_ternary_times_absmean() -> Result<()> {
        let w = Tensor::new(&[[0.2f32, -0.9], [0.05, 1.7]], &Device::Cpu)?;
        let (t, s) = ternarize(&w)?;
        let beta = (0.2 + 0.9 + 0.05 + 1.7) / 4.0;
        assert!((1.0 / s.flatten_all()?.to_vec1::<f32>()?[0] - beta).abs() < 1e-6);
        assert_eq!(t.to_vec2::<f32>()?, vec![vec![0.0, -1.0], vec![0.0, 1.0]]);
        Ok(())
    }
}
