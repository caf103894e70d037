//! `exp(x − shift)` over f32 slices, 16 values at a time on CPUs with AVX-512F and 8 with AVX2 +
//! FMA, with the bits of the scalar `f32::exp` the fused ops used before (issue #18).
//!
//! The attention's softmax and the LM loss called libm's `expf` once per value: ~7 % of the
//! mid-size model's inference body and tens of milliseconds of every training step at vocab 32k.
//! glibc (since 2.28) computes `expf` with ARM's published algorithm (optimized-routines, also in
//! musl): in double precision, `x · 32/ln 2 = k + r`, `2^(k/32)` from a 32-entry table, a cubic in
//! `r`, one rounding to f32 at the end. On a CPU with FMA glibc runs a build whose compiler fused
//! the multiply–adds (read from its disassembly: `k` and `r` straight from `x · 32/ln 2` unrounded,
//! the cubic as three FMAs). [`exp_minus`] follows that build step for step on four (AVX2) or
//! eight (AVX-512) doubles per instruction, so its values are `f32::exp`'s bit for bit there
//! (the default test sweeps every 97th non-positive f32, the arguments the softmax and the loss
//! pass; an ignored one every f32). Arguments with `|x| ≥ 88` or NaN (glibc's special cases) go
//! to `f32::exp` itself; CPUs without AVX2 + FMA run `f32::exp` throughout, as before (glibc's
//! other build rounds each step, other bits).

