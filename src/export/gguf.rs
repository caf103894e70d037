//! GGUF export of a ternary BitNet b1.58 model, for llama.cpp's `bitnet` architecture
//! (docs/gguf.md).
//!
//! Layout written (llama.cpp names; `ne` in ggml order, innermost first):
//!
//! | GGUF tensor | from (Hugging Face name) | type |
//! |---|---|---|
//! | `token_embd.weight` `[hidden, vocab]` | `model.embed_tokens.weight` (tied: also the LM head) | the checkpoint's F32 / BF16 / F16, bytes copied |
//! | `output_norm.weight` | `model.norm.weight` | F32 |
//! | `blk.{l}.attn_norm.weight` / `ffn_norm.weight` | `input_layernorm` / `post_attention_layernorm` | F32 |
//! | `blk.{l}.attn_sub_norm.weight` / `ffn_sub_norm.weight` | `self_attn.attn_sub_norm` / `mlp.ffn_sub_norm` | F32 |
//! | `blk.{l}.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}.weight` | the seven projections | TQ2_0 or TQ1_0: the ternary codes, every block scale `d = 1` |
//! | `blk.{l}.….scale` `[1]` | the per-tensor weight scale β | F32 |
//!
//! llama.cpp multiplies each projection's output by its optional `.scale` tensor, so the weight is
//! exactly `codes × β` with β in f32 (folding β into the fp16 block scale, as llama.cpp's own
//! converter does, would round it to 11 bits).

pub mod format;
pub mod ternary;
pub mod vocab;

use crate::model::config::{Activation, Arch, ModelConfig, Quantization, WeightFormat};
use anyhow::{bail, ensure, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use format::{GgmlType, TensorInfo, Value, ALIGNMENT};
use half::f16;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The ggml type of the ternary projections.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    /// 2.0625 bits per weight (66-byte blocks of 256); llama.cpp's faster ternary type.
    TQ2_0,
    /// 1.6875 bits per weight (54-byte blocks of 256, base-3 packing).
    TQ1_0,
}

