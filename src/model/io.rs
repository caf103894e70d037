//! Checkpoint io: load a Hugging Face layout directory (single or sharded safetensors,
//! memory-mapped; latent or packed projections), random initialisation, and save.
//!
//! No tensor name is spelled here: the expected layout is what [`Model::build`] asks for (run
//! against a [`Recorder`]), and saving writes the names the layers stored.

use super::causal_lm::Model;
use super::config::{Arch, ModelConfig, Quantization, WeightFormat};
use super::vb::{Recorder, Role, Source};
use crate::rng::{SplitMix64, DRAWS_PER_NORMAL};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype: `F32` or `BF16` (`F16` is refused for bitnet: relu² overflows).
    pub dtype: DType,
    pub device: Device,
    /// `None` = as transformers decides from config.json (see [`ModelConfig::default_quantization`]).
    pub quantization: Option<Quantization>,
    /// For inference on CPU in f32: keep only the int8 kernel's packed form of each ternary
    /// projection, packed as it loads (2 bits a weight instead of 32; the same outputs). The
    /// model then cannot be trained, changed or saved. Ignored for other dtypes and devices.
    pub pack_for_inference: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: DType::F32, device: Device::Cpu, quantization: None, pack_for_inference: false }
    }
}

/// Tokenizer and generation files copied next to a saved model when present in the source.
pub const AUX_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// The checkpoint tensors `cfg` calls for, in load order: name, in-memory shape and role.
fn layout(cfg: &ModelConfig) -> Result<Vec<(String, Vec<usize>, Role)>> {
    let mut rec = Recorder::default();
    Model::build(&mut rec, cfg.clone(), cfg.default_quantization, DType::F32, &Device::Cpu, false)?;
    Ok(rec.asked)
}

/// A checked checkpoint's tensors, read from the mapped files and converted when asked for.
struct Checkpoint<'a> {
    st: &'a candle_core::safetensors::MmapedSafetensors,
    /// Name → (shape in the file, role), as `from_dir` checked them.
    want: &'a BTreeMap<String, (Vec<usize>, Role)>,
    /// Name → (shape, dtype) in the file.
    present: &'a BTreeMap<String, (Vec<usize>, safetensors::Dtype)>,
    opts: &'a LoadOptions,
}

impl Source for Checkpoint<'_> {
    fn get(&mut self, name: &str, _: &[usize], _: Role) -> Result<Tensor> {
        let (st, opts) = (self.st, self.opts);
        let role = &self.want.get(name).with_context(|| format!("missing tensor {name}"))?.1;
        let dt = &self.present[name].1;
        let t = st.load(name, &opts.device).with_context(|| format!("loading {name}"))?;
        let t = if *role == Role::Codes {
            if *dt != safetensors::Dtype::U8 {
                bail!("{name}: packed projection must be U8, found {dt:?}");
            }
            let bytes = t.flatten_all()?.to_vec1::<u8>()?;
            if bytes.iter().all(|&b| b == 0b0101_0101) {
                bail!("{name}: projection is entirely zero (a known corrupted hub revision; pin an intact revision)");
            }
            let (rows, cols) = t.dims2()?;
            let vals = super::pack::unpack(&bytes, rows, cols).with_context(|| name.to_string())?;
            Tensor::from_vec(vals, (rows * 4, cols), &opts.device)?.to_dtype(opts.dtype)?
        } else if *role == Role::Scale {
            t.to_dtype(opts.dtype)?.reshape(1)?
        } else if *role == Role::Holographic {
            t.to_dtype(DType::F32)?
        } else {
            if *role == Role::Projection && t.abs()?.to_dtype(DType::F32)?.max_all()?.to_scalar::<f32>()? == 0.0 {
                bail!("{name}: projection is entirely zero (a known corrupted hub revision; pin an intact revision)");
            }
            t.to_dtype(opts.dtype)?
        };
        Ok(t)
    }
}

/// transformers' initialisation: normal(0, std) for embeddings and projections, ones for norms,
/// drawn in load order from one seeded stream.
struct RandomInit {
    rng: SplitMix64,
    std: f64,
    /// Rounded to bf16 first, as a bf16 checkpoint holds them.
    via_bf16: bool,
    dtype: DType,
    device: Device,
}

/// Values per parallel task of [`RandomInit::normals`].
const NORMALS_PER_TASK: usize = 1 << 16;

impl RandomInit {
    /// The next `n` values `normal() · std` of the stream, filled in parallel: each task starts
    /// its generator at its own offset ([`SplitMix64::advance`]), so the values are those of one
    /// sequential pass whatever the thread count (the 2B shape's 2.4 G values took ~96 s on one
    /// thread).
    fn normals(&mut self, n: usize) -> Vec<f32> {
        use rayon::prelude::*;
        let (start, std) = (self.rng.clone(), self.std);
        let mut vals = vec![0f32; n];
        vals.par_chunks_mut(NORMALS_PER_TASK).enumerate().for_each(|(task, dst)| {
            let mut rng = start.clone();
            rng.advance((task * NORMALS_PER_TASK) as u64 * DRAWS_PER_NORMAL);
            for v in dst {
                *v = (rng.normal() * std) as f32;
            }
        });
        self.rng.advance(n as u64 * DRAWS_PER_NORMAL);
        vals
    }
}

