//! `eval-tasks`: multiple-choice accuracy as lm-evaluation-harness computes it — the summed
//! log-likelihood of each choice as a continuation of the prompt (`acc`), and per character of
//! the choice (`acc_norm`), with standard errors; every item's log-likelihoods in `items.jsonl`.
//!
//! Tokenisation follows the harness's (0.4.9) causal-LM path: the tokenizer's own special tokens
//! (a BOS when its post-processor adds one); trailing whitespace of the context moves to the
//! continuation; the continuation's tokens are those of `context + continuation` after the
//! context's own; an empty context is the BOS (else EOS) token; inputs longer than the model's
//! window keep their last `max_position_embeddings` tokens.

use std::io::Write as _;
use std::time::Instant;

use anyhow::{Context as _, Result};
use candle_core::Tensor;
use serde_json::{json, Map, Value as Json};

use crate::analysis::multiple_choice::{self, ScoredItem};
use crate::data::tasks::{McTask, PromptFormat, Request, TaskSpec};
use crate::exec::{
    typed_params, ArtifactType, FileHasher, InputDef, KindSchema, MetricDef, ParamDefault, ParamType, ReportContract,
    Role, Stage, StageContext,
};
use crate::model::{Bos, Model, TextTokenizer};
use crate::stages::common::model_artifact as artifact;
use crate::stages::common::scoring;

pub static SCHEMA: KindSchema = KindSchema {
    kind: "eval-tasks",
    version: 1,
    help: "Multiple-choice accuracy (acc, acc_norm) by log-likelihood, as lm-evaluation-harness scores it.",
    inputs: &[InputDef { name: "input", ty: ArtifactType::Model, required: true, help: "the model to evaluate" }],
    params: Params::PARAMS,
    output: ArtifactType::Metrics,
};

crate::stage_params! {
    struct Params {
        task: Json {
            ty: ParamType::Either(&[ParamType::Str, ParamType::Table]),
            default: ParamDefault::Required,
            help: "arc_easy, arc_challenge, hellaswag, piqa, winogrande, mmlu, mmlu:<subject> (hub, pinned), synthetic:facts-mc, or { jsonl = \"items.jsonl\", text = \"Question: {question}\\nAnswer:\", choices = \"choices\", gold = \"answer\" } (docs/tasks.md)",
        },
        num_fewshot: usize {
            ty: ParamType::Int { min: Some(0), max: Some(64) },
            default: ParamDefault::Json("0"),
            help: "examples before each item: MMLU's first n dev items of the subject; otherwise drawn (seeded) from the training split or the task's other items",
        },
        fewshot_seed: u64 {
            ty: ParamType::UINT,
            default: ParamDefault::Json("1234"),
            help: "seed of the few-shot draw (per item)",
        },
        limit: Option<usize> {
            ty: ParamType::Int { min: Some(1), max: None },
            default: ParamDefault::Optional,
            help: "score only the first N items",
        },
        target_delimiter: String {
            ty: ParamType::Str,
            default: ParamDefault::Json("\" \""),
            help: "between a prompt and a choice",
        },
        fewshot_delimiter: String {
            ty: ParamType::Str,
            default: ParamDefault::Json("\"\\n\\n\""),
            help: "after each few-shot example",
        },
        batch: usize {
            ty: ParamType::Int { min: Some(1), max: Some(65_536) },
            default: ParamDefault::Json("8"),
            help: "requests of equal length per forward pass",
        },
    }
}

/// Its role for reports and every top-level metric `run` writes.
pub static REPORT: ReportContract = ReportContract { roles: &[Role::Tasks], metrics: &METRICS };

