//! A cached model as a Hugging Face directory that transformers loads unchanged:
//! `config.json`, the weights as the entry holds them (`model.safetensors`, or the shards and
//! their index), tokenizer files (with a `tokenizer_config.json` and `special_tokens_map.json`
//! written when the model came without them, so `AutoTokenizer` knows its special tokens),
//! `generation_config.json`, `README.md` (a model card), `rpt_flow.json` (provenance),
//! `recipe.toml` (the lineage as a pipeline) and, on request, `rpt_flow_logits.safetensors`
//! (rpt-flow's own logits for a few fixed prompts, for `scripts/check_export.py`).
//!
//! The entry's files are re-hashed against its manifest before anything is read, and every file
//! copied out of it is hashed again while it is copied: what lands in the directory is exactly
//! what the manifest recorded.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value as Json};

use super::card;
use super::outdir::OutDir;
use super::provenance::Provenance;
use crate::cache::{Cache, EntryState, Key, Manifest};
use crate::model::holographic::CONFIG_KEY as HOLOGRAPHIC_KEY;
use crate::model::io::{weight_files, AUX_FILES};
use crate::model::{Bos, LoadOptions, Model, ModelConfig, Quantization, TextTokenizer, WeightFormat};
use crate::stages::model_artifact::{read_settings, ModelSettings};

/// The file of rpt-flow's reference logits.
pub const LOGITS_FILE: &str = "rpt_flow_logits.safetensors";

/// The prompts whose logits `--with-logits` records.
pub const PROMPTS: [&str; 4] =
    ["The capital of France is", "Once upon a time, there was a", "1, 2, 3, 4,", "Paris is the capital of"];

/// Why an export did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The request cannot be met as asked (what, and how to fix it): exit 2.
    #[error("{0}")]
    Refused(String),
    /// The cache entry failed its integrity check: exit 1.
    #[error("{0}")]
    Damaged(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// What to export and where.
pub struct Request<'a> {
    pub cache: &'a Cache,
    pub provenance: &'a Provenance,
    pub dir: &'a Path,
    pub force: bool,
    pub with_logits: bool,
    /// How to (re)compute the instance: `rpt-flow run …`, for messages.
    pub run_hint: String,
}

/// What was written.
#[derive(Debug)]
pub struct Exported {
    /// File name and size, in writing order.
    pub files: Vec<(String, u64)>,
    /// Changes made to config.json, and other things a user should know.
    pub notes: Vec<String>,
}

/// Facts about the exported model that the card and `rpt_flow.json` report.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    pub entry: Manifest,
    pub settings: ModelSettings,
    pub arch: String,
    pub weight_format: String,
    /// `torch_dtype` of the written config.json.
    pub stored_dtype: String,
    /// Where the weights were copied from: the entry, or the hub snapshot it references.
    pub weights_from: String,
    pub has_tokenizer: bool,
    pub notes: Vec<String>,
    pub with_logits: bool,
}

