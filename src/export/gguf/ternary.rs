//! llama.cpp's ternary block types, written from their layout (ggml `block_tq1_0` /
//! `block_tq2_0`, 256 values per block, `d` an IEEE half at the end of the block); the value of
//! element `i` is `(trit_i − 1) · d` with `trit = code + 1 ∈ {0, 1, 2}`.
//!
//! **TQ2_0** (66 bytes): `qs[64]`, `d`. The block is two halves of 128 values; byte `m` of half
//! `h` (`qs[32h + m]`) holds the trits of elements `128h + m + 32l` in bits `2l..2l+2`, l = 0..4.
//!
//! **TQ1_0** (54 bytes): `qs[48]`, `qh[4]`, `d`. Five trits per byte in a fixed-point base-3
//! form: the trits `t₀..t₄` (t₀ most significant) give `v = Σ tₙ·3^(4−n)` and the byte stores
//! `⌈v·256/243⌉`; trit `n` is read back as `((byte·3ⁿ mod 256) · 3) >> 8`.
//! - `qs[0..32]`: byte `m` holds elements `m + 32n` (n = 0..5), elements 0..160;
//! - `qs[32..48]`: byte `32 + m` holds elements `160 + m + 16n`, elements 160..240;
//! - `qh[0..4]`: byte `j` holds elements `240 + j + 4n` (n = 0..4) as its first four trits
//!   (the fifth is 0), elements 240..256.

use anyhow::{ensure, Result};
use half::f16;

/// Values per block (ggml's `QK_K`).
pub const QK_K: usize = 256;
const TQ1_BYTES: usize = 54;
const TQ2_BYTES: usize = 66;

fn trit(c: i8) -> u8 {
    debug_assert!((-1..=1).contains(&c));
    (c + 1) as u8
}

/// `⌈v·256/243⌉` for `v < 243`: the fixed-point base-3 byte.
fn base3_byte(v: u16) -> u8 {
    ((v * 256).div_ceil(243)) as u8
}

/// Trit `n` (0 = most significant) of a base-3 byte.
fn base3_trit(b: u8, n: usize) -> u8 {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    let q = b.wrapping_mul(POW3[n]);
    ((q as u16 * 3) >> 8) as u8
}

/// Append the TQ2_0 blocks of `codes` (each −1, 0 or 1; a multiple of 256 values), scale `d`.
pub fn encode_tq2_0(codes: &[i8], d: f16, out: &mut Vec<u8>) {
    assert!(codes.len().is_multiple_of(QK_K));
    for block in codes.chunks_exact(QK_K) {
        for half in block.chunks_exact(128) {
            for m in 0..32 {
                let mut b = 0u8;
                for l in 0..4 {
                    b |= trit(half[m + 32 * l]) << (2 * l);
                }
                out.push(b);
            }
        }
        out.extend_from_slice(&d.to_le_bytes());
    }
}

/// Append the TQ1_0 blocks of `codes` (each −1, 0 or 1; a multiple of 256 values), scale `d`.
pub fn encode_tq1_0(codes: &[i8], d: f16, out: &mut Vec<u8>) {
    assert!(codes.len().is_multiple_of(QK_K));
    let pack = |idx: &mut dyn Iterator<Item = usize>, x: &[i8]| {
        let mut v = 0u16;
        let mut n = 0;
        for i in idx {
            v = v * 3 + trit(x[i]) as u16;
            n += 1;
        }
        for _ in n..5 {
            v *= 3; // fewer than five trits: the rest are zero (least significant)
        }
        base3_byte(v)
    };
    for x in codes.chunks_exact(QK_K) {
        for m in 0..32 {
            out.push(pack(&mut (0..5).map(|n| m + 32 * n), x));
        }
        for m in 0..16 {
            out.push(pack(&mut (0..5).map(|n| 160 + m + 16 * n), x));
        }
        for j in 0..4 {
            out.push(pack(&mut (0..4).map(|n| 240 + j + 4 * n), x));
        }
        out.extend_from_slice(&d.to_le_bytes());
    }
}

