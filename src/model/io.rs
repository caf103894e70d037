//! Checkpoint io: load a Hugging Face layout directory (single or sharded safetensors,
//! memory-mapped; latent or packed projections), random initialisation, and save.

use super::attention::Attention;
use super::bitlinear::{ProjWeight, Projection};
use super::block::Block;
use super::causal_lm::{Model, PROJECTIONS};
use super::config::{Arch, ModelConfig, Quantization, WeightFormat};
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::rope::Rope;
use crate::rng::SplitMix64;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype: `F32` or `BF16` (`F16` is refused for bitnet: relu² overflows).
    pub dtype: DType,
    pub device: Device,
    /// `None` = as transformers decides from config.json (see [`ModelConfig::default_quantization`]).
    pub quantization: Option<Quantization>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: DType::F32, device: Device::Cpu, quantization: None }
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

/// The expected checkpoint tensors (latent layout): name and shape.
fn expected(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    let mut e = vec![("model.embed_tokens.weight".to_string(), vec![v, h]), ("model.norm.weight".into(), vec![h])];
    if !cfg.tie_word_embeddings {
        e.push(("lm_head.weight".into(), vec![v, h]));
    }
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}.");
        e.push((p.clone() + "input_layernorm.weight", vec![h]));
        e.push((p.clone() + "post_attention_layernorm.weight", vec![h]));
        if cfg.is_bitnet() {
            e.push((p.clone() + "self_attn.attn_sub_norm.weight", vec![h]));
            e.push((p.clone() + "mlp.ffn_sub_norm.weight", vec![f]));
        }
        let shapes = [[q, h], [kv, h], [kv, h], [h, q], [f, h], [f, h], [h, f]];
        for (name, s) in PROJECTIONS.iter().zip(shapes) {
            e.push((format!("{p}{name}.weight"), s.to_vec()));
        }
    }
    e
}