pub fn export(req: &Request) -> Result<Exported, ExportError> {
    let p = req.provenance;
    let target = p.target();
    let key = Key::from_hex(&target.key)
        .ok_or_else(|| ExportError::Refused(format!("`{}` has no valid cache key ({:?})", target.name, target.key)))?;
    if matches!(req.cache.inspect(&key), EntryState::Missing) {
        return Err(ExportError::Refused(format!(
            "`{}` ({} {}) is not in the cache at {}: run the pipeline first: {}",
            target.name,
            target.kind,
            key.short(),
            req.cache.root().display(),
            req.run_hint
        )));
    }
    // Readers hold a shared lock so that `cache gc` leaves the entry alone meanwhile.
    let _lock = match req.cache.lock_shared(&key) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(
                "exporting without a lock on {} ({e:#}): a concurrent `cache gc` could remove it",
                key.short()
            );
            None
        }
    };
    let manifest = match req.cache.inspect_full(&key) {
        EntryState::Intact(m) => *m,
        EntryState::Missing => {
            return Err(ExportError::Refused(format!(
                "`{}` vanished from the cache while exporting: run the pipeline again: {}",
                target.name, req.run_hint
            )))
        }
        EntryState::Damaged(why) => {
            return Err(ExportError::Damaged(format!(
                "the cache entry of `{}` ({}) is damaged: {why}. Nothing was exported. `rpt-flow cache verify --fix` \
                 moves it aside; then `{}` recomputes it",
                target.name,
                req.cache.entry_dir(&key).display(),
                req.run_hint
            )))
        }
    };
    let entry_dir = req.cache.entry_dir(&key);
    let settings = read_settings(&entry_dir).with_context(|| format!("the model entry of `{}`", target.name))?;
    let source = settings.source.clone().unwrap_or_else(|| entry_dir.clone());
    let from_entry = settings.source.is_none();
    let hashes: HashMap<&str, &str> = manifest.files.iter().map(|f| (f.path.as_str(), f.blake3.as_str())).collect();
    let read_verified = |name: &str| -> Result<Vec<u8>> {
        let path = source.join(name);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if from_entry {
            check_hash(name, &bytes, &hashes)?;
        }
        Ok(bytes)
    };

    // config.json: refuse what transformers cannot run; make its quantisation say what rpt-flow ran.
    let mut config: Json = serde_json::from_slice(&read_verified("config.json")?).context("parsing config.json")?;
    if config.get(HOLOGRAPHIC_KEY).is_some_and(|v| !v.is_null()) {
        return Err(ExportError::Refused(holographic_refusal(p)));
    }
    let cfg = ModelConfig::from_json(config.clone()).context("config.json of the entry")?;
    let mut notes = Vec::new();
    let ran = Quantization::parse(&settings.quantization)?;
    if ran != cfg.default_quantization {
        match (cfg.is_bitnet(), cfg.weight_format, ran) {
            (true, WeightFormat::Latent, Quantization::None) => {
                config.as_object_mut().map(|o| o.remove("quantization_config"));
                notes.push(
                    "config.json: `quantization_config` removed — rpt-flow ran this BitNet model unquantised \
                     (quantization = \"none\"), and transformers does the same only without it"
                        .into(),
                );
            }
            (true, WeightFormat::Latent, Quantization::Ternary) => {
                config["quantization_config"] =
                    json!({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"});
                notes.push(
                    "config.json: an online `quantization_config` added — rpt-flow ran this BitNet model with ternary \
                     quantisation, which transformers applies only with it"
                        .into(),
                );
            }
            _ => {
                return Err(ExportError::Refused(format!(
                    "`{}` is a {} model that rpt-flow ran with quantization = \"{}\": transformers has no equivalent \
                     for it (its config.json means \"{}\"). Export a model loaded with quantization = \"auto\"",
                    target.name,
                    format!("{:?}", cfg.arch).to_lowercase(),
                    ran.name(),
                    cfg.default_quantization.name()
                )))
            }
        }
    }
    let stored_dtype = config.get("torch_dtype").and_then(Json::as_str).unwrap_or("(not stated)").to_string();

    let out = match OutDir::prepare(req.dir, req.force, req.cache.root())? {
        Ok(o) => o,
        Err(r) => return Err(ExportError::Refused(r.0)),
    };
    let mut w = Writer { out, files: Vec::new() };
    w.put("config.json", &json_bytes(&config))?;

    // The weights, as the entry holds them (a single file, or shards with their index).
    let mut weights: Vec<PathBuf> = weight_files(&source)?;
    if !source.join("model.safetensors").exists() {
        weights.push(source.join("model.safetensors.index.json"));
    }
    for wf in &weights {
        let name = wf.file_name().expect("weight file name").to_string_lossy().into_owned();
        let size = copy_checked(wf, &w.out.path().join(&name), from_entry.then(|| hashes.get(name.as_str()).copied()))?;
        w.files.push((name, size));
    }

    // Tokenizer and generation files; what AutoTokenizer and generate() need but the model lacks.
    let mut extra: Vec<&str> = AUX_FILES.to_vec();
    extra.push("tokenizer.model");
    for name in extra {
        if source.join(name).is_file() {
            let bytes = read_verified(name)?;
            w.put(name, &bytes)?;
        }
    }
    let has_tokenizer = source.join("tokenizer.json").is_file();
    if has_tokenizer {
        let tok = tokenizers::Tokenizer::from_file(source.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("reading tokenizer.json: {e}"))?;
        let specials = special_tokens(&tok, &cfg);
        if !source.join("tokenizer_config.json").is_file() {
            let mut tc = json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": cfg.max_position_embeddings,
                "clean_up_tokenization_spaces": false,
            });
            for (k, v) in &specials {
                tc[k] = json!(v);
            }
            w.put("tokenizer_config.json", &json_bytes(&tc))?;
            notes.push("tokenizer_config.json written (the model came without one): PreTrainedTokenizerFast with its special tokens".into());
        }
        if !source.join("special_tokens_map.json").is_file() && !specials.is_empty() {
            let map: serde_json::Map<String, Json> = specials.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
            w.put("special_tokens_map.json", &json_bytes(&map))?;
        }
    } else {
        notes.push(
            "no tokenizer: the model was made without tokenizer.json, so AutoTokenizer cannot load this folder".into(),
        );
    }
    if !source.join("generation_config.json").is_file() {
        let mut g = serde_json::Map::new();
        if let Some(b) = cfg.bos_token_id {
            g.insert("bos_token_id".into(), json!(b));
        }
        match cfg.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                g.insert("eos_token_id".into(), json!(one));
            }
            many => {
                g.insert("eos_token_id".into(), json!(many));
            }
        }
        if let Some(pad) = cfg.pad_token_id {
            g.insert("pad_token_id".into(), json!(pad));
        }
        w.put("generation_config.json", &json_bytes(&Json::Object(g)))?;
    }

    if req.with_logits {
        let bytes = reference_logits(&source, &settings, &cfg)?;
        w.put(LOGITS_FILE, &bytes)?;
    }

    let facts = ModelFacts {
        entry: manifest,
        settings,
        arch: format!("{:?}", cfg.arch).to_lowercase(),
        weight_format: match cfg.weight_format {
            WeightFormat::Latent => "latent".into(),
            WeightFormat::Packed => "packed".into(),
        },
        stored_dtype,
        weights_from: if from_entry {
            "the cache entry (re-hashed against its manifest)".into()
        } else {
            format!("the hub snapshot the entry references ({}), copied as it is", source.display())
        },
        has_tokenizer,
        notes,
        with_logits: req.with_logits,
    };
    let recipe = p.recipe_toml();
    w.put("recipe.toml", recipe.as_bytes())?;
    let mut prov = p.to_json();
    prov["export"] = json!({
        "rpt_flow_version": env!("CARGO_PKG_VERSION"),
        "exported_at": crate::session::now_rfc3339(),
        "entry": {
            "key": &facts.entry.key,
            "kind": &facts.entry.kind,
            "version": facts.entry.version,
            "created_unix": facts.entry.created,
            "rpt_flow_version": &facts.entry.rpt_flow_version,
            "files": &facts.entry.files,
        },
        "model": {
            "arch": &facts.arch,
            "weight_format": &facts.weight_format,
            "stored_dtype": &facts.stored_dtype,
            "rpt_flow_dtype": &facts.settings.dtype,
            "quantization": &facts.settings.quantization,
            "weights_from": &facts.weights_from,
        },
        "notes": &facts.notes,
        "files": w.files.iter().map(|(n, s)| json!({"path": n, "size": s})).collect::<Vec<_>>(),
    });
    w.put("rpt_flow.json", &json_bytes(&prov))?;
    let readme = card::render(p, &facts, &recipe);
    w.put("README.md", readme.as_bytes())?;
    let Writer { out, files } = w;
    out.commit()?;
    Ok(Exported { files, notes: facts.notes })
}