impl Source for RandomInit {
    fn get(&mut self, name: &str, shape: &[usize], role: Role) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = match role {
            Role::Norm => vec![1.0; n],
            Role::Embedding | Role::Projection => self.normals(n),
            Role::Codes | Role::Scale => bail!("{name}: a random model is latent, it has no packed tensors"),
            Role::Holographic => bail!(
                "{name}: a random model has standard attention; swap it for holographic attention afterwards \
                 (the swap-attention stage)"
            ),
        };
        let t = Tensor::from_vec(vals, shape, &self.device)?;
        let t = if self.via_bf16 { t.to_dtype(DType::BF16)? } else { t };
        Ok(t.to_dtype(self.dtype)?)
    }
}

/// The safetensors files of a directory (single file or the shards of an index).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        bail!("{}: neither model.safetensors nor model.safetensors.index.json", dir.display());
    }
    let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: no weight_map", index.display()))?;
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn check_dtype(cfg: &ModelConfig, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 => Ok(()),
        DType::F16 if cfg.arch == Arch::Llama => Ok(()),
        DType::F16 => bail!("f16 is refused for bitnet: relu²·up overflows f16 (use f32 or bf16)"),
        other => bail!("unsupported compute dtype {other:?} (use f32 or bf16)"),
    }
}

impl Model {
    /// Load a Hugging Face layout directory.
    pub fn from_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        check_dtype(&cfg, opts.dtype)?;
        let files = weight_files(dir)?;
        // SAFETY: the files are not modified while mapped (we only read them during loading).
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .with_context(|| format!("memory-mapping the safetensors in {}", dir.display()))?;
        let packed = cfg.weight_format == WeightFormat::Packed;
        // Name → (shape in the file, role).
        let mut want: BTreeMap<String, (Vec<usize>, Role)> = BTreeMap::new();
        for (name, shape, role) in layout(&cfg)? {
            if role == Role::Codes {
                if shape[0] % 4 != 0 {
                    bail!("{name}: out features {} not a multiple of 4 for packing", shape[0]);
                }
                want.insert(name, (vec![shape[0] / 4, shape[1]], role));
            } else {
                want.insert(name, (shape, role));
            }
        }
        let present: BTreeMap<String, (Vec<usize>, safetensors::Dtype)> =
            st.tensors().into_iter().map(|(n, v)| (n, (v.shape().to_vec(), v.dtype()))).collect();
        // A tied checkpoint may still carry the LM head (the untied layout's extra tensors), and
        // older exports transformers' rotary buffer.
        let untied_only: Vec<String> = if cfg.tie_word_embeddings {
            let mut untied = cfg.clone();
            untied.tie_word_embeddings = false;
            layout(&untied)?.into_iter().map(|(n, _, _)| n).filter(|n| !want.contains_key(n)).collect()
        } else {
            Vec::new()
        };
        let ignorable = |n: &str| n.ends_with("rotary_emb.inv_freq") || untied_only.iter().any(|u| u == n);
        let missing: Vec<&String> = want.keys().filter(|n| !present.contains_key(*n)).collect();
        let extra: Vec<&String> = present.keys().filter(|n| !want.contains_key(*n) && !ignorable(n)).collect();
        if !missing.is_empty() || !extra.is_empty() {
            bail!(
                "{}: checkpoint does not match config.json ({} format): missing tensors {:?}; extra tensors {:?}",
                dir.display(),
                if packed { "packed" } else { "latent" },
                missing,
                extra
            );
        }
        for (name, (shape, role)) in &want {
            let got = &present[name].0;
            let scalar_ok = *role == Role::Scale && got.iter().product::<usize>() == 1;
            if got != shape && !scalar_ok {
                bail!("{name}: shape {got:?} in the checkpoint, expected {shape:?} from config.json");
            }
        }
        // Tensors are read and converted one at a time as the model asks for them, so a model
        // packed for inference never holds all its f32 projections at once.
        let mut src = Checkpoint { st: &st, want: &want, present: &present, opts };
        let mut m = assemble(cfg, &mut src, opts)?;
        m.source_dir = Some(dir.to_path_buf());
        Ok(m)
    }

    /// A randomly initialised model (transformers' scheme: normal(0, initializer_range) for
    /// embeddings and projections, ones for norms), reproducible from `seed`. Always latent.
    pub fn random(cfg: &ModelConfig, seed: u64, opts: &LoadOptions) -> Result<Self> {
        Self::random_init(cfg, seed, opts, false)
    }

    /// [`Model::random`] with every value rounded to bf16 before the cast to `opts.dtype`: what
    /// a bf16 hub checkpoint loaded in f32 holds (benchmarks of the real model's shape).
    pub fn random_bf16_values(cfg: &ModelConfig, seed: u64, opts: &LoadOptions) -> Result<Self> {
        Self::random_init(cfg, seed, opts, true)
    }

    fn random_init(cfg: &ModelConfig, seed: u64, opts: &LoadOptions, via_bf16: bool) -> Result<Self> {
        let mut cfg = cfg.clone();
        cfg.weight_format = WeightFormat::Latent;
        if let Some(q) = cfg.raw.get_mut("quantization_config").and_then(|q| q.as_object_mut()) {
            q.insert("quantization_mode".into(), "online".into());
        }
        check_dtype(&cfg, opts.dtype)?;
        let std = cfg.raw.get("initializer_range").and_then(|v| v.as_f64()).unwrap_or(0.02);
        let mut init =
            RandomInit { rng: SplitMix64::new(seed), std, via_bf16, dtype: opts.dtype, device: opts.device.clone() };
        assemble(cfg, &mut init, opts)
    }

    /// Write config.json, model.safetensors and (if the model was loaded from a directory) its
    /// tokenizer/generation files into `dir`, in the HF layout transformers loads unchanged.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_with_aux(dir, self.source_dir.as_deref())
    }

    /// As [`Model::save`], copying the tokenizer files from `aux_from` instead.
    pub fn save_with_aux(&self, dir: &Path, aux_from: Option<&Path>) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cfg = self.cfg.to_json(self.cfg.weight_format);
        let dtype_name = match self.dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        };
        if let Some(o) = cfg.as_object_mut() {
            o.insert("torch_dtype".into(), dtype_name.into());
        }
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)? + "\n")?;
        let sd = self.state_dict()?;
        let sd: Vec<(String, Tensor)> = sd.into_iter().map(|(k, t)| Ok((k, t.contiguous()?))).collect::<Result<_>>()?;
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize_to_file(sd, Some(meta), &dir.join("model.safetensors"))
            .with_context(|| format!("writing {}", dir.join("model.safetensors").display()))?;
        if let Some(src) = aux_from {
            for f in AUX_FILES {
                let p = src.join(f);
                if p.exists() && src != dir {
                    std::fs::copy(&p, dir.join(f)).with_context(|| format!("copying {}", p.display()))?;
                }
            }
        }
        Ok(())
    }
}