static METRICS: [MetricDef; 11] = [
    MetricDef { name: "task", always: true, help: "the task scored" },
    MetricDef { name: "items", always: true, help: "items scored" },
    MetricDef { name: "acc", always: true, help: "share of items whose gold choice has the highest log-likelihood" },
    MetricDef { name: "acc_stderr", always: true, help: "standard error of acc (sample sd / √n)" },
    MetricDef {
        name: "acc_norm",
        always: true,
        help: "as acc, with log-likelihoods divided by the choice's characters",
    },
    MetricDef { name: "acc_norm_stderr", always: true, help: "standard error of acc_norm" },
    MetricDef { name: "tokens_per_second", always: true, help: "scoring throughput (input tokens)" },
    MetricDef { name: "num_fewshot", always: true, help: "examples before each item" },
    MetricDef { name: "protocol", always: true, help: "how the prompts were made and scored" },
    MetricDef { name: "subjects", always: false, help: "MMLU: items, acc and acc_norm per subject" },
    MetricDef {
        name: "categories",
        always: false,
        help: "MMLU: items, acc and acc_norm per category (stem, humanities, …)",
    },
];

pub struct EvalTasks;

impl Stage for EvalTasks {
    fn schema(&self) -> &'static KindSchema {
        &SCHEMA
    }

    fn report(&self) -> &'static ReportContract {
        &REPORT
    }

    fn check(&self, params: &Map<String, Json>) -> Result<(), String> {
        let p: Params = typed_params(params)?;
        TaskSpec::parse(&p.task).map_err(|e| format!("task: {e:#}"))?;
        Ok(())
    }

    fn identity(&self, params: &Map<String, Json>, files: &FileHasher) -> Result<Option<Json>, String> {
        let p: Params = typed_params(params)?;
        let spec = TaskSpec::parse(&p.task).map_err(|e| format!("task: {e:#}"))?;
        let id = spec.identity(|path| files.hash_file(&files.resolve(path))).map_err(|e| format!("task: {e:#}"))?;
        Ok(Some(json!({ "task": id })))
    }

    fn run(&self, ctx: &StageContext) -> Result<Json> {
        let p: Params = ctx.params()?;
        let hub = crate::data::HubOptions::from_env();
        let task = TaskSpec::parse(&p.task)?.load(ctx.base_dir, &hub, p.num_fewshot > 0)?;
        let format = PromptFormat {
            target_delimiter: p.target_delimiter.clone(),
            fewshot_delimiter: p.fewshot_delimiter.clone(),
            num_fewshot: p.num_fewshot,
            fewshot_seed: p.fewshot_seed,
        };
        let n = p.limit.map_or(task.items.len(), |l| l.min(task.items.len()));
        let device = artifact::device(ctx.device)?;
        let open = artifact::open_for_inference(ctx.input("input")?, &device)?;
        let tok = open.tokenizer()?;
        let max_len = open.model.config().max_position_embeddings;

        // Every request of every item, tokenised; each item's prompt kept for items.jsonl.
        let mut encoded = Vec::new();
        let mut prompts = Vec::with_capacity(n);
        for i in 0..n {
            let requests = task.requests(i, &format)?;
            for r in &requests {
                encoded.push(encode_request(tok, r, max_len)?);
            }
            prompts.push(requests.into_iter().next().map(|r| r.context).unwrap_or_default());
        }
        ctx.progress.set_length(encoded.len() as u64);
        let started = Instant::now();
        let lls = score(&open.model, &encoded, p.batch, ctx)?;
        // Input tokens the requests stand for (shared passes count once per request).
        let fed: usize = encoded.iter().map(|e| e.input.len()).sum();
        let seconds = started.elapsed().as_secs_f64();

        let mut scored = Vec::with_capacity(n);
        let mut file = std::io::BufWriter::new(std::fs::File::create(ctx.out_dir.join("items.jsonl"))?);
        let mut at = 0;
        for (i, (item, prompt)) in task.items.iter().zip(&prompts).enumerate() {
            let k = item.choices.len();
            let s = ScoredItem { lls: lls[at..at + k].to_vec(), choice_chars: task.choice_chars(i), gold: item.gold };
            let line = json!({
                "index": i,
                "context": prompt,
                "choices": item.choices,
                "gold": item.gold,
                "lls": s.lls,
                "pred": s.pred(),
                "pred_norm": s.pred_norm(),
            });
            writeln!(file, "{line}")?;
            scored.push(s);
            at += k;
        }
        file.flush()?;
        let summary = multiple_choice::summarize(&scored);
        let mut metrics = json!({
            "task": task.name,
            "items": summary.items,
            "acc": summary.acc.acc,
            "acc_stderr": finite(summary.acc.stderr),
            "acc_norm": summary.acc_norm.acc,
            "acc_norm_stderr": finite(summary.acc_norm.stderr),
            "tokens_per_second": fed as f64 / seconds.max(1e-9),
            "num_fewshot": p.num_fewshot,
            "protocol": protocol(&task, &format, &p, &open.settings.dtype),
        });
        if let Some(subjects) = &task.subjects {
            metrics["subjects"] = by_group(&scored, |i| subjects[i].clone());
            metrics["categories"] = by_group(&scored, |i| mmlu_category(&subjects[i]).to_string());
        }
        tracing::info!(
            instance = %ctx.instance, task = %task.name, items = summary.items, acc = summary.acc.acc,
            acc_norm = summary.acc_norm.acc, "eval-tasks done"
        );
        Ok(metrics)
    }
}