impl GgufType {
    /// `"tq2_0"` / `"tq1_0"` (case-insensitive).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tq2_0" => Ok(Self::TQ2_0),
            "tq1_0" => Ok(Self::TQ1_0),
            _ => bail!(
                "unknown GGUF type {s:?}: expected \"tq2_0\" or \"tq1_0\" (bitnet.cpp's I2_S is not written: \
                 its layout depends on how bitnet.cpp was built, docs/gguf.md)"
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::TQ2_0 => "TQ2_0",
            Self::TQ1_0 => "TQ1_0",
        }
    }

    pub fn ggml(self) -> GgmlType {
        match self {
            Self::TQ2_0 => GgmlType::TQ2_0,
            Self::TQ1_0 => GgmlType::TQ1_0,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_TQ1_0 = 36`, `TQ2_0 = 37`).
    fn file_type(self) -> u32 {
        match self {
            Self::TQ1_0 => 36,
            Self::TQ2_0 => 37,
        }
    }
}

/// What [`write_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct GgufSummary {
    pub path: PathBuf,
    pub ty: GgufType,
    /// File size.
    pub bytes: u64,
    pub tensors: usize,
    /// Ternary projections (each with a `.scale` tensor).
    pub ternary_tensors: usize,
    /// Parameters (embedding, norms and projection weights; scales not counted).
    pub parameters: u64,
    /// Things a user must know about running the file (e.g. an activation llama.cpp ignores).
    pub warnings: Vec<String>,
}

/// The seven projections: GGUF name, Hugging Face module path.
pub const PROJECTIONS: [(&str, &str); 7] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Where a GGUF tensor's data comes from.
#[derive(Debug, Clone)]
enum Src {
    /// A float tensor, stored as the given type.
    Float(String),
    /// A projection (`<module>.weight`, and `.weight_scale` if packed): its codes.
    Codes(String),
    /// A projection's per-tensor scale β.
    Scale(String),
}

struct Planned {
    info: TensorInfo,
    src: Src,
}

/// Write `model_dir` — a Hugging Face-layout BitNet b1.58 directory as rpt-flow's cache entries
/// and the hub hold it: `config.json` (`model_type = "bitnet"` with the bitnet
/// `quantization_config`), `model.safetensors` (or an index + shards) with either latent
/// f32/bf16 projections (`quantization_mode = "online"`; ternarised here exactly as rpt-flow's and
/// transformers' weight quantiser does: per-tensor absmean β, round half to even, clamp to
/// ±1) or packed 2-bit codes + `weight_scale` (`"offline"`), and `tokenizer.json` (a byte-level
/// BPE; `chat_template.jinja` / `tokenizer_config.json` are read if present) — as a GGUF file at
/// `out` for llama.cpp's `bitnet` architecture, the projections in `ty`.
///
/// The file is written to a temporary file beside `out`, synced, then renamed over it: `out` is
/// either absent/unchanged or complete. Fails, before writing anything, when the model cannot be
/// represented: not a ternary BitNet, holographic attention, an untied LM head (llama.cpp's bitnet
/// graph always uses `token_embd` as the output matrix), `heads × head_dim ≠ hidden_size`, or a
/// projection whose input dimension (`hidden_size`, or `intermediate_size` for `down_proj`) is not
/// a multiple of 256 (every ternary type stores each row in whole 256-value blocks). The error
/// names every such tensor.
pub fn write_gguf(model_dir: &Path, out: &Path, ty: GgufType) -> Result<GgufSummary> {
    let cfg = ModelConfig::from_file(&model_dir.join("config.json"))?;
    check_config(&cfg)?;
    let files = crate::model::io::weight_files(model_dir)?;
    // SAFETY: the files are only read, and not modified while mapped.
    let st = unsafe { MmapedSafetensors::multi(&files) }
        .with_context(|| format!("memory-mapping the safetensors in {}", model_dir.display()))?;
    let mut plan = plan_tensors(&cfg, &st, ty)?;
    let mut warnings = Vec::new();
    if cfg.activation == Activation::Relu2 {
        warnings.push(
            "llama.cpp's bitnet graph (up to at least the version llama-cpp-python 0.3.36 bundles) computes the \
             FFN as silu(gate)·up, not relu²(gate)·up, and ignores bitnet.hidden_activation = \"relu2\": the \
             file is correct, but such a build gives wrong logits for this model (docs/gguf.md)"
                .to_string(),
        );
    }
    let mut kv = metadata(&cfg, model_dir, ty)?;
    kv.extend(vocab::metadata(model_dir, &cfg)?);
    let mut infos: Vec<TensorInfo> = plan.iter().map(|p| p.info.clone()).collect();
    format::assign_offsets(&mut infos, ALIGNMENT)?;
    for (p, i) in plan.iter_mut().zip(&infos) {
        p.info.offset = i.offset;
    }
    let parameters =
        plan.iter().filter(|p| !matches!(p.src, Src::Scale(_))).map(|p| p.info.ne.iter().product::<u64>()).sum();
    let ternary_tensors = plan.iter().filter(|p| matches!(p.src, Src::Codes(_))).count();
    let bytes = write_atomically(out, |w| {
        let mut at = format::write_header(w, &kv, &infos, ALIGNMENT)?;
        let data_start = at;
        for p in &plan {
            let pad = data_start + p.info.offset - at;
            w.write_all(&vec![0u8; pad as usize])?;
            let data = tensor_bytes(&cfg, &st, p)?;
            ensure!(
                data.len() as u64 == p.info.nbytes()?,
                "{}: {} bytes, expected {}",
                p.info.name,
                data.len(),
                p.info.nbytes()?
            );
            w.write_all(&data)?;
            at += pad + data.len() as u64;
        }
        Ok(at)
    })?;
    Ok(GgufSummary { path: out.to_path_buf(), ty, bytes, tensors: plan.len(), ternary_tensors, parameters, warnings })
}

fn check_config(cfg: &ModelConfig) -> Result<()> {
    if cfg.arch != Arch::Bitnet {
        bail!("GGUF export writes BitNet b1.58 models (model_type \"bitnet\"); this is {:?}", cfg.arch);
    }
    if cfg.default_quantization != Quantization::Ternary {
        bail!(
            "config.json has no bitnet quantization_config, so the model runs unquantised; ternarising its \
             weights for GGUF would change it"
        );
    }
    if cfg.holographic.is_some() {
        bail!("the model has holographic attention layers, which llama.cpp cannot run");
    }
    if cfg.num_heads * cfg.head_dim != cfg.hidden_size {
        bail!(
            "llama.cpp's bitnet architecture needs num_attention_heads × head_dim = hidden_size; here {} × {} ≠ {}",
            cfg.num_heads,
            cfg.head_dim,
            cfg.hidden_size
        );
    }
    Ok(())
}

/// The GGUF tensors in file order, with their shapes checked against config.json.
fn plan_tensors(cfg: &ModelConfig, st: &MmapedSafetensors, ty: GgufType) -> Result<Vec<Planned>> {
    let packed = cfg.weight_format == WeightFormat::Packed;
    let names: std::collections::BTreeSet<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    let file_shape = |name: &str| -> Result<(Vec<usize>, safetensors::Dtype)> {
        let v = st.get(name).with_context(|| format!("the checkpoint has no tensor {name}"))?;
        Ok((v.shape().to_vec(), v.dtype()))
    };
    let (h, kvd, ff, vocab) = (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size, cfg.vocab_size);
    let mut plan = Vec::new();
    let mut bad_rows = Vec::new();
    let float = |gguf: &str, hf: &str, want: &[usize], ty: GgmlType| -> Result<Planned> {
        let (shape, _) = file_shape(hf)?;
        ensure!(shape == want, "{hf}: shape {shape:?}, expected {want:?} from config.json");
        let ne = want.iter().rev().map(|&d| d as u64).collect();
        Ok(Planned { info: TensorInfo { name: gguf.into(), ne, ty, offset: 0 }, src: Src::Float(hf.into()) })
    };
    let embed = "model.embed_tokens.weight";
    let embed_ty = match file_shape(embed)?.1 {
        safetensors::Dtype::BF16 => GgmlType::BF16,
        safetensors::Dtype::F16 => GgmlType::F16,
        _ => GgmlType::F32,
    };
    plan.push(float("token_embd.weight", embed, &[vocab, h], embed_ty)?);
    if names.contains("lm_head.weight") {
        let same = st.get("lm_head.weight")?.data() == st.get(embed)?.data();
        ensure!(
            same,
            "the checkpoint has an untied lm_head.weight; llama.cpp's bitnet graph always uses token_embd as \
             the output matrix, so this model cannot be exported"
        );
    } else if !cfg.tie_word_embeddings {
        bail!("tie_word_embeddings is false but the checkpoint has no lm_head.weight");
    }
    plan.push(float("output_norm.weight", "model.norm.weight", &[h], GgmlType::F32)?);
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let b = format!("blk.{l}");
        plan.push(float(
            &format!("{b}.attn_norm.weight"),
            &format!("{p}.input_layernorm.weight"),
            &[h],
            GgmlType::F32,
        )?);
        plan.push(float(
            &format!("{b}.attn_sub_norm.weight"),
            &format!("{p}.self_attn.attn_sub_norm.weight"),
            &[h],
            GgmlType::F32,
        )?);
        plan.push(float(
            &format!("{b}.ffn_norm.weight"),
            &format!("{p}.post_attention_layernorm.weight"),
            &[h],
            GgmlType::F32,
        )?);
        plan.push(float(
            &format!("{b}.ffn_sub_norm.weight"),
            &format!("{p}.mlp.ffn_sub_norm.weight"),
            &[ff],
            GgmlType::F32,
        )?);
        for (g, hf) in PROJECTIONS {
            let [out, inp] = match g {
                "attn_q" | "attn_output" => [h, h],
                "attn_k" | "attn_v" => [kvd, h],
                "ffn_gate" | "ffn_up" => [ff, h],
                _ => [h, ff],
            };
            let module = format!("{p}.{hf}");
            let wname = format!("{module}.weight");
            let (shape, dtype) = file_shape(&wname)?;
            if packed {
                ensure!(dtype == safetensors::Dtype::U8, "{wname}: packed projection must be U8, found {dtype:?}");
                ensure!(
                    out % 4 == 0 && shape == [out / 4, inp],
                    "{wname}: packed shape {shape:?}, expected [{}, {inp}] from config.json",
                    out / 4
                );
                let (s, _) = file_shape(&format!("{module}.weight_scale"))?;
                ensure!(s.iter().product::<usize>() == 1, "{module}.weight_scale: shape {s:?}, expected one value");
            } else {
                ensure!(shape == [out, inp], "{wname}: shape {shape:?}, expected [{out}, {inp}] from config.json");
            }
            let gname = format!("{b}.{g}.weight");
            if inp % ternary::QK_K != 0 && l == 0 {
                bad_rows.push(format!("{gname} ({wname}, rows of {inp})"));
            }
            let info = TensorInfo { name: gname, ne: vec![inp as u64, out as u64], ty: ty.ggml(), offset: 0 };
            plan.push(Planned { info, src: Src::Codes(module.clone()) });
            let info = TensorInfo { name: format!("{b}.{g}.scale"), ne: vec![1], ty: GgmlType::F32, offset: 0 };
            plan.push(Planned { info, src: Src::Scale(module) });
        }
    }
    if !bad_rows.is_empty() {
        bail!(
            "{} stores each weight row in whole blocks of {} values, so a projection's input dimension \
             (hidden_size {h}; intermediate_size {ff} for ffn_down) must be a multiple of {}; these are not: {}{}",
            ty.name(),
            ternary::QK_K,
            ternary::QK_K,
            bad_rows.join(", "),
            match cfg.num_layers {
                0 | 1 => String::new(),
                n => format!(", and the same in layers 1–{}", n - 1),
            }
        );
    }
    Ok(plan)
}

fn metadata(cfg: &ModelConfig, dir: &Path, ty: GgufType) -> Result<Vec<(String, Value)>> {
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "bitnet".into());
    let a = |k: &str| format!("bitnet.{k}");
    let u = |x: usize| Value::U32(x as u32);
    Ok(vec![
        ("general.architecture".into(), Value::Str("bitnet".into())),
        ("general.name".into(), Value::Str(name)),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("general.alignment".into(), Value::U32(ALIGNMENT as u32)),
        (a("vocab_size"), u(cfg.vocab_size)),
        (a("context_length"), u(cfg.max_position_embeddings)),
        (a("embedding_length"), u(cfg.hidden_size)),
        (a("block_count"), u(cfg.num_layers)),
        (a("feed_forward_length"), u(cfg.intermediate_size)),
        (a("attention.head_count"), u(cfg.num_heads)),
        (a("attention.head_count_kv"), u(cfg.num_kv_heads)),
        (a("attention.key_length"), u(cfg.head_dim)),
        (a("attention.value_length"), u(cfg.head_dim)),
        (a("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
        (a("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (a("rope.dimension_count"), u(cfg.head_dim)),
        (
            a("hidden_activation"),
            Value::Str(
                match cfg.activation {
                    Activation::Relu2 => "relu2",
                    Activation::Silu => "silu",
                }
                .into(),
            ),
        ),
    ])
}

/// A projection's ternary codes `[out, in]` (row-major) and its scale β (f32), as rpt-flow's
/// model uses them: latent weights through [`crate::model::quant::ternarize`] (β = 1/s),
/// packed ones unpacked, with `weight_scale` as β.
pub fn projection_codes(cfg: &ModelConfig, st: &MmapedSafetensors, module: &str) -> Result<(Vec<i8>, f32)> {
    let wname = format!("{module}.weight");
    let w = st.load(&wname, &Device::Cpu).with_context(|| format!("loading {wname}"))?;
    let (vals, scale) = if cfg.weight_format == WeightFormat::Packed {
        let (rows, cols) = w.dims2()?;
        let vals = crate::model::pack::unpack(&w.flatten_all()?.to_vec1::<u8>()?, rows, cols).context(wname.clone())?;
        let s = st.load(&format!("{module}.weight_scale"), &Device::Cpu)?;
        (vals, s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0])
    } else {
        let (t, s) = crate::model::quant::ternarize(&w)?;
        let s = s.flatten_all()?.to_vec1::<f32>()?[0];
        (t.flatten_all()?.to_vec1::<f32>()?, 1.0 / s)
    };
    ensure!(scale.is_finite(), "{module}: weight scale {scale} is not finite");
    Ok((vals.into_iter().map(|v| v as i8).collect(), scale))
}

fn tensor_bytes(cfg: &ModelConfig, st: &MmapedSafetensors, p: &Planned) -> Result<Vec<u8>> {
    Ok(match &p.src {
        Src::Float(name) => {
            let view = st.get(name)?;
            let same = matches!(
                (p.info.ty, view.dtype()),
                (GgmlType::F32, safetensors::Dtype::F32)
                    | (GgmlType::BF16, safetensors::Dtype::BF16)
                    | (GgmlType::F16, safetensors::Dtype::F16)
            );
            if same {
                view.data().to_vec() // safetensors is little-endian, as GGUF
            } else {
                ensure!(p.info.ty == GgmlType::F32, "{name}: cannot convert {:?} to {:?}", view.dtype(), p.info.ty);
                let t: Tensor = st.load(name, &Device::Cpu)?;
                t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
        }
        Src::Scale(module) => projection_scale(cfg, st, module)?.to_le_bytes().to_vec(),
        Src::Codes(module) => {
            let (codes, _) = projection_codes(cfg, st, module)?;
            let mut out = Vec::with_capacity(p.info.nbytes()? as usize);
            match p.info.ty {
                GgmlType::TQ2_0 => ternary::encode_tq2_0(&codes, f16::ONE, &mut out),
                GgmlType::TQ1_0 => ternary::encode_tq1_0(&codes, f16::ONE, &mut out),
                other => bail!("{module}: {other:?} is not a ternary type"),
            }
            out
        }
    })
}

fn projection_scale(cfg: &ModelConfig, st: &MmapedSafetensors, module: &str) -> Result<f32> {
    if cfg.weight_format == WeightFormat::Packed {
        let s = st.load(&format!("{module}.weight_scale"), &Device::Cpu)?;
        Ok(s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0])
    } else {
        Ok(projection_codes(cfg, st, module)?.1)
    }
}

/// Run `write` into a temporary file beside `out`, sync it and rename it over `out`; the
/// temporary file is removed on any failure.
fn write_atomically(out: &Path, write: impl FnOnce(&mut BufWriter<std::fs::File>) -> Result<u64>) -> Result<u64> {
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(
        ".{}.{}.{}.{nanos}.tmp",
        out.file_name().unwrap_or_default().to_string_lossy(),
        crate::session::host_name(),
        std::process::id()
    ));
    let result = (|| -> Result<u64> {
        let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let n = write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error()).context("flushing the GGUF")?;
        file.sync_all()?;
        std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
        Ok(n)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", out.display()))
}