/// The refusal for a model with holographic attention, naming the swap and what to export instead.
fn holographic_refusal(p: &Provenance) -> String {
    let lineage = p.lineage();
    let swap = lineage.iter().rev().find(|&&i| p.nodes[i].kind == "swap-attention").map(|&i| &p.nodes[i]);
    let before = swap.and_then(|s| s.inputs.first().map(|(_, n)| n.clone()));
    let mut msg = format!(
        "`{}` has holographic attention (config.json `{HOLOGRAPHIC_KEY}`{}), which transformers does not have: \
         BitNetForCausalLM / LlamaForCausalLM would load it as ordinary full attention, drop the holographic tensors \
         and compute something else. It cannot be exported as a transformers model",
        p.target().name,
        swap.map(|s| format!(", from the swap-attention stage `{}`", s.name)).unwrap_or_default()
    );
    if let Some(b) = before {
        msg.push_str(&format!("; export the model before the swap instead (e.g. `{b}`)"));
    }
    msg
}

/// Special tokens as transformers' tokenizer files name them: bos/eos (and pad) from config.json,
/// spelled as the vocabulary spells them.
fn special_tokens(tok: &tokenizers::Tokenizer, cfg: &ModelConfig) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let mut add = |name: &'static str, id: Option<u32>| {
        if let Some(t) = id.and_then(|i| tok.id_to_token(i)) {
            out.push((name, t));
        }
    };
    add("bos_token", cfg.bos_token_id);
    add("eos_token", cfg.eos_token_ids.first().copied());
    add("pad_token", cfg.pad_token_id);
    out
}