/// Ternary codes and block scales of TQ2_0 data holding `n` values.
pub fn decode_tq2_0(bytes: &[u8], n: usize) -> Result<(Vec<i8>, Vec<f16>)> {
    ensure!(
        n.is_multiple_of(QK_K) && bytes.len() == n / QK_K * TQ2_BYTES,
        "TQ2_0: {} bytes for {n} values",
        bytes.len()
    );
    let mut codes = vec![0i8; n];
    let mut scales = Vec::with_capacity(n / QK_K);
    for (b, x) in bytes.chunks_exact(TQ2_BYTES).zip(codes.chunks_exact_mut(QK_K)) {
        for h in 0..2 {
            for m in 0..32 {
                for l in 0..4 {
                    let t = (b[32 * h + m] >> (2 * l)) & 3;
                    ensure!(t != 3, "TQ2_0 holds the unused code 3");
                    x[128 * h + m + 32 * l] = t as i8 - 1;
                }
            }
        }
        scales.push(f16::from_le_bytes([b[64], b[65]]));
    }
    Ok((codes, scales))
}

/// Ternary codes and block scales of TQ1_0 data holding `n` values.
pub fn decode_tq1_0(bytes: &[u8], n: usize) -> Result<(Vec<i8>, Vec<f16>)> {
    ensure!(
        n.is_multiple_of(QK_K) && bytes.len() == n / QK_K * TQ1_BYTES,
        "TQ1_0: {} bytes for {n} values",
        bytes.len()
    );
    let mut codes = vec![0i8; n];
    let mut scales = Vec::with_capacity(n / QK_K);
    for (b, x) in bytes.chunks_exact(TQ1_BYTES).zip(codes.chunks_exact_mut(QK_K)) {
        for m in 0..32 {
            for n in 0..5 {
                x[m + 32 * n] = base3_trit(b[m], n) as i8 - 1;
            }
        }
        for m in 0..16 {
            for n in 0..5 {
                x[160 + m + 16 * n] = base3_trit(b[32 + m], n) as i8 - 1;
            }
        }
        for j in 0..4 {
            for n in 0..4 {
                x[240 + j + 4 * n] = base3_trit(b[48 + j], n) as i8 - 1;
            }
        }
        ensure!(x.iter().all(|&c| (-1..=1).contains(&c)), "TQ1_0 holds a trit outside 0..3");
        scales.push(f16::from_le_bytes([b[52], b[53]]));
    }
    Ok((codes, scales))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(n: usize, seed: u64) -> Vec<i8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) % 3) as i8 - 1
            })
            .collect()
    }

    #[test]
    fn tq2_0_round_trips_and_matches_the_layout() {
        let c = codes(512, 1);
        let mut out = Vec::new();
        encode_tq2_0(&c, f16::ONE, &mut out);
        assert_eq!(out.len(), 2 * 66);
        // Byte 0 of block 0 holds elements 0, 32, 64, 96 in bits 0-1, 2-3, 4-5, 6-7.
        let want = (0..4).map(|l| ((c[32 * l] + 1) as u8) << (2 * l)).sum::<u8>();
        assert_eq!(out[0], want);
        assert_eq!(&out[64..66], &f16::ONE.to_le_bytes());
        let (back, d) = decode_tq2_0(&out, 512).unwrap();
        assert_eq!(back, c);
        assert_eq!(d, vec![f16::ONE; 2]);
    }

    #[test]
    fn tq1_0_round_trips_every_trit_pattern() {
        // All 3^5 patterns in the first five-trit group, random elsewhere.
        for p in 0..243u32 {
            let mut c = codes(256, p as u64);
            let mut v = p;
            for n in (0..5).rev() {
                c[32 * n] = (v % 3) as i8 - 1;
                v /= 3;
            }
            let mut out = Vec::new();
            encode_tq1_0(&c, f16::from_f32(0.5), &mut out);
            assert_eq!(out.len(), 54);
            let (back, d) = decode_tq1_0(&out, 256).unwrap();
            assert_eq!(back, c, "pattern {p}");
            assert_eq!(d[0].to_f32(), 0.5);
        }
    }

    #[test]
    fn base3_bytes_decode() {
        // 2·81 + 1·27 + 0·9 + 2·3 + 1 = 196 → ⌈196·256/243⌉ = 207.
        let b = base3_byte(196);
        assert_eq!(b, 207);
        assert_eq!((0..5).map(|n| base3_trit(b, n)).collect::<Vec<_>>(), vec![2, 1, 0, 2, 1]);
    }
}