fn assemble(cfg: ModelConfig, src: &mut dyn Source, opts: &LoadOptions) -> Result<Model> {
    if opts.device.is_cpu() {
        super::ternary_kernel::check_setting().map_err(anyhow::Error::msg)?;
    }
    let quant = opts.quantization.unwrap_or(cfg.default_quantization);
    let packed = cfg.weight_format == WeightFormat::Packed;
    if packed && quant != Quantization::Ternary {
        bail!("a packed (offline) checkpoint only runs with ternary quantisation");
    }
    if cfg.is_bitnet() && quant == Quantization::None && cfg.default_quantization == Quantization::Ternary {
        tracing::warn!("bitnet model loaded with quantization = none: latent weights are used unquantised");
    }
    // Packing only where the kernel runs: ternary, f32, CPU.
    let pack =
        opts.pack_for_inference && quant == Quantization::Ternary && opts.dtype == DType::F32 && opts.device.is_cpu();
    Model::build(src, cfg, quant, opts.dtype, &opts.device, pack)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two tensors of `n` values each from a fresh `RandomInit` on `threads` threads.
    fn two_tensors(n: usize, threads: usize) -> Vec<Vec<f32>> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut init = RandomInit {
                rng: SplitMix64::new(3),
                std: 0.02,
                via_bf16: false,
                dtype: DType::F32,
                device: Device::Cpu,
            };
            (0..2)
                .map(|i| {
                    let t = init.get(&format!("w{i}"), &[n], Role::Projection).unwrap();
                    t.to_vec1::<f32>().unwrap()
                })
                .collect()
        })
    }

    #[test]
    fn parallel_random_init_is_the_sequential_stream() {
        // Three tasks and a short last one, so a wrong offset anywhere shows.
        let n = 2 * NORMALS_PER_TASK + 123;
        let mut rng = SplitMix64::new(3);
        let want: Vec<Vec<u32>> =
            (0..2).map(|_| (0..n).map(|_| ((rng.normal() * 0.02) as f32).to_bits()).collect()).collect();
        for threads in [1, 3] {
            let got: Vec<Vec<u32>> =
                two_tensors(n, threads).iter().map(|t| t.iter().map(|v| v.to_bits()).collect()).collect();
            assert!(got == want, "{threads} threads");
        }
    }
}