/// `v[i] = exp(v[i] − shift)` (the subtraction in f32, then `f32::exp`'s bits; see the module doc).
pub(crate) fn exp_minus(v: &mut [f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    match vector_width() {
        // SAFETY: the CPU has AVX-512F (and AVX2 + FMA), checked.
        16 => return unsafe { fast::exp_minus_zmm(v, shift) },
        // SAFETY: the CPU has AVX2 and FMA, checked.
        8 => return unsafe { fast::exp_minus(v, shift) },
        _ => {}
    }
    v.iter_mut().for_each(|x| *x = (*x - shift).exp());
}

/// Floats per step of the vector loop this CPU runs: 16 with AVX-512F (the table read by two
/// register permutes), 8 with AVX2 + FMA (a gather), else 1 (`f32::exp`). Detected once.
#[cfg(target_arch = "x86_64")]
fn vector_width() -> usize {
    static WIDTH: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *WIDTH.get_or_init(|| {
        use std::arch::is_x86_feature_detected as has;
        match (has!("avx2") && has!("fma"), has!("avx512f")) {
            (true, true) => 16,
            (true, false) => 8,
            _ => 1,
        }
    })
}

#[cfg(target_arch = "x86_64")]
mod fast {
    use std::arch::x86_64::*;

    /// `32 / ln 2`: `1 / ln 2` rounded to double, times 32 (exact).
    const INV_LN2_N: f64 = f64::from_bits(0x3ff7_1547_652b_82fe) * 32.0;
    /// `1.5 · 2^52`: adding it rounds a double of magnitude below 2^51 to an integer, which then
    /// sits in the low bits of the sum's encoding.
    const SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000);
    /// The cubic for `2^(r/32)` in `r`: the published minimax coefficients of `2^x` on
    /// `[−1/2, 1/2]`, scaled by `32^-3`, `32^-2`, `32^-1` (exact).
    const C0: f64 = f64::from_bits(0x3fac_6af8_4b91_2394) / 32768.0;
    const C1: f64 = f64::from_bits(0x3fce_bfce_50fa_c4f3) / 1024.0;
    const C2: f64 = f64::from_bits(0x3fe6_2e42_ff0c_52d6) / 32.0;

    /// `2^(i/32)` rounded to double, less `i << 47` (so that adding `k << 47` for `k ≡ i mod 32`
    /// scales it by `2^⌊k/32⌋`); computed here from exact decimal expansions, and checked in
    /// the tests against `f64::exp2`.
    pub(super) static TABLE: [u64; 32] = [
        0x3ff0000000000000,
        0x3fefd9b0d3158574,
        0x3fefb5586cf9890f,
        0x3fef9301d0125b51,
        0x3fef72b83c7d517b,
        0x3fef54873168b9aa,
        0x3fef387a6e756238,
        0x3fef1e9df51fdee1,
        0x3fef06fe0a31b715,
        0x3feef1a7373aa9cb,
        0x3feedea64c123422,
        0x3feece086061892d,
        0x3feebfdad5362a27,
        0x3feeb42b569d4f82,
        0x3feeab07dd485429,
        0x3feea47eb03a5585,
        0x3feea09e667f3bcd,
        0x3fee9f75e8ec5f74,
        0x3feea11473eb0187,
        0x3feea589994cce13,
        0x3feeace5422aa0db,
        0x3feeb737b0cdc5e5,
        0x3feec49182a3f090,
        0x3feed503b23e255d,
        0x3feee89f995ad3ad,
        0x3feeff76f2fb5e47,
        0x3fef199bdd85529c,
        0x3fef3720dcef9069,
        0x3fef5818dcfba487,
        0x3fef7c97337b9b5f,
        0x3fefa4afa2a490da,
        0x3fefd0765b6e4540,
    ];

    /// Below this `|x|` (and not NaN) the table path holds; from it on, glibc's special cases.
    const SPECIAL: f32 = 88.0;

    /// One value: the same steps as [`exp4`] on scalars (`mul_add` is an FMA instruction here).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp1(x: f32) -> f32 {
        if x.is_nan() || x.abs() >= SPECIAL {
            return x.exp();
        }
        let xd = x as f64;
        let kd = INV_LN2_N.mul_add(xd, SHIFT);
        let ki = kd.to_bits();
        let kd = kd - SHIFT;
        let r = INV_LN2_N.mul_add(xd, -kd);
        let s = f64::from_bits(TABLE[(ki % 32) as usize].wrapping_add(ki << 47));
        let z = C0.mul_add(r, C1);
        let y = C2.mul_add(r, 1.0);
        (z.mul_add(r * r, y) * s) as f32
    }

    /// Four values in double precision (`|x| < 88`), as glibc's FMA build of `expf`.
    #[target_feature(enable = "avx2,fma")]
    fn exp4(xd: __m256d) -> __m256d {
        let kd = _mm256_fmadd_pd(_mm256_set1_pd(INV_LN2_N), xd, _mm256_set1_pd(SHIFT));
        let ki = _mm256_castpd_si256(kd);
        let kd = _mm256_sub_pd(kd, _mm256_set1_pd(SHIFT));
        let r = _mm256_fmsub_pd(_mm256_set1_pd(INV_LN2_N), xd, kd);
        let i = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
        // SAFETY: every index is below 32, the table's length.
        let t = unsafe { _mm256_i64gather_epi64::<8>(TABLE.as_ptr() as *const i64, i) };
        let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
        let z = _mm256_fmadd_pd(_mm256_set1_pd(C0), r, _mm256_set1_pd(C1));
        let y = _mm256_fmadd_pd(_mm256_set1_pd(C2), r, _mm256_set1_pd(1.0));
        let y = _mm256_fmadd_pd(z, _mm256_mul_pd(r, r), y);
        _mm256_mul_pd(y, s)
    }

    /// Eight values in double precision (`|x| < 88`), as [`exp4`]; the table read by two
    /// permutes of its halves (index bits 0–3) and a blend on bit 4.
    #[target_feature(enable = "avx512f")]
    fn exp8(xd: __m512d) -> __m512d {
        let kd = _mm512_fmadd_pd(_mm512_set1_pd(INV_LN2_N), xd, _mm512_set1_pd(SHIFT));
        let ki = _mm512_castpd_si512(kd);
        let kd = _mm512_sub_pd(kd, _mm512_set1_pd(SHIFT));
        let r = _mm512_fmsub_pd(_mm512_set1_pd(INV_LN2_N), xd, kd);
        // SAFETY: four 8-entry quarters of the 32-entry table.
        let quarter = |q: usize| unsafe { _mm512_loadu_si512(TABLE[8 * q..].as_ptr() as *const _) };
        let low = _mm512_permutex2var_epi64(quarter(0), ki, quarter(1));
        let high = _mm512_permutex2var_epi64(quarter(2), ki, quarter(3));
        let t = _mm512_mask_blend_epi64(_mm512_test_epi64_mask(ki, _mm512_set1_epi64(16)), low, high);
        let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
        let z = _mm512_fmadd_pd(_mm512_set1_pd(C0), r, _mm512_set1_pd(C1));
        let y = _mm512_fmadd_pd(_mm512_set1_pd(C2), r, _mm512_set1_pd(1.0));
        let y = _mm512_fmadd_pd(z, _mm512_mul_pd(r, r), y);
        _mm512_mul_pd(y, s)
    }

    /// [`super::exp_minus`] on AVX-512F, sixteen values a step; the rest as [`exp_minus`].
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub(super) fn exp_minus_zmm(v: &mut [f32], shift: f32) {
        let sub = _mm512_set1_ps(shift);
        let special = _mm512_set1_ps(SPECIAL);
        let mut chunks = v.chunks_exact_mut(16);
        for c in &mut chunks {
            // SAFETY: 16 values.
            let x = _mm512_sub_ps(unsafe { _mm512_loadu_ps(c.as_ptr()) }, sub);
            // Lanes not below 88 in magnitude, NaN included (unordered compares true).
            if _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(_mm512_abs_ps(x), special) != 0 {
                let mut xs = [0f32; 16];
                // SAFETY: 16 values.
                unsafe { _mm512_storeu_ps(xs.as_mut_ptr(), x) };
                for (d, x) in c.iter_mut().zip(xs) {
                    *d = exp1(x);
                }
                continue;
            }
            let halves = _mm512_castps_pd(x);
            let lo = exp8(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_castpd512_pd256(halves))));
            let hi = exp8(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(halves))));
            let y = _mm512_insertf64x4::<1>(
                _mm512_castpd256_pd512(_mm256_castps_pd(_mm512_cvtpd_ps(lo))),
                _mm256_castps_pd(_mm512_cvtpd_ps(hi)),
            );
            // SAFETY: 16 values.
            unsafe { _mm512_storeu_ps(c.as_mut_ptr(), _mm512_castpd_ps(y)) };
        }
        exp_minus(chunks.into_remainder(), shift);
    }

    /// [`super::exp_minus`] on AVX2 + FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_minus(v: &mut [f32], shift: f32) {
        let sub = _mm256_set1_ps(shift);
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let special = _mm256_set1_ps(SPECIAL);
        let mut chunks = v.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: 8 values.
            let x = _mm256_sub_ps(unsafe { _mm256_loadu_ps(c.as_ptr()) }, sub);
            // Lanes not below 88 in magnitude, NaN included (unordered compares true).
            let odd = _mm256_cmp_ps::<_CMP_NLT_UQ>(_mm256_and_ps(x, abs), special);
            if _mm256_movemask_ps(odd) != 0 {
                let mut xs = [0f32; 8];
                // SAFETY: 8 values.
                unsafe { _mm256_storeu_ps(xs.as_mut_ptr(), x) };
                for (d, x) in c.iter_mut().zip(xs) {
                    *d = exp1(x);
                }
                continue;
            }
            let lo = exp4(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
            let hi = exp4(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x)));
            let y = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
            // SAFETY: 8 values.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), y) };
        }
        for x in chunks.into_remainder() {
            *x = exp1(*x - shift);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `f32::exp` here is glibc's FMA build, which [`exp_minus`] reproduces: glibc on
    /// x86-64 with AVX2 + FMA. Elsewhere the values are compared to a tolerance only.
    fn libm_is_glibc_fma() -> bool {
        #[cfg(all(target_arch = "x86_64", target_env = "gnu"))]
        return vector_width() >= 8;
        #[allow(unreachable_code)]
        false
    }

    /// Each loop this CPU runs: the public dispatch, and the 8-wide loop on an AVX-512 CPU too.
    fn loops() -> Vec<fn(&mut [f32], f32)> {
        let mut v: Vec<fn(&mut [f32], f32)> = vec![exp_minus];
        #[cfg(target_arch = "x86_64")]
        if vector_width() == 16 {
            // SAFETY: the CPU has AVX2 and FMA (it has the wider loop).
            v.push(|x, s| unsafe { fast::exp_minus(x, s) });
        }
        v
    }

    fn check(xs: &[f32]) {
        for f in loops() {
            check_loop(xs, f);
        }
    }

    fn check_loop(xs: &[f32], f: fn(&mut [f32], f32)) {
        let mut got = xs.to_vec();
        f(&mut got, 0.0);
        for (&x, &g) in xs.iter().zip(&got) {
            let want = x.exp();
            if libm_is_glibc_fma() {
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "exp({x:e}) = {g:e}, libm {want:e}"
                );
            } else {
                assert!(
                    (g - want).abs() <= want.abs() * 4e-7 || (g.is_nan() && want.is_nan()),
                    "exp({x:e}) = {g:e}, libm {want:e}"
                );
            }
        }
    }

    /// The table is `2^(i/32)` as `f64::exp2` rounds it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_table_holds_two_to_the_i_over_32() {
        for (i, &t) in fast::TABLE.iter().enumerate() {
            assert_eq!(t.wrapping_add((i as u64) << 47), (i as f64 / 32.0).exp2().to_bits(), "entry {i}");
        }
    }

    /// libm's bits on a sweep of every 97th f32 from −0 down to −∞ (the softmax's and the loss's
    /// arguments, `x − max ≤ 0`), every 997th positive one, the special values, and slices whose
    /// lengths leave remainders; `shift` subtracted in f32 first.
    #[test]
    fn equals_libm() {
        let negative: Vec<f32> = (0x8000_0000u32..=0xff80_0000).step_by(97).map(f32::from_bits).collect();
        check(&negative);
        let positive: Vec<f32> = (0u32..=0x7f80_0000).step_by(997).map(f32::from_bits).collect();
        check(&positive);
        check(&[
            0.0,
            -0.0,
            f32::NAN,
            f32::NEG_INFINITY,
            f32::INFINITY,
            -87.9,
            -88.0,
            -103.9,
            -104.0,
            88.7,
            89.0,
            1e-30,
        ]);
        for n in [1, 7, 9, 17, 33] {
            let xs: Vec<f32> = (0..n).map(|i| -(i as f32) * 0.37).collect();
            check(&xs);
            let mut shifted: Vec<f32> = xs.iter().map(|x| x + 2.5).collect();
            exp_minus(&mut shifted, 2.5);
            let want: Vec<u32> = xs.iter().map(|x| ((x + 2.5) - 2.5f32).exp().to_bits()).collect();
            if libm_is_glibc_fma() {
                assert_eq!(shifted.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want);
            }
        }
    }

    /// Every f32, through each loop this CPU runs (`cargo test --release --lib -- --ignored
    /// exp_minus_equals_libm_on_every_f32`: 90 s on a Zen 5 for both loops).
    #[test]
    #[ignore]
    fn exp_minus_equals_libm_on_every_f32() {
        for high in 0..256u32 {
            let xs: Vec<f32> = (0..1u32 << 24).map(|low| f32::from_bits(high << 24 | low)).collect();
            check(&xs);
        }
    }
}
