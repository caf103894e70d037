//! The `model` artifact: a directory in Hugging Face layout (config.json, model.safetensors,
//! tokenizer files), plus `rpt-model.json` (how downstream stages must open it: dtype,
//! quantisation, and — for hub snapshots — the source directory it references instead of a copy)
//! and, after pruning, `mask.safetensors` (keep bits per projection, see [`super::mask`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::mask::Masks;
use crate::exec::InputArtifact;
use crate::model::{LoadOptions, Model, Quantization, TextTokenizer};

pub const SETTINGS_FILE: &str = "rpt-model.json";
pub const MASK_FILE: &str = "mask.safetensors";

/// How to open a model artifact.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelSettings {
    /// "f32" or "bf16".
    pub dtype: String,
    /// "ternary" or "none" (resolved at load time).
    pub quantization: String,
    /// The directory holding the weights when they are not copied into the entry (an immutable
    /// hub snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
    /// Fine-tune steps this model's lineage has had: where a chained fine-tune with
    /// `stream = "continue"` picks up the data stream, so each level trains on new batches.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub train_steps: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

pub fn dtype_of(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => bail!("dtype `{other}` is not f32 or bf16"),
    }
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// `cpu`, `cuda`, `cuda:N` → a candle device.
pub fn device(name: &str) -> Result<Device> {
    match name.split_once(':').unwrap_or((name, "0")) {
        ("cpu", _) => Ok(Device::Cpu),
        ("cuda", n) => {
            let ordinal: usize = n.parse().with_context(|| format!("device `{name}`"))?;
            Device::new_cuda(ordinal).with_context(|| {
                format!(
                    "opening {name}: needs a build with --features cuda (scripts/build-cuda.sh) and an NVIDIA driver"
                )
            })
        }
        _ => bail!("device `{name}` is not cpu, cuda or cuda:N"),
    }
}

/// A model artifact opened for use.
pub struct OpenModel {
    pub model: Model,
    pub tokenizer: Option<TextTokenizer>,
    /// Where config.json and the tokenizer files are.
    pub dir: PathBuf,
    pub settings: ModelSettings,
    /// blake3 of tokenizer.json (identifies the tokenizer for token caches).
    pub tokenizer_id: String,
}

impl OpenModel {
    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().with_context(|| format!("the model in {} has no tokenizer.json", self.dir.display()))
    }
}

