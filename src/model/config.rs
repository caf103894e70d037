//! `config.json` (Hugging Face layout) → a validated [`ModelConfig`].
//!
//! The serde struct [`HfConfig`] mirrors the file; optional and legacy fields are resolved once,
//! in [`ModelConfig::from_hf`]. The raw JSON is kept so that a saved model writes back every field
//! it was loaded with (transformers must load it unchanged).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The two supported architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `model_type = "bitnet"` (BitNetForCausalLM): sub-norms, relu² MLP, BitLinear projections.
    Bitnet,
    /// `model_type = "llama"` (LlamaForCausalLM): SiLU-gated MLP, plain linear projections.
    Llama,
}

/// Gate activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `relu2` = relu(x)² (BitNet).
    Relu2,
    /// `silu` (Llama).
    Silu,
}

/// How the projections' weights are stored in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Full-precision (latent) matrices `[out, in]`; quantised on every forward if ternary
    /// (`quantization_mode = "online"`, the bf16 hub repo, and every Llama).
    Latent,
    /// 2-bit codes `u8 [out/4, in]` + `weight_scale` (`quantization_mode = "offline"`, the packed
    /// hub repo). `W = T · weight_scale`.
    Packed,
}

/// Quantisation applied in every projection's forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// W1.58 per-tensor absmean weights + A8 per-token absmax activations (notes §3).
    Ternary,
    /// Weights used as they are, activations not quantised.
    None,
}

impl Quantization {
    /// Parse `"ternary"` / `"none"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "ternary" => Ok(Self::Ternary),
            "none" => Ok(Self::None),
            other => bail!("unknown quantization {other:?}: expected \"ternary\" or \"none\""),
        }
    }

    /// The name used in parameters and docs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ternary => "ternary",
            Self::None => "none",
        }
    }
}

/// `config.json` as written by transformers (only the fields we read; the rest are kept raw).
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub hidden_act: Option<String>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    pub pad_token_id: Option<Value>,
    pub quantization_config: Option<HfQuantConfig>,
}

/// The `quantization_config` block.
#[derive(Debug, Clone, Deserialize)]
pub struct HfQuantConfig {
    pub quant_method: Option<String>,
    pub linear_class: Option<String>,
    pub quantization_mode: Option<String>,
}

/// Validated model configuration.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub activation: Activation,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// All end-of-sequence ids (`eos_token_id` may be a list).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Projection storage in the checkpoint.
    pub weight_format: WeightFormat,
    /// What transformers would do with this config (notes §3.3, pitfall 2).
    pub default_quantization: Quantization,
    /// Layers whose attention is holographic (`rpt_holographic` in config.json; see
    /// `holographic.rs`).
    pub holographic: Option<super::holographic::HoloConfig>,
    /// The file as read (written back on save, with edits applied).
    pub raw: Value,
}

fn one_id(v: &Option<Value>) -> Option<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| x as u32),
        Some(Value::Array(a)) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