/// `{group: {items, acc, acc_norm}}` over the items each belongs to (MMLU's subjects and
/// categories; the overall `acc` weighs every item once, as the harness's `weight_by_size`).
fn by_group(scored: &[ScoredItem], group: impl Fn(usize) -> String) -> Json {
    let mut groups: std::collections::BTreeMap<String, Vec<ScoredItem>> = Default::default();
    for (i, s) in scored.iter().enumerate() {
        groups.entry(group(i)).or_default().push(s.clone());
    }
    groups
        .into_iter()
        .map(|(g, items)| {
            let s = multiple_choice::summarize(&items);
            (g, json!({ "items": s.items, "acc": s.acc.acc, "acc_norm": s.acc_norm.acc }))
        })
        .collect::<Map<String, Json>>()
        .into()
}

fn mmlu_category(subject: &str) -> &'static str {
    crate::data::task_hub::MMLU_SUBJECTS.iter().find(|(s, _)| *s == subject).map_or("other", |(_, c)| c)
}

/// JSON has no NaN: an undefined standard error (one item) is null.
fn finite(x: f64) -> Json {
    if x.is_finite() {
        json!(x)
    } else {
        Json::Null
    }
}

fn protocol(task: &McTask, f: &PromptFormat, p: &Params, dtype: &str) -> Json {
    json!({
        "scoring": match task.scoring {
            crate::data::tasks::Scoring::Continuation => "continuation",
            crate::data::tasks::Scoring::Partial => "partial",
        },
        "target_delimiter": f.target_delimiter,
        "fewshot_delimiter": f.fewshot_delimiter,
        "fewshot_seed": p.fewshot_seed,
        "limit": p.limit,
        "task_items": task.items.len(),
        "special_tokens": "as the tokenizer adds them (lm-evaluation-harness 0.4.9's HF default)",
        "acc_norm": "log-likelihood / characters of the choice",
        "model_dtype": dtype,
    })
}

/// A request as token ids: the model's input and the continuation tokens it predicts last.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub input: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// The harness's `loglikelihood` tokenisation (`_encode_pair` for a context, the BOS — else EOS —
/// token for none) and its truncation to the model's window.
pub fn encode_request(tok: &TextTokenizer, r: &Request, max_len: usize) -> Result<Encoded> {
    let prefix = tok.bos_id.or_else(|| tok.eos_ids.first().copied());
    let (ctx_ids, cont_ids) = if r.context.is_empty() {
        let prefix = prefix.context("the tokenizer has no BOS or EOS id")?;
        let cont = tok.encode(&r.continuation, Bos::None)?;
        if cont.first() == Some(&prefix) {
            (cont[..1].to_vec(), cont[1..].to_vec())
        } else {
            (vec![prefix], cont)
        }
    } else {
        let (context, continuation) = move_trailing_space(&r.context, &r.continuation);
        let whole = encode_as_harness(tok, &format!("{context}{continuation}"), prefix)?;
        let ctx_ids = encode_as_harness(tok, &context, prefix)?;
        let cont = whole.get(ctx_ids.len()..).unwrap_or_default().to_vec();
        (ctx_ids, cont)
    };
    anyhow::ensure!(!cont_ids.is_empty(), "the continuation {:?} has no tokens of its own", r.continuation);
    let mut all = ctx_ids;
    all.extend_from_slice(&cont_ids);
    // (ctx + cont)[-(max_len + 1):][:-1]
    let start = all.len().saturating_sub(max_len + 1);
    let input = all[start..all.len() - 1].to_vec();
    let keep = cont_ids.len().min(input.len());
    Ok(Encoded { input, continuation: cont_ids[cont_ids.len() - keep..].to_vec() })
}

