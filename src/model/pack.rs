//! 2-bit packing of ternary weights (transformers `pack_weights` / `unpack_weights`, notes §4.2).
//!
//! `P = out/4` packed rows; byte `[r][c]` holds the codes (`w + 1 ∈ {0,1,2}`) of rows
//! `r, P + r, 2P + r, 3P + r` of column `c`, least significant bits first.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Unpack `[rows, cols]` bytes into `[4·rows, cols]` ternary values (row-major).
pub fn unpack(bytes: &[u8], rows: usize, cols: usize) -> Result<Vec<f32>> {
    if bytes.len() != rows * cols {
        bail!("packed weight has {} bytes, expected {rows}×{cols}", bytes.len());
    }
    let mut out = vec![0f32; 4 * rows * cols];
    for i in 0..4 {
        let dst = &mut out[i * rows * cols..(i + 1) * rows * cols];
        for (d, b) in dst.iter_mut().zip(bytes) {
            let code = (b >> (2 * i)) & 3;
            if code == 3 {
                bail!("packed weight holds the unused code 3");
            }
            *d = code as f32 - 1.0;
        }
    }
    Ok(out)
}

/// Pack `[out, cols]` ternary values (row-major, each in {-1, 0, 1}) into `[out/4, cols]` bytes.
pub fn pack(values: &[f32], out: usize, cols: usize) -> Result<Vec<u8>> {
    if !out.is_multiple_of(4) || values.len() != out * cols {
        bail!("cannot pack a [{out}, {cols}] weight (out must be a multiple of 4)");
    }
    let rows = out / 4;
    let mut bytes = vec![0u8; rows * cols];
    for i in 0..4 {
        let src = &values[i * rows * cols..(i + 1) * rows * cols];
        for (b, &v) in bytes.iter_mut().zip(src) {
            let code = match v {
                -1.0 => 0u8,
                0.0 => 1,
                1.0 => 2,
                other => bail!("cannot pack non-ternary value {other}"),
            };
            *b |= code << (2 * i);
        }
    }
    Ok(bytes)
}

/// Pack a tensor of ternary codes `[out, in]` into `u8 [out/4, in]`.
pub(crate) fn pack_tensor(codes: &Tensor) -> Result<Tensor> {
    let (out, cols) = codes.dims2()?;
    let vals = codes.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let bytes = pack(&vals, out, cols)?;
    Ok(Tensor::from_vec(bytes, (out / 4, cols), codes.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_test_vectors() {
        let t = unpack(&[0b10100001, 0b00011000, 0b10010000, 0b00001010], 2, 2).unwrap();
        let want = [[0., -1.], [-1., 1.], [-1., 1.], [-1., 1.], [1., 0.], [0., -1.], [1., -1.], [1., -1.]];
        assert_eq!(t, want.concat());
        let t = unpack(&[134, 137, 100, 97], 1, 4).unwrap();
        let want = [[1., 0., -1., 0.], [0., 1., 0., -1.], [-1., -1., 1., 1.], [1., 1., 0., 0.]];
        assert_eq!(t, want.concat());
        assert_eq!(pack(&t, 4, 4).unwrap(), vec![134, 137, 100, 97]);
    }
}