fn check_hash(name: &str, bytes: &[u8], hashes: &HashMap<&str, &str>) -> Result<()> {
    let Some(want) = hashes.get(name) else { bail!("{name} is not listed in the entry's manifest") };
    let got = blake3::hash(bytes).to_hex();
    if got.as_str() != *want {
        bail!("{name} changed after it was verified (blake3 {got}, manifest {want}): nothing was exported");
    }
    Ok(())
}

/// Copies `from` to `to`; with `Some(hash)` the copied bytes must hash to it (a file of the
/// entry). Returns the size.
fn copy_checked(from: &Path, to: &Path, want: Option<Option<&str>>) -> Result<u64> {
    let mut src = std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let mut dst = std::fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = src.read(&mut buf).with_context(|| format!("reading {}", from.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n]).with_context(|| format!("writing {}", to.display()))?;
        size += n as u64;
    }
    if let Some(want) = want {
        let name = from.file_name().unwrap_or_default().to_string_lossy();
        let Some(want) = want else { bail!("{name} is not listed in the entry's manifest") };
        let got = hasher.finalize().to_hex();
        if got.as_str() != want {
            bail!("{name} changed after it was verified (blake3 {got}, manifest {want}): nothing was exported");
        }
    }
    dst.sync_all()?;
    Ok(size)
}

/// The output directory and what has been written into it.
struct Writer {
    out: OutDir,
    files: Vec<(String, u64)>,
}

impl Writer {
    fn put(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        write_file(&self.out.path().join(name), bytes)?;
        self.files.push((name.to_string(), bytes.len() as u64));
        Ok(())
    }
}

/// Pretty JSON with a final newline (a `Value` always serialises).
fn json_bytes<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).expect("JSON values serialise");
    b.push(b'\n');
    b
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// rpt-flow's logits for [`PROMPTS`] (f32, CPU, the quantisation the entry runs with), as
/// safetensors: `input_ids.<i>` (i64 `[1, t]`) and `logits.<i>` (f32 `[1, t, vocab]`); the
/// prompts in the metadata. Without a tokenizer, fixed token ids stand in for the prompts.
fn reference_logits(dir: &Path, settings: &ModelSettings, cfg: &ModelConfig) -> Result<Vec<u8>> {
    let opts = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        quantization: Some(Quantization::parse(&settings.quantization)?),
        pack_for_inference: false,
    };
    let model = Model::from_dir(dir, &opts).with_context(|| format!("loading the model in {}", dir.display()))?;
    // The f32 fake-quant path is the one that matches transformers to float rounding; the CPU
    // int8 kernel sums exactly and can land on the other side of an activation-quantiser tie.
    model.set_ternary_kernel(false);
    let tok = dir.join("tokenizer.json");
    let tokenizer = if tok.is_file() { Some(TextTokenizer::from_file(&tok, cfg)?) } else { None };
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut prompts = Vec::new();
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let ids: Vec<u32> = match &tokenizer {
            Some(t) => t.encode(prompt, Bos::AsTokenizer)?,
            None => (0..8u32).map(|k| (k * 7 + i as u32 * 3) % cfg.vocab_size as u32).collect(),
        };
        if ids.is_empty() {
            continue;
        }
        let t = ids.len();
        let input = Tensor::from_vec(ids.clone(), (1, t), &Device::Cpu)?;
        let logits = model.forward(&input)?.to_dtype(DType::F32)?;
        let ids64: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
        tensors.push((format!("input_ids.{i}"), Tensor::from_vec(ids64, (1, t), &Device::Cpu)?));
        tensors.push((format!("logits.{i}"), logits.contiguous()?));
        prompts.push(if tokenizer.is_some() { json!(prompt) } else { Json::Null });
    }
    let meta: HashMap<String, String> = [
        ("format".to_string(), "pt".to_string()),
        ("prompts".to_string(), serde_json::to_string(&prompts)?),
        ("tokenized".to_string(), "add_special_tokens=True (tokenizer.json's post-processor)".to_string()),
        ("dtype".to_string(), "float32".to_string()),
        ("quantization".to_string(), settings.quantization.clone()),
        ("rpt_flow_version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
    ]
    .into();
    Ok(safetensors::serialize(tensors, Some(meta))?)
}
