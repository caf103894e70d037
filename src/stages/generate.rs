//! `generate`: continuations of prompts (inline, or a named set with expected answers), each
//! labelled correct / wrong / repetitive — the "text" column of the researcher's tables.

use std::collections::HashSet;

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::{json, Map, Value as Json};

use super::model_artifact::{self as artifact, OpenModel};
use crate::data::synthetic;
use crate::exec::{
    typed_params, ArtifactType, InputDef, KindSchema, ParamDef, ParamDefault, ParamType, Stage, StageContext,
};
use crate::model::{Bos, GenerateOptions, Hooks, Sampling};

pub static SCHEMA: KindSchema = KindSchema {
    kind: "generate",
    version: 1,
    help: "Generates continuations of prompts and labels each correct / wrong / repetitive (or unscored without an expected answer).",
    inputs: &[InputDef { name: "input", ty: ArtifactType::Model, required: true, help: "the model" }],
    params: &[
        ParamDef {
            name: "prompts",
            ty: ParamType::Either(&[ParamType::Str, ParamType::List(&ParamType::Any)]),
            default: ParamDefault::Json("\"facts\""),
            help: "a named prompt set (\"facts\") or a list of strings / { prompt, expected } tables",
        },
        ParamDef { name: "max_new_tokens", ty: ParamType::Int { min: Some(1), max: Some(1_000_000) }, default: ParamDefault::Json("16"), help: "tokens to generate per prompt" },
        ParamDef { name: "temperature", ty: ParamType::Float { min: Some(0.0), max: None }, default: ParamDefault::Json("0.0"), help: "0 = greedy" },
        ParamDef { name: "top_p", ty: ParamType::Float { min: Some(0.0), max: Some(1.0) }, default: ParamDefault::Json("1.0"), help: "nucleus sampling (with temperature > 0)" },
        ParamDef { name: "seed", ty: ParamType::UINT, default: ParamDefault::PipelineSeed, help: "sampling seed" },
        ParamDef { name: "bos", ty: ParamType::Enum(&["add", "none"]), default: ParamDefault::Json("\"add\""), help: "start each prompt with BOS" },
        ParamDef {
            name: "repetition_threshold",
            ty: ParamType::FRACTION,
            default: ParamDefault::Json("0.5"),
            help: "a continuation whose distinct-bigram ratio is below this is labelled repetitive",
        },
    ],
    output: ArtifactType::Text,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    prompts: Json,
    max_new_tokens: usize,
    temperature: f64,
    top_p: f64,
    seed: u64,
    bos: String,
    repetition_threshold: f64,
}

pub(super) struct Prompt {
    pub prompt: String,
    pub expected: Option<String>,
}

pub(super) fn prompts_of(v: &Json) -> Result<Vec<Prompt>, String> {
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

/// Distinct-bigram ratio of a token sequence (1 = no bigram repeats; short sequences count as 1).
pub fn distinct_bigrams(tokens: &[u32]) -> f64 {
    if tokens.len() < 3 {
        return 1.0;
    }
    let pairs: Vec<(u32, u32)> = tokens.windows(2).map(|w| (w[0], w[1])).collect();
    pairs.iter().collect::<HashSet<_>>().len() as f64 / pairs.len() as f64
}

/// Whether `expected` appears in `text` as a word (case-insensitive).
pub fn contains_word(text: &str, expected: &str) -> bool {
    let lower = text.to_lowercase();
    let e = expected.to_lowercase();
    lower.match_indices(&e).any(|(i, _)| {
        let before = lower[..i].chars().next_back();
        let after = lower[i + e.len()..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    })
}

pub struct Generate;

impl Stage for Generate {
    fn schema(&self) -> &'static KindSchema {
        &SCHEMA
    }

    fn check(&self, params: &Map<String, Json>) -> Result<(), String> {
        let p: Params = typed_params(params)?;
        if prompts_of(&p.prompts)?.is_empty() {
            return Err("prompts is empty".into());
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext) -> Result<Json> {
        let p: Params = ctx.params()?;
        let prompts = prompts_of(&p.prompts).map_err(anyhow::Error::msg)?;
        let device = artifact::device(ctx.device)?;
        let open = artifact::open(ctx.input("input")?, &device)?;
        let tok = open.tokenizer()?;
        let sampling = if p.temperature == 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Sample { temperature: p.temperature, top_p: p.top_p, seed: p.seed }
        };
        let opts = GenerateOptions { max_new_tokens: p.max_new_tokens, sampling, stop_tokens: tok.stop_ids() };
        let bos = if p.bos == "add" { Bos::Add } else { Bos::None };
        ctx.progress.set_length(prompts.len() as u64);
        let labelled = generate_labelled(
            &open,
            &prompts,
            &opts,
            bos,
            p.repetition_threshold,
            || None,
            |i| {
                ctx.check_cancelled()?;
                ctx.progress.set_position(i as u64);
                Ok(())
            },
        )?;
        std::fs::write(ctx.out_dir.join("generations.json"), serde_json::to_string_pretty(&labelled["outputs"])?)?;
        Ok(labelled)
    }
}

/// Generates a continuation of every prompt and labels it correct / wrong / repetitive /
/// unscored. `hooks` gives the hooks for each prompt's generation (`None`: the plain model);
/// `each(i)` runs before prompt i and once more with `prompts.len()` at the end (progress and
/// cancellation). Returns `{ outputs, counts, accuracy, label }`.
pub(super) fn generate_labelled<'h>(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_match_whole_and_case_insensitively() {
        assert!(contains_word(" Paris, of course", "paris"));
        assert!(contains_word("Neil Armstrong.", "Armstrong"));
        assert!(!contains_word("Parisian", "Paris"));
        assert!(!contains_word("", "Paris"));
    }

    #[test]
    fn bigram_diversity() {
        assert_eq!(distinct_bigrams(&[1, 2, 3, 4]), 1.0);
        assert_eq!(distinct_bigrams(&[7, 7, 7, 7, 7]), 0.25);
        assert_eq!(distinct_bigrams(&[1, 2]), 1.0);
    }
}