/// The harness's `tok_encode`: the tokenizer's own special tokens (transformers'
/// `add_special_tokens=True`), unless the text already starts with the BOS token's text.
fn encode_as_harness(tok: &TextTokenizer, text: &str, prefix: Option<u32>) -> Result<Vec<u32>> {
    let bos_text = match prefix {
        Some(id) => tok.decode(&[id], false)?,
        None => String::new(),
    };
    let starts_with_bos = !bos_text.is_empty() && text.starts_with(&bos_text);
    tok.encode(text, if starts_with_bos { Bos::None } else { Bos::AsTokenizer })
}

/// Python's `context.rstrip()`: its trailing whitespace goes to the front of the continuation.
fn move_trailing_space(context: &str, continuation: &str) -> (String, String) {
    let kept = context.trim_end();
    let moved = &context[kept.len()..];
    (kept.to_string(), format!("{moved}{continuation}"))
}

/// The summed log-likelihood of each request's continuation. Requests with the same input (an
/// item's choices of one token each, as MMLU's A–D: the prompt is the input of all four) share one
/// forward pass; distinct inputs of equal length go through the model together, `batch` at a time.
fn score(model: &Model, encoded: &[Encoded], batch: usize, ctx: &StageContext) -> Result<Vec<f64>> {
    let mut lls = vec![0.0; encoded.len()];
    // Distinct inputs, each with the requests that read it.
    let mut index: std::collections::HashMap<&[u32], usize> = Default::default();
    let mut inputs: Vec<(&[u32], Vec<usize>)> = Vec::new();
    for (i, e) in encoded.iter().enumerate() {
        let k = *index.entry(e.input.as_slice()).or_insert_with(|| {
            inputs.push((e.input.as_slice(), Vec::new()));
            inputs.len() - 1
        });
        inputs[k].1.push(i);
    }
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    order.sort_by_key(|&u| (inputs[u].0.len(), u));
    let mut done = 0u64;
    for group in order.chunk_by(|&a, &b| inputs[a].0.len() == inputs[b].0.len()) {
        for chunk in group.chunks(batch) {
            ctx.check_cancelled()?;
            let t = inputs[chunk[0]].0.len();
            let ids: Vec<u32> = chunk.iter().flat_map(|&u| inputs[u].0.iter().copied()).collect();
            let ids = Tensor::from_vec(ids, (chunk.len(), t), model.device())?;
            let logp = scoring::log_probs(&model.forward(&ids).context("forward pass")?)?;
            for (row, &u) in chunk.iter().enumerate() {
                let row_logp = logp.get(row)?;
                for &i in &inputs[u].1 {
                    let cont = &encoded[i].continuation;
                    lls[i] = scoring::summed_log_prob(&row_logp, t - cont.len(), cont)?;
                }
                done += inputs[u].1.len() as u64;
            }
            ctx.progress.set_position(done);
        }
    }
    Ok(lls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_whitespace_moves_to_the_continuation() {
        assert_eq!(move_trailing_space("Answer: \n", "B"), ("Answer:".into(), " \nB".into()));
        assert_eq!(move_trailing_space("Answer:", " B"), ("Answer:".into(), " B".into()));
        assert_eq!(move_trailing_space("   ", "x"), ("".into(), "   x".into()));
    }
}