fn is_projection(name: &str) -> bool {
    name.ends_with("_proj.weight")
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
    /// Load from a local directory or `hf:org/name[@revision]` (see [`super::hub`]).
    pub fn load(source: &str, opts: &LoadOptions) -> Result<Self> {
        let dir = super::hub::resolve(source)?;
        Self::from_dir(&dir, opts)
    }

    /// Load a Hugging Face layout directory.
    pub fn from_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        check_dtype(&cfg, opts.dtype)?;
        let files = weight_files(dir)?;
        // SAFETY: the files are not modified while mapped (we only read them during loading).
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .with_context(|| format!("memory-mapping the safetensors in {}", dir.display()))?;
        let packed = cfg.weight_format == WeightFormat::Packed;
        let mut want: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (name, shape) in expected(&cfg) {
            if packed && is_projection(&name) {
                if shape[0] % 4 != 0 {
                    bail!("{name}: out features {} not a multiple of 4 for packing", shape[0]);
                }
                want.insert(name.replace(".weight", ".weight_scale"), vec![1]);
                want.insert(name, vec![shape[0] / 4, shape[1]]);
            } else {
                want.insert(name, shape);
            }
        }
        let present: BTreeMap<String, (Vec<usize>, safetensors::Dtype)> =
            st.tensors().into_iter().map(|(n, v)| (n, (v.shape().to_vec(), v.dtype()))).collect();
        let ignorable =
            |n: &str| n.ends_with("rotary_emb.inv_freq") || (cfg.tie_word_embeddings && n == "lm_head.weight");
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
        let mut tensors = HashMap::new();
        for (name, shape) in &want {
            let (got, dt) = &present[name];
            let scalar_ok = name.ends_with("weight_scale") && got.iter().product::<usize>() == 1;
            if got != shape && !scalar_ok {
                bail!("{name}: shape {got:?} in the checkpoint, expected {shape:?} from config.json");
            }
            let t = st.load(name, &opts.device).with_context(|| format!("loading {name}"))?;
            let t = if packed && is_projection(name) {
                if *dt != safetensors::Dtype::U8 {
                    bail!("{name}: packed projection must be U8, found {dt:?}");
                }
                if t.flatten_all()?.to_vec1::<u8>()?.iter().all(|&b| b == 0b0101_0101) {
                    bail!(
                        "{name}: projection is entirely zero (a known corrupted hub revision; pin an intact revision)"
                    );
                }
                let (rows, cols) = t.dims2()?;
                let vals = super::pack::unpack(&t.flatten_all()?.to_vec1::<u8>()?, rows, cols)
                    .with_context(|| name.clone())?;
                Tensor::from_vec(vals, (rows * 4, cols), &opts.device)?.to_dtype(opts.dtype)?
            } else if name.ends_with("weight_scale") {
                t.to_dtype(opts.dtype)?.reshape(1)?
            } else {
                if is_projection(name) && t.abs()?.to_dtype(DType::F32)?.max_all()?.to_scalar::<f32>()? == 0.0 {
                    bail!(
                        "{name}: projection is entirely zero (a known corrupted hub revision; pin an intact revision)"
                    );
                }
                t.to_dtype(opts.dtype)?
            };
            tensors.insert(name.clone(), t);
        }
        let mut m = assemble(cfg, tensors, opts)?;
        m.source_dir = Some(dir.to_path_buf());
        Ok(m)
    }

    /// A randomly initialised model (transformers' scheme: normal(0, initializer_range) for
    /// embeddings and projections, ones for norms), reproducible from `seed`. Always latent.
    pub fn random(cfg: &ModelConfig, seed: u64, opts: &LoadOptions) -> Result<Self> {
        let mut cfg = cfg.clone();
        cfg.weight_format = WeightFormat::Latent;
        if let Some(q) = cfg.raw.get_mut("quantization_config").and_then(|q| q.as_object_mut()) {
            q.insert("quantization_mode".into(), "online".into());
        }
        check_dtype(&cfg, opts.dtype)?;
        let std = cfg.raw.get("initializer_range").and_then(|v| v.as_f64()).unwrap_or(0.02);
        let mut rng = SplitMix64::new(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in expected(&cfg) {
            let n: usize = shape.iter().product();
            let vals: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            };
            let t = Tensor::from_vec(vals, shape, &opts.device)?.to_dtype(opts.dtype)?;
            tensors.insert(name, t);
        }
        assemble(cfg, tensors, opts)
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

/// Pack ternary codes `[out, in]` into `u8 [out/4, in]`.
pub(crate) fn pack_tensor(codes: &Tensor) -> Result<Tensor> {
    let (out, cols) = codes.dims2()?;
    let vals = codes.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let bytes = super::pack::pack(&vals, out, cols)?;
    Ok(Tensor::from_vec(bytes, (out / 4, cols), codes.device())?)
}

fn assemble(cfg: ModelConfig, mut t: HashMap<String, Tensor>, opts: &LoadOptions) -> Result<Model> {
    let quant = opts.quantization.unwrap_or(cfg.default_quantization);
    let packed = cfg.weight_format == WeightFormat::Packed;
    if packed && quant != Quantization::Ternary {
        bail!("a packed (offline) checkpoint only runs with ternary quantisation");
    }
    if cfg.is_bitnet() && quant == Quantization::None && cfg.default_quantization == Quantization::Ternary {
        tracing::warn!("bitnet model loaded with quantization = none: latent weights are used unquantised");
    }
    let mut take = |name: &str| -> Result<Var> {
        let x = t.remove(name).with_context(|| format!("missing tensor {name}"))?;
        Ok(Var::from_tensor(&x)?)
    };
    let eps = cfg.rms_norm_eps;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}.");
        let mut proj = |name: &str| -> Result<Projection> {
            let key = format!("{p}{name}.weight");
            let w = if packed {
                let codes = take(&key)?;
                let scale = take(&format!("{p}{name}.weight_scale"))?.as_detached_tensor();
                ProjWeight::Packed { codes, scale }
            } else {
                ProjWeight::Dense(take(&key)?)
            };
            Ok(Projection::new(w, quant))
        };
        let (q, k, v, o) = (proj(PROJECTIONS[0])?, proj(PROJECTIONS[1])?, proj(PROJECTIONS[2])?, proj(PROJECTIONS[3])?);
        let (g, u, d) = (proj(PROJECTIONS[4])?, proj(PROJECTIONS[5])?, proj(PROJECTIONS[6])?);
        let bit = cfg.is_bitnet();
        let attn_sub =
            if bit { Some(RmsNorm::new(take(&format!("{p}self_attn.attn_sub_norm.weight"))?, eps)) } else { None };
        let ffn_sub = if bit { Some(RmsNorm::new(take(&format!("{p}mlp.ffn_sub_norm.weight"))?, eps)) } else { None };
        layers.push(Block {
            input_layernorm: RmsNorm::new(take(&format!("{p}input_layernorm.weight"))?, eps),
            post_attention_layernorm: RmsNorm::new(take(&format!("{p}post_attention_layernorm.weight"))?, eps),
            self_attn: Attention {
                q_proj: q,
                k_proj: k,
                v_proj: v,
                o_proj: o,
                sub_norm: attn_sub,
                num_heads: cfg.num_heads,
                num_kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
            },
            mlp: Mlp { gate_proj: g, up_proj: u, down_proj: d, sub_norm: ffn_sub, activation: cfg.activation },
        });
    }
    let embed = take("model.embed_tokens.weight")?;
    let norm = RmsNorm::new(take("model.norm.weight")?, eps);
    let lm_head = if cfg.tie_word_embeddings { None } else { Some(take("lm_head.weight")?) };
    let rope = Rope::new(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, opts.dtype, &opts.device)?;
    Ok(Model {
        cfg,
        dtype: opts.dtype,
        device: opts.device.clone(),
        quant,
        embed,
        lm_head,
        layers,
        norm,
        rope,
        weight_cache: Arc::new(AtomicBool::new(true)),
        source_dir: None,
    })
}
