//! `load`: a model from the hub, a local directory, a builtin, or random initialisation.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Map, Value as Json};

use crate::data::Source;
use crate::exec::{
    typed_params, ArtifactType, FileHasher, KindSchema, MetricDef, ParamDefault, ParamType, ReportContract, Role,
    Stage, StageContext,
};
use crate::model::{hub::HubSpec, LoadOptions, Model, ModelConfig, Quantization};
use crate::stages::common::model_artifact::{self as artifact, ModelSettings};

pub static SCHEMA: KindSchema = KindSchema {
    kind: "load",
    version: 1,
    help: "Loads a model: \"hf:org/name[@revision]\", \"builtin:<name>\", { path = \"dir\" }, or { random = {config.json fields}, seed = N, tokenizer = <text source> }.",
    inputs: &[],
    params: Params::PARAMS,
    output: ArtifactType::Model,
};

crate::stage_params! {
    struct Params {
        model: Json {
            ty: ParamType::Either(&[ParamType::Str, ParamType::Table]),
            default: ParamDefault::Required,
            help: "model source",
        },
        dtype: String {
            ty: ParamType::Enum(&["f32", "bf16"]),
            default: ParamDefault::Json("\"f32\""),
            help: "compute dtype (f16 is refused for bitnet)",
        },
        quantization: String {
            ty: ParamType::Enum(&["auto", "ternary", "none"]),
            default: ParamDefault::Json("\"auto\""),
            help: "auto = as transformers decides from config.json",
        },
    }
}

/// The parsed `model = …` value.
enum ModelSource {
    Hub(HubSpec),
    Builtin(String),
    Dir(PathBuf),
    Random { config: Map<String, Json>, seed: u64, tokenizer: Option<Json> },
}

fn parse_source(v: &Json) -> Result<ModelSource, String> {
    match v {
        Json::String(s) => {
            if let Some(spec) = HubSpec::parse(s).map_err(|e| format!("{e:#}"))? {
                Ok(ModelSource::Hub(spec))
            } else if let Some(name) = s.strip_prefix("builtin:") {
                Ok(ModelSource::Builtin(name.to_string()))
            } else {
                Err(format!(
                    "model `{s}`: expected \"hf:org/name[@revision]\", \"builtin:<name>\", {{ path = \"dir\" }} or {{ random = {{…}}, seed = N }}"
                ))
            }
        }
        Json::Object(t) => {
            if let Some(path) = t.get("path") {
                if t.len() != 1 {
                    return Err("model = { path = \"dir\" } takes no other keys".into());
                }
                let p = path.as_str().ok_or("model.path must be a string")?;
                return Ok(ModelSource::Dir(PathBuf::from(p)));
            }
            let config = t.get("random").and_then(Json::as_object).cloned().ok_or(
                "a model table is { path = \"dir\" } or { random = {config.json fields}, seed = N, tokenizer = <text source> }",
            )?;
            for k in t.keys() {
                if !["random", "seed", "tokenizer"].contains(&k.as_str()) {
                    return Err(format!("unknown key `{k}` in model = {{ random = … }}: use random, seed, tokenizer"));
                }
            }
            let seed = match t.get("seed") {
                None => 0,
                Some(s) => s.as_u64().ok_or("model.seed must be a non-negative integer")?,
            };
            Ok(ModelSource::Random { config, seed, tokenizer: t.get("tokenizer").cloned() })
        }
        _ => Err("model must be a string or a table".into()),
    }
}

/// A random-init config: config.json fields with defaults for a small bitnet; bitnet gets the
/// online quantization_config of the hub bf16 checkpoints so that it loads ternary by default.
fn random_config(fields: &Map<String, Json>, bos_eos: Option<(u32, u32)>) -> Result<ModelConfig> {
    let mut raw = json!({
        "model_type": "bitnet",
        "hidden_act": "relu2",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": true,
        "initializer_range": 0.02,
    });
    let obj = raw.as_object_mut().expect("object");
    for (k, v) in fields {
        obj.insert(k.clone(), v.clone());
    }
    if obj.get("model_type").and_then(Json::as_str) == Some("llama") && !fields.contains_key("hidden_act") {
        obj.insert("hidden_act".into(), json!("silu"));
    }
    let arch = obj["model_type"].as_str().unwrap_or("").to_string();
    obj.insert("architectures".into(), json!([if arch == "llama" { "LlamaForCausalLM" } else { "BitNetForCausalLM" }]));
    if arch == "bitnet" && !obj.contains_key("quantization_config") {
        obj.insert(
            "quantization_config".into(),
            json!({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}),
        );
    }
    if let Some((bos, eos)) = bos_eos {
        obj.entry("bos_token_id").or_insert(json!(bos));
        obj.entry("eos_token_id").or_insert(json!(eos));
    }
    ModelConfig::from_json(raw).context("model = { random = … }")
}

