//! Generating from a list of prompts and labelling each continuation correct / wrong /
//! repetitive / unscored: shared by `generate` and `hook-residuals` (generation under an
//! intervention).

use anyhow::{bail, Result};
use serde_json::{json, Map, Value as Json};

use crate::analysis::text::{contains_word, distinct_bigrams};
use crate::data::synthetic;
use crate::exec::MetricDef;
use crate::model::{Bos, GenerateOptions, Hooks};
use crate::stages::common::model_artifact::OpenModel;

/// The metrics [`generate_labelled`] writes, for the report contracts of the kinds that call it.
pub const METRICS: [MetricDef; 4] = [
    MetricDef {
        name: "outputs",
        always: true,
        help: "per prompt: prompt, text, token ids, expected answer, hit, repetition, label",
    },
    MetricDef {
        name: "counts",
        always: true,
        help: "how many continuations were correct / wrong / repetitive / unscored",
    },
    MetricDef { name: "accuracy", always: true, help: "correct / scored (null when no prompt has an expected answer)" },
    MetricDef { name: "label", always: true, help: "the majority outcome, the \"text\" column of the tables" },
];

pub struct Prompt {
    pub prompt: String,
    pub expected: Option<String>,
}

pub fn prompts_of(v: &Json) -> Result<Vec<Prompt>, String> {
    match v {
        Json::String(name) => Ok(synthetic::prompt_set(name)
            .map_err(|e| format!("prompts: {e:#}"))?
            .into_iter()
            .map(|f| Prompt { prompt: f.prompt, expected: Some(f.expected) })
            .collect()),
        Json::Array(items) => items
            .iter()
            .map(|i| match i {
                Json::String(s) => Ok(Prompt { prompt: s.clone(), expected: None }),
                Json::Object(t) => {
                    let prompt =
                        t.get("prompt").and_then(Json::as_str).ok_or("a prompt table needs `prompt` (a string)")?;
                    if let Some(k) = t.keys().find(|k| !["prompt", "expected"].contains(&k.as_str())) {
                        return Err(format!("unknown key `{k}` in a prompt table: use prompt, expected"));
                    }
                    let expected =
                        t.get("expected").map(|e| e.as_str().map(str::to_string).ok_or("`expected` must be a string"));
                    Ok(Prompt { prompt: prompt.to_string(), expected: expected.transpose()? })
                }
                _ => Err("each prompt is a string or { prompt = \"…\", expected = \"…\" }".to_string()),
            })
            .collect(),
        _ => Err("prompts must be a prompt-set name or a list".into()),
    }
}

/// Generates a continuation of every prompt and labels it correct / wrong / repetitive /
/// unscored. `hooks` gives the hooks for each prompt's generation (`None`: the plain model);
/// `each(i)` runs before prompt i and once more with `prompts.len()` at the end (progress and
/// cancellation). Returns `{ outputs, counts, accuracy, label }`.
pub fn generate_labelled<'h>(
    open: &OpenModel,
    prompts: &[Prompt],
    opts: &GenerateOptions,
    bos: Bos,
    repetition_threshold: f64,
    mut hooks: impl FnMut() -> Option<Hooks<'h>>,
    mut each: impl FnMut(usize) -> Result<()>,
) -> Result<Json> {
    let tok = open.tokenizer()?;
    let mut outputs = Vec::new();
    let mut counts: Map<String, Json> =
        ["correct", "wrong", "repetitive", "unscored"].iter().map(|k| (k.to_string(), json!(0))).collect();
    for (i, pr) in prompts.iter().enumerate() {
        each(i)?;
        let ids = tok.encode(&pr.prompt, bos)?;
        if ids.is_empty() {
            bail!("prompt {:?} encodes to no tokens", pr.prompt);
        }
        let mut h = hooks();
        let g = open.model.generate(&ids, opts, h.as_mut())?;
        let generated: Vec<u32> = g.tokens.iter().copied().filter(|t| !opts.stop_tokens.contains(t)).collect();
        let text = tok.decode(&generated, true)?;
        let repetition = distinct_bigrams(&generated);
        let hit = pr.expected.as_deref().map(|e| contains_word(&text, e));
        let label = match hit {
            Some(true) => "correct",
            _ if repetition < repetition_threshold => "repetitive",
            Some(false) => "wrong",
            None => "unscored",
        };
        counts[label] = json!(counts[label].as_u64().unwrap_or(0) + 1);
        outputs.push(json!({
            "prompt": pr.prompt,
            "text": text,
            "token_ids": g.tokens,
            "expected": pr.expected,
            "hit": hit,
            "repetition": repetition,
            "label": label,
        }));
    }
    each(prompts.len())?;
    let n = prompts.len() as f64;
    let scored = n - counts["unscored"].as_u64().unwrap_or(0) as f64;
    let correct = counts["correct"].as_u64().unwrap_or(0) as f64;
    let repetitive = counts["repetitive"].as_u64().unwrap_or(0) as f64;
    // One word for the table: the majority outcome.
    let summary = if scored > 0.0 && correct / scored >= 0.5 {
        "correct"
    } else if repetitive / n >= 0.5 {
        "repetitive"
    } else if scored > 0.0 {
        "wrong"
    } else {
        "unscored"
    };
    Ok(json!({
        "outputs": outputs,
        "counts": counts,
        "accuracy": if scored > 0.0 { json!(correct / scored) } else { Json::Null },
        "label": summary,
    }))
}