pub fn read_settings(entry: &Path) -> Result<ModelSettings> {
    let path = entry.join(SETTINGS_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Opens the model of an input artifact on `device`.
pub fn open(input: &InputArtifact, device: &Device) -> Result<OpenModel> {
    open_dir(&input.dir, device, false)
}

/// Opens the model of an input artifact for inference only: a ternary f32 model on CPU keeps
/// just the kernel's packed projections (`LoadOptions::pack_for_inference`; the same outputs,
/// ~2 bits a weight instead of 32). For stages that only run the model forward.
pub fn open_for_inference(input: &InputArtifact, device: &Device) -> Result<OpenModel> {
    let open = open_dir(&input.dir, device, true)?;
    tracing::info!(
        packed = open.model.packed_for_inference(),
        projections_mb = open.model.projection_bytes() as f64 / 1e6,
        "model opened for inference (packed: only the CPU kernel's 2-bit form of the ternary projections is kept)"
    );
    Ok(open)
}

pub fn open_dir(entry: &Path, device: &Device, pack_for_inference: bool) -> Result<OpenModel> {
    let settings = read_settings(entry)?;
    let dir = settings.source.clone().unwrap_or_else(|| entry.to_path_buf());
    let opts = LoadOptions {
        dtype: dtype_of(&settings.dtype)?,
        device: device.clone(),
        quantization: Some(Quantization::parse(&settings.quantization)?),
        pack_for_inference,
    };
    let model = Model::from_dir(&dir, &opts).with_context(|| format!("loading the model in {}", dir.display()))?;
    warn_if_slow_on_cpu(&model);
    let tok_path = dir.join("tokenizer.json");
    let (tokenizer, tokenizer_id) = if tok_path.exists() {
        let id = blake3::hash(&std::fs::read(&tok_path)?).to_hex().to_string();
        (Some(TextTokenizer::from_file(&tok_path, model.config())?), id)
    } else {
        (None, String::new())
    };
    Ok(OpenModel { model, tokenizer, dir, settings, tokenizer_id })
}

/// Warns (once per process) when `model` runs in bf16 or f16 on the CPU: candle has no 16-bit
/// matrix product there (each one widens both operands to f32), and the int8 × 2-bit kernel of
/// ternary models runs in f32 only — the 2B model gets ~1 prompt token/s per thread that way
/// against ~25 in f32 on this project's machine (docs/benchmarks.md). The shipped pipelines load
/// in bf16 for the GPU.
pub fn warn_if_slow_on_cpu(model: &Model) {
    if let Some(msg) = slow_on_cpu(model.device(), model.dtype(), model.quantization()) {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| tracing::warn!("{msg}"));
    }
}

/// The advice of [`warn_if_slow_on_cpu`], if any.
pub fn slow_on_cpu(device: &Device, dtype: DType, quantization: Quantization) -> Option<String> {
    if !device.is_cpu() || !matches!(dtype, DType::BF16 | DType::F16) {
        return None;
    }
    let d = dtype.as_str();
    let (kernel, packed) = match quantization {
        Quantization::Ternary => (
            " and the int8 × 2-bit ternary kernel runs only in f32: about 25× slower for the 2B model",
            "; the evaluation stages then keep only the ternary projections' 2-bit form (~3 GB for the 2B model)",
        ),
        Quantization::None => ("", ""),
    };
    Some(format!(
        "the model runs in {d} on the CPU, where candle has no {d} matrix product (each one widens to \
         f32){kernel}. To run on a CPU, set `dtype = \"f32\"` in the pipeline's `load` stage (e.g. \
         `--set stages.<load stage>.dtype=f32`){packed}"
    ))
}

/// Saves `model` into `out` with its tokenizer files (copied from `aux_from`) and settings.
pub fn save(model: &Model, out: &Path, aux_from: Option<&Path>, settings: &ModelSettings) -> Result<()> {
    model.save_with_aux(out, aux_from).with_context(|| format!("saving the model to {}", out.display()))?;
    write_settings(out, settings)
}

pub fn write_settings(out: &Path, settings: &ModelSettings) -> Result<()> {
    std::fs::write(out.join(SETTINGS_FILE), serde_json::to_string_pretty(settings)?)?;
    Ok(())
}

/// The pruning masks of an artifact (projection name → keep bits), if it has any.
pub fn read_mask(entry: &Path) -> Result<Option<Masks>> {
    super::mask::read(&entry.join(MASK_FILE))
}

pub fn write_mask(out: &Path, masks: &Masks) -> Result<()> {
    super::mask::write(&out.join(MASK_FILE), masks)
}

/// Shares an unchanged file of an input entry with an output entry: a hard link where the
/// filesystem allows (entries are immutable, so nothing is stored twice), else a copy.
pub fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// How many of a latent projection's weights are 0 after ternary quantisation
/// (round-half-even(W/β) = 0 with β = mean|W|); `None` for packed codes.
pub fn ternary_zeros(w: &Tensor) -> Result<Option<u64>> {
    if w.dtype() == DType::U8 {
        return Ok(None); // packed: already ternary codes
    }
    let (codes, _) = crate::model::quant::ternarize(&w.to_dtype(DType::F32)?)?;
    Ok(Some(count_true(&codes.eq(0f64)?)?))
}

/// How many elements of a 0/1 U8 tensor are 1. Counted in integers: an f32 sum stops
/// counting at 2^24, fewer than one 2B MLP projection has (6912 × 2560).
pub fn count_true(flags: &Tensor) -> Result<u64> {
    Ok(flags.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? as u64)
}

/// Fraction of each projection's weights that are 0 after ternary quantisation, and the
/// overall fraction.
pub fn ternary_zero_fractions(model: &Model) -> Result<(BTreeMap<String, f64>, f64)> {
    let mut per = BTreeMap::new();
    let (mut zeros, mut total) = (0f64, 0f64);
    for name in model.projection_names() {
        let (z, n) = match model.kernel_zeros(&name)? {
            // Packed for inference: the kernel's codes are the ternarised weights.
            Some((z, n)) => (z as f64, n as f64),
            None => {
                let w = model.projection(&name)?;
                let Some(z) = ternary_zeros(&w)? else { continue };
                (z as f64, w.elem_count() as f64)
            }
        };
        per.insert(name, z / n);
        zeros += z;
        total += n;
    }
    Ok((per, if total > 0.0 { zeros / total } else { 0.0 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_beyond_what_an_f32_sum_can_hold() {
        let n = (1 << 24) + 3; // an f32 accumulator stops at 2^24
        let ones = Tensor::ones(n, DType::U8, &Device::Cpu).unwrap();
        assert_eq!(count_true(&ones).unwrap(), n as u64);
    }

    #[test]
    fn only_16_bit_models_on_the_cpu_are_warned_about() {
        let cpu = Device::Cpu;
        assert_eq!(slow_on_cpu(&cpu, DType::F32, Quantization::Ternary), None);
        for dtype in [DType::BF16, DType::F16] {
            let ternary = slow_on_cpu(&cpu, dtype, Quantization::Ternary).expect("a warning");
            assert!(ternary.contains(dtype.as_str()) && ternary.contains("ternary kernel"), "{ternary}");
            assert!(ternary.contains("dtype = \"f32\""), "{ternary}");
            let plain = slow_on_cpu(&cpu, dtype, Quantization::None).expect("a warning");
            assert!(!plain.contains("ternary") && plain.contains("dtype = \"f32\""), "{plain}");
        }
    }
}