/// Its role for reports and every top-level metric `run` writes.
pub static REPORT: ReportContract = ReportContract {
    roles: &[Role::Source],
    metrics: &[
        MetricDef { name: "source", always: true, help: "where the model came from (builtin name, hub repo and resolved commit, or local folder and content hash)" },
        MetricDef { name: "arch", always: true, help: "\"bitnet\" or \"llama\"" },
        MetricDef { name: "parameters", always: true, help: "parameter count" },
        MetricDef { name: "layers", always: true, help: "decoder layers" },
        MetricDef { name: "hidden_size", always: true, help: "model width" },
        MetricDef { name: "vocab_size", always: true, help: "vocabulary size" },
        MetricDef { name: "dtype", always: true, help: "the dtype the model is held in" },
        MetricDef { name: "quantization", always: true, help: "\"ternary\" (BitNet b1.58 weights) or \"none\"" },
        MetricDef { name: "weight_format", always: true, help: "how the checkpoint stores projections: latent (bf16/f32) or packed ternary" },
        MetricDef { name: "ternary_zero_fraction", always: false, help: "ternary models: fraction of projection weights that quantize to 0" },
        MetricDef { name: "ternary_zero_per_tensor", always: false, help: "ternary models: that fraction per projection" },
    ],
};

pub struct Load;

impl Stage for Load {
    fn schema(&self) -> &'static KindSchema {
        &SCHEMA
    }

    fn report(&self) -> &'static ReportContract {
        &REPORT
    }

    fn check(&self, params: &Map<String, Json>) -> Result<(), String> {
        let p: Params = typed_params(params)?;
        if let ModelSource::Random { tokenizer: Some(t), .. } = parse_source(&p.model)? {
            Source::from_value(&t).map_err(|e| format!("model.tokenizer: {e:#}"))?;
        }
        Ok(())
    }

    fn identity(&self, params: &Map<String, Json>, files: &FileHasher) -> Result<Option<Json>, String> {
        let p: Params = typed_params(params)?;
        Ok(Some(match parse_source(&p.model)? {
            ModelSource::Hub(spec) => {
                // The commit, resolved now: a key that moved after the first download would make a
                // killed run start over and a finished one look undone.
                let commit = if files.remote() {
                    crate::model::hub::resolve_commit(&spec).map_err(|e| format!("{e:#}"))?
                } else {
                    // validate / graph: no key is shown, so no hub request is made.
                    crate::model::hub::local_commit(&spec).unwrap_or_else(|| format!("unresolved {}", spec.revision))
                };
                json!({ "hub": spec.repo, "commit": commit })
            }
            ModelSource::Builtin(name) => match crate::stages::common::builtin::identity(&name) {
                Some(id) => id,
                None => return Err(crate::stages::common::builtin::unknown(&name)),
            },
            ModelSource::Dir(dir) => {
                let dir = files.resolve(&dir);
                if !dir.join("config.json").exists() {
                    return Err(format!("model directory `{}` has no config.json", dir.display()));
                }
                json!({ "files": files.hash_tree(&dir).map_err(|e| format!("{e:#}"))? })
            }
            ModelSource::Random { tokenizer, .. } => match tokenizer {
                None => Json::Null,
                Some(t) => {
                    let src = Source::from_value(&t)
                        .map_err(|e| format!("model.tokenizer: {e:#}"))?
                        .with_base_dir(files.base_dir());
                    json!({ "tokenizer_text": src.identity().map_err(|e| format!("{e:#}"))? })
                }
            },
        }))
    }

    fn run(&self, ctx: &StageContext) -> Result<Json> {
        let p: Params = ctx.params()?;
        let device = artifact::device(ctx.device)?;
        let dtype = artifact::dtype_of(&p.dtype)?;
        let quantization = match p.quantization.as_str() {
            "auto" => None,
            q => Some(Quantization::parse(q)?),
        };
        let opts = LoadOptions { dtype, device: device.clone(), quantization, pack_for_inference: false };
        // A model this stage does not save is only described: for a ternary f32 model on CPU
        // its projections need not exist in f32 (the 2B model: ~3 GB instead of ~10).
        let describe_only = LoadOptions { pack_for_inference: true, ..opts.clone() };
        let source = parse_source(&p.model).map_err(anyhow::Error::msg)?;
        tracing::info!(
            instance = %ctx.instance, model = %p.model, dtype = %p.dtype, quantization = %p.quantization,
            "loading model"
        );
        let out = ctx.out_dir;
        let (model, origin) = match source {
            ModelSource::Hub(spec) => {
                let commit = crate::model::hub::resolve_commit(&spec)?;
                let dir = crate::model::hub::fetch_commit(&spec, &commit)?;
                let model = Model::from_dir(&dir, &describe_only)?;
                let settings = settings_of(&model, Some(dir.clone()));
                artifact::write_settings(out, &settings)?;
                (model, json!({ "hub": spec.repo, "revision": spec.revision, "commit": commit, "snapshot": dir }))
            }
            ModelSource::Dir(dir) => {
                let dir = ctx.resolve(&dir);
                let model = Model::from_dir(&dir, &describe_only)?;
                copy_model_files(&dir, out)?;
                artifact::write_settings(out, &settings_of(&model, None))?;
                (model, json!({ "path": dir }))
            }
            ModelSource::Builtin(name) => {
                let dir = crate::stages::common::builtin::materialise(&name, out)?;
                let model = Model::from_dir(&dir, &describe_only)?;
                artifact::write_settings(out, &settings_of(&model, None))?;
                (model, json!({ "builtin": name }))
            }
            ModelSource::Random { config, seed, tokenizer } => {
                let tok = match &tokenizer {
                    None => None,
                    Some(t) => Some(train_tokenizer(t, &config, ctx.base_dir)?),
                };
                let bos_eos = tok.as_ref().map(|_| (0, 1));
                let cfg = random_config(&config, bos_eos)?;
                let model = Model::random(&cfg, seed, &opts)?;
                let settings = settings_of(&model, None);
                artifact::save(&model, out, None, &settings)?;
                if let Some(t) = tok {
                    t.save(out.join("tokenizer.json"), false)
                        .map_err(|e| anyhow::anyhow!("saving tokenizer.json: {e}"))?;
                }
                (model, json!({ "random": config, "seed": seed }))
            }
        };
        artifact::warn_if_slow_on_cpu(&model);
        let m = describe(&model, origin)?;
        tracing::info!(
            instance = %ctx.instance, arch = %m["arch"].as_str().unwrap_or_default(), parameters = %m["parameters"],
            layers = %m["layers"],
            dtype = %m["dtype"].as_str().unwrap_or_default(),
            quantization = %m["quantization"].as_str().unwrap_or_default(), "model loaded"
        );
        Ok(m)
    }
}

