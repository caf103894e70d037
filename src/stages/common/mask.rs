//! Pruning masks stored as bits.
//!
//! `mask.safetensors` holds one U8 tensor per pruned projection `[rows, cols]`: its
//! `⌈rows·cols/8⌉` bytes pack the row-major keep flags, weight `i` in bit `i % 8` of byte `i / 8`
//! (1 = kept, 0 = pruned). The file's one metadata entry, `rpt-mask.bits-v1`, names the format
//! and holds each projection's shape (one entry: safetensors writes its metadata map in hash
//! order, and the file must be the same bytes every time it is written). A
//! byte per weight would cost 2.1 GB per level for the 2B model; bits cost 262 MB.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use candle_core::{Device, Tensor};

/// The metadata key that names the format; its value maps projection names to [rows, cols].
pub const FORMAT_KEY: &str = "rpt-mask.bits-v1";

/// The keep flags of one projection.
#[derive(Clone, Debug, PartialEq)]
pub struct Mask {
    rows: usize,
    cols: usize,
    bits: Vec<u8>,
}

impl Mask {
    /// Packs keep flags (nonzero = kept), row-major.
    pub fn from_keep(keep: &[u8], rows: usize, cols: usize) -> Result<Mask> {
        if keep.len() != rows * cols {
            bail!("a mask of {} flags for a [{rows}, {cols}] projection", keep.len());
        }
        let mut bits = vec![0u8; keep.len().div_ceil(8)];
        for (i, &k) in keep.iter().enumerate() {
            bits[i / 8] |= u8::from(k != 0) << (i % 8);
        }
        Ok(Mask { rows, cols, bits })
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// One byte per weight, 1 = kept.
    pub fn to_keep(&self) -> Vec<u8> {
        (0..self.rows * self.cols).map(|i| (self.bits[i / 8] >> (i % 8)) & 1).collect()
    }

    /// How many weights are pruned.
    pub fn pruned(&self) -> u64 {
        let kept: u64 = self.bits.iter().map(|b| b.count_ones() as u64).sum();
        (self.rows * self.cols) as u64 - kept
    }

    /// The flags as a U8 tensor `[rows, cols]` (1 = kept) on `device`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.to_keep(), (self.rows, self.cols), &Device::Cpu)?.to_device(device)?)
    }
}

/// Projection name → mask.
pub type Masks = BTreeMap<String, Mask>;

/// Reads a mask file; `None` when there is none.
pub fn read(path: &Path) -> Result<Option<Masks>> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let Some(shapes) = meta.get(FORMAT_KEY) else {
        bail!(
            "{}: not a bit-packed mask (no `{FORMAT_KEY}` metadata; written by an older rpt-flow?): \
             `rpt-flow cache gc` removes such entries and a re-run prunes again",
            path.display()
        );
    };
    let shapes: HashMap<String, (usize, usize)> = serde_json::from_str(shapes)
        .with_context(|| format!("{}: the `{FORMAT_KEY}` metadata is not a name → [rows, cols] map", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    let mut masks = Masks::new();
    for (name, view) in st.tensors() {
        let &(rows, cols) =
            shapes.get(&name).with_context(|| format!("{}: no shape recorded for `{name}`", path.display()))?;
        if view.dtype() != safetensors::Dtype::U8 || view.data().len() != (rows * cols).div_ceil(8) {
            bail!(
                "{}: `{name}` is not {} packed bytes for [{rows}, {cols}]",
                path.display(),
                (rows * cols).div_ceil(8)
            );
        }
        masks.insert(name, Mask { rows, cols, bits: view.data().to_vec() });
    }
    Ok(Some(masks))
}

/// Writes `masks` to `path`.
pub fn write(path: &Path, masks: &Masks) -> Result<()> {
    let shapes: BTreeMap<&str, (usize, usize)> = masks.iter().map(|(n, m)| (n.as_str(), (m.rows, m.cols))).collect();
    let meta: HashMap<String, String> = [(FORMAT_KEY.to_string(), serde_json::to_string(&shapes)?)].into();
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = masks
        .iter()
        .map(|(n, m)| {
            Ok((n.as_str(), safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![m.bits.len()], &m.bits)?))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, Some(meta), path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip_through_a_file() {
        let keep: Vec<u8> = (0..3 * 7).map(|i| u8::from(i % 3 != 0)).collect();
        let m = Mask::from_keep(&keep, 3, 7).unwrap();
        assert_eq!(m.bits.len(), 3, "21 flags in 3 bytes");
        assert_eq!(m.to_keep(), keep);
        assert_eq!(m.pruned(), 7);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mask.safetensors");
        let masks: Masks = [("a".to_string(), m.clone())].into();
        write(&path, &masks).unwrap();
        assert_eq!(read(&path).unwrap().unwrap(), masks);
        assert!(read(&dir.path().join("none")).unwrap().is_none());
        let t = m.to_tensor(&Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 7]);
        assert_eq!(t.flatten_all().unwrap().to_vec1::<u8>().unwrap(), keep);
    }

    #[test]
    fn the_same_masks_are_the_same_bytes_every_time() {
        let masks: Masks =
            ["b", "a", "c"].iter().map(|n| (n.to_string(), Mask::from_keep(&[1, 0, 1, 1], 2, 2).unwrap())).collect();
        let dir = tempfile::tempdir().unwrap();
        let bytes = |i: usize| {
            let path = dir.path().join(format!("m{i}.safetensors"));
            write(&path, &masks).unwrap();
            std::fs::read(path).unwrap()
        };
        let first = bytes(0);
        assert!((1..8).all(|i| bytes(i) == first), "a mask file must be deterministic (cache content)");
    }

    #[test]
    fn a_byte_per_weight_mask_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mask.safetensors");
        let t = Tensor::from_vec(vec![1u8; 6], (2, 3), &Device::Cpu).unwrap();
        candle_core::safetensors::save(&[("a".to_string(), t)].into_iter().collect::<HashMap<_, _>>(), &path).unwrap();
        let err = format!("{:#}", read(&path).unwrap_err());
        assert!(err.contains("not a bit-packed mask") && err.contains("gc"), "{err}");
    }
}