fn id_list(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Read and validate `dir/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Self::from_json(raw).with_context(|| format!("in {}", path.display()))
    }

    /// Validate a parsed `config.json`.
    pub fn from_json(raw: Value) -> Result<Self> {
        let hf: HfConfig = serde_json::from_value(raw.clone()).context("config.json fields")?;
        Self::from_hf(hf, raw)
    }

    fn from_hf(hf: HfConfig, raw: Value) -> Result<Self> {
        let arch = match hf.model_type.as_deref() {
            Some("bitnet") => Arch::Bitnet,
            Some("llama") => Arch::Llama,
            Some(other) => bail!(
                "unsupported model_type {other:?}: rpt-flow supports \"bitnet\" (BitNetForCausalLM) \
                 and \"llama\" (LlamaForCausalLM)"
            ),
            None => bail!("config.json has no model_type"),
        };
        let activation = match hf.hidden_act.as_deref() {
            Some("relu2") => Activation::Relu2,
            Some("silu") => Activation::Silu,
            None if arch == Arch::Bitnet => Activation::Relu2,
            None => Activation::Silu,
            Some(other) => bail!("unsupported hidden_act {other:?} (expected relu2 or silu)"),
        };
        if hf.attention_bias == Some(true) || hf.mlp_bias == Some(true) {
            bail!("attention_bias / mlp_bias = true is not supported");
        }
        if let Some(rs) = &hf.rope_scaling {
            if !rs.is_null() {
                bail!("rope_scaling {rs} is not supported (only plain RoPE)");
            }
        }
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        if (hf.num_attention_heads == 0 || !hf.hidden_size.is_multiple_of(hf.num_attention_heads))
            && hf.head_dim.is_none()
        {
            bail!("hidden_size {} is not a multiple of num_attention_heads {}", hf.hidden_size, hf.num_attention_heads);
        }
        if num_kv_heads == 0 || !hf.num_attention_heads.is_multiple_of(num_kv_heads) {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {num_kv_heads}",
                hf.num_attention_heads
            );
        }
        let head_dim = hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1));
        if !head_dim.is_multiple_of(2) {
            bail!("head_dim {head_dim} must be even for RoPE");
        }
        let (weight_format, default_quantization) = match (&hf.quantization_config, arch) {
            (None, Arch::Bitnet) => {
                tracing::warn!(
                    "bitnet config without quantization_config: transformers runs it unquantised \
                     (latent BitNet weights are meaningless without quantisation)"
                );
                (WeightFormat::Latent, Quantization::None)
            }
            (None, Arch::Llama) => (WeightFormat::Latent, Quantization::None),
            (Some(q), _) => {
                if q.quant_method.as_deref() != Some("bitnet") {
                    bail!("unsupported quantization_config.quant_method {:?}", q.quant_method);
                }
                let class = q.linear_class.as_deref().unwrap_or("bitlinear");
                if class != "autobitlinear" {
                    bail!(
                        "quantization_config.linear_class {class:?} is not supported (only \
                         \"autobitlinear\"; legacy \"bitlinear\" checkpoints store 1/scale)"
                    );
                }
                match q.quantization_mode.as_deref().unwrap_or("offline") {
                    "online" => (WeightFormat::Latent, Quantization::Ternary),
                    "offline" => (WeightFormat::Packed, Quantization::Ternary),
                    other => bail!("unknown quantization_mode {other:?}"),
                }
            }
        };
        let holographic = match raw.get(super::holographic::CONFIG_KEY) {
            None | Some(Value::Null) => None,
            Some(v) => {
                let hc = super::holographic::HoloConfig::from_json(v)?;
                hc.validate(hf.num_hidden_layers, head_dim)
                    .with_context(|| format!("config.json {}", super::holographic::CONFIG_KEY))?;
                Some(hc)
            }
        };
        Ok(Self {
            arch,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim,
            activation,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: hf.rope_theta.unwrap_or(match arch {
                Arch::Bitnet => 500000.0,
                Arch::Llama => 10000.0,
            }),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            bos_token_id: one_id(&hf.bos_token_id),
            eos_token_ids: id_list(&hf.eos_token_id),
            pad_token_id: one_id(&hf.pad_token_id),
            weight_format,
            default_quantization,
            holographic,
            raw,
        })
    }

    /// Whether the projections are BitLinear layers with sub-norms (bitnet) or plain (llama).
    pub fn is_bitnet(&self) -> bool {
        self.arch == Arch::Bitnet
    }

    /// The config.json to write when saving with `format`.
    pub fn to_json(&self, format: WeightFormat) -> Value {
        let mut raw = self.raw.clone();
        if let (Some(obj), Some(q)) =
            (raw.as_object_mut(), self.raw.get("quantization_config").and_then(|q| q.as_object()))
        {
            let mut q = q.clone();
            let mode = match format {
                WeightFormat::Latent => "online",
                WeightFormat::Packed => "offline",
            };
            q.insert("quantization_mode".into(), Value::String(mode.into()));
            obj.insert("quantization_config".into(), Value::Object(q));
        }
        raw
    }

    /// A small config for tests and benches: bitnet (with the online quantization_config) or
    /// llama, given the sizes.
    #[allow(clippy::too_many_arguments)]
    pub fn tiny(
        arch: Arch,
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_layers: usize,
        num_heads: usize,
        num_kv_heads: usize,
    ) -> Self {
        let mut raw = serde_json::json!({
            "architectures": [match arch { Arch::Bitnet => "BitNetForCausalLM", Arch::Llama => "LlamaForCausalLM" }],
            "model_type": match arch { Arch::Bitnet => "bitnet", Arch::Llama => "llama" },
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "hidden_act": match arch { Arch::Bitnet => "relu2", Arch::Llama => "silu" },
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": true,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "initializer_range": 0.02,
        });
        if arch == Arch::Bitnet {
            raw["quantization_config"] = serde_json::json!({
                "quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"
            });
        }
        Self::from_json(raw).expect("tiny config is valid")
    }
}