fn settings_of(model: &Model, source: Option<PathBuf>) -> ModelSettings {
    ModelSettings {
        dtype: artifact::dtype_name(model.dtype()).to_string(),
        quantization: model.quantization().name().to_string(),
        source,
        train_steps: 0,
    }
}

/// Copies the model files of a local directory into the entry, following symbolic links (a hub
/// snapshot is a folder of links into `blobs/`). (Not hard links: a tool that later rewrites the
/// source file in place would silently change the cached entry too.) Fails when no weights were
/// copied, so a broken entry is never committed.
fn copy_model_files(src: &Path, out: &Path) -> Result<()> {
    let mut weights = 0;
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name_s = name.to_string_lossy();
        let wanted = name_s.ends_with(".safetensors")
            || name_s.ends_with(".json")
            || name_s.ends_with(".jinja")
            || name_s == "tokenizer.model";
        // metadata() follows links; a dangling link is an error, not a silent skip.
        let meta = std::fs::metadata(entry.path()).with_context(|| format!("reading {}", entry.path().display()))?;
        if !meta.is_file() || !wanted || name_s == artifact::SETTINGS_FILE {
            continue;
        }
        std::fs::copy(entry.path(), out.join(&name)).with_context(|| format!("copying {}", entry.path().display()))?;
        weights += usize::from(name_s.ends_with(".safetensors") && name_s != artifact::MASK_FILE);
    }
    if weights == 0 {
        bail!("model directory {} has no weights (model.safetensors or shards) that could be copied", src.display());
    }
    Ok(())
}

fn train_tokenizer(source: &Json, config: &Map<String, Json>, base: &Path) -> Result<tokenizers::Tokenizer> {
    let vocab = config
        .get("vocab_size")
        .and_then(Json::as_u64)
        .context("model = { random = … } with a tokenizer needs random.vocab_size")?;
    let rows = Source::from_value(source)?.with_base_dir(base).rows_with(&crate::data::HubOptions::from_env())?;
    crate::data::train_bpe(&rows, vocab as usize)
}

/// Metrics common to every load: size, format, and how many latent weights quantise to 0.
fn describe(model: &Model, origin: Json) -> Result<Json> {
    let cfg = model.config();
    let parameters = model.stored_parameter_count();
    let mut m = json!({
        "source": origin,
        "arch": format!("{:?}", cfg.arch).to_lowercase(),
        "parameters": parameters,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "dtype": artifact::dtype_name(model.dtype()),
        "quantization": model.quantization().name(),
        "weight_format": format!("{:?}", model.weight_format()).to_lowercase(),
    });
    if cfg.is_bitnet() {
        let (per, overall) = artifact::ternary_zero_fractions(model)?;
        m["ternary_zero_fraction"] = json!(overall);
        m["ternary_zero_per_tensor"] = json!(per);
    }
    if parameters == 0 {
        bail!("the model has no parameters");
    }
    Ok(m)
}
