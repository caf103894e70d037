//! `tokenizer.json` (a byte-level BPE, as GPT-2 and Llama 3 / BitNet use) → llama.cpp's
//! `tokenizer.ggml.*` metadata.
//!
//! llama.cpp's `gpt2` tokenizer model reads the vocabulary as strings in id order (byte-level
//! symbols such as `Ġthe`, exactly as in tokenizer.json), a type per token (1 normal, 3 control =
//! special added token, 4 user-defined = other added token, 5 unused = padding up to
//! `vocab_size`), the merges as `"a b"` strings in rank order, and a pre-tokenizer name that
//! selects its split regex. A wrong pre-tokenizer silently changes tokenisation, so only the two
//! recognised exactly are accepted: GPT-2's (`ByteLevel` with its own regex → `gpt-2`) and
//! Llama 3's (a `Split` on the Llama 3 regex, then `ByteLevel` without regex → `llama-bpe`).

use super::format::Value;
use crate::model::ModelConfig;
use anyhow::{bail, Context, Result};
use serde_json::Value as Json;
use std::path::Path;

/// The Llama 3 (and BitNet b1.58 2B-4T) pre-tokenizer regex.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// llama.cpp's pre-tokenizer name for tokenizer.json's `pre_tokenizer`.
fn pre_name(pre: &Json) -> Result<&'static str> {
    let ty = pre.get("type").and_then(Json::as_str).unwrap_or("");
    let regex_true = |p: &Json| p.get("use_regex").and_then(Json::as_bool).unwrap_or(true);
    if ty == "ByteLevel" && regex_true(pre) {
        return Ok("gpt-2");
    }
    if ty == "Sequence" {
        if let Some([split, bl]) = pre.get("pretokenizers").and_then(Json::as_array).map(Vec::as_slice) {
            let pattern = split.get("pattern").and_then(|p| p.get("Regex")).and_then(Json::as_str);
            if split.get("type").and_then(Json::as_str) == Some("Split")
                && pattern == Some(LLAMA3_REGEX)
                && bl.get("type").and_then(Json::as_str) == Some("ByteLevel")
                && !regex_true(bl)
            {
                return Ok("llama-bpe");
            }
        }
    }
    bail!(
        "tokenizer.json pre_tokenizer {pre} is not one llama.cpp's gpt2 tokenizer is known to reproduce \
         (GPT-2's ByteLevel, or Llama 3's Split + ByteLevel); exporting it would tokenise differently"
    )
}

/// Whether the post-processor prepends a special token (transformers' add_special_tokens).
fn adds_bos(post: &Json) -> bool {
    match post.get("type").and_then(Json::as_str) {
        Some("TemplateProcessing") => post
            .get("single")
            .and_then(Json::as_array)
            .and_then(|s| s.first())
            .is_some_and(|f| f.get("SpecialToken").is_some()),
        Some("Sequence") => post.get("processors").and_then(Json::as_array).is_some_and(|ps| ps.iter().any(adds_bos)),
        _ => false,
    }
}

/// The `tokenizer.*` metadata for `dir`'s tokenizer.json (and chat template, if any).
pub fn metadata(dir: &Path, cfg: &ModelConfig) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (GGUF needs the vocabulary)", path.display()))?;
    let tok: Json = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let ctx = || format!("in {}", path.display());
    let model = tok.get("model").context("no \"model\"").with_context(ctx)?;
    let mty = model.get("type").and_then(Json::as_str).unwrap_or("");
    if mty != "BPE" || model.get("byte_fallback").and_then(Json::as_bool) == Some(true) {
        bail!(
            "{}: tokenizer model {mty:?} (byte_fallback?) is not a byte-level BPE; only those are exported",
            path.display()
        );
    }
    let pre = pre_name(tok.get("pre_tokenizer").unwrap_or(&Json::Null)).with_context(ctx)?;
    let n = cfg.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![UNUSED; n];
    let mut place = |id: u64, s: &str, ty: i32| -> Result<()> {
        let slot = tokens
            .get_mut(id as usize)
            .with_context(|| format!("token {s:?} has id {id}, beyond config.json's vocab_size {n}"))?;
        *slot = Some(s.to_string());
        types[id as usize] = ty;
        Ok(())
    };
    let vocab = model.get("vocab").and_then(Json::as_object).context("no model.vocab").with_context(ctx)?;
    for (s, id) in vocab {
        place(id.as_u64().with_context(|| format!("vocab id of {s:?}")).with_context(ctx)?, s, NORMAL)?;
    }
    let mut eot = None;
    for a in tok.get("added_tokens").and_then(Json::as_array).into_iter().flatten() {
        let (Some(id), Some(s)) = (a.get("id").and_then(Json::as_u64), a.get("content").and_then(Json::as_str)) else {
            bail!("{}: malformed added token {a}", path.display());
        };
        let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
        place(id, s, if special { CONTROL } else { USER_DEFINED })?;
        if s == "<|eot_id|>" {
            eot = Some(id as u32);
        }
    }
    let tokens: Vec<String> =
        tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]"))).collect();
    let merges: Vec<String> = model
        .get("merges")
        .and_then(Json::as_array)
        .context("no model.merges")
        .with_context(ctx)?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(p) if p.len() == 2 && p.iter().all(Json::is_string) => {
                Ok(format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or("")))
            }
            other => bail!("malformed merge {other}"),
        })
        .collect::<Result<_>>()
        .with_context(ctx)?;
    let mut kv = vec![
        ("tokenizer.ggml.model".to_string(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::Str(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::strings(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::i32s(types)),
        ("tokenizer.ggml.merges".to_string(), Value::strings(merges)),
    ];
    let bos = cfg.bos_token_id.or_else(|| vocab_id(&tok, "<|begin_of_text|>"));
    if let Some(b) = bos {
        kv.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(&e) = cfg.eos_token_ids.first() {
        kv.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    if let Some(e) = eot {
        kv.push(("tokenizer.ggml.eot_token_id".into(), Value::U32(e)));
    }
    if let Some(p) = cfg.pad_token_id {
        kv.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(p)));
    }
    let add_bos = tok.get("post_processor").is_some_and(adds_bos);
    kv.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    kv.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    if let Some(t) = chat_template(dir)? {
        kv.push(("tokenizer.chat_template".into(), Value::Str(t)));
    }
    Ok(kv)
}

fn vocab_id(tok: &Json, s: &str) -> Option<u32> {
    let added = tok.get("added_tokens").and_then(Json::as_array).into_iter().flatten();
    added
        .filter(|a| a.get("content").and_then(Json::as_str) == Some(s))
        .find_map(|a| a.get("id").and_then(Json::as_u64))
        .map(|x| x as u32)
}

/// `chat_template.jinja`, else tokenizer_config.json's `chat_template` string.
fn chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return Ok(Some(std::fs::read_to_string(&jinja).with_context(|| format!("reading {}", jinja.display()))?));
    }
    let tc = dir.join("tokenizer_config.json");
    if !tc.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&tc).with_context(|| format!("reading {}", tc.display()))?;
    let j: Json = serde_json::from_str(&text).with_context(|| format!("parsing {}", tc.display()))?;
    Ok(j.get("chat_template").and_then(Json::as_str).map(String::from))
}
