//! Multiple-choice task items — a context, its choices, the gold one — and the prompts a model
//! scores, built as lm-evaluation-harness builds them for `multiple_choice` tasks: the context is
//! the description, then each few-shot example (`text + target_delimiter + gold choice`) followed
//! by the few-shot delimiter, then the item's text; each choice is scored as the continuation
//! `target_delimiter + choice`. Sources: a local JSONL file with a small mapping, and the
//! synthetic facts world (`synthetic:facts-mc`). Knows nothing of models.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Map, Value as Json};

use super::synthetic;
use crate::rng::SplitMix64;

/// One multiple-choice item.
#[derive(Clone, Debug, PartialEq)]
pub struct McItem {
    /// What the model reads before a choice (the harness's `doc_to_text`).
    pub text: String,
    pub choices: Vec<String>,
    pub gold: usize,
}

/// How an item's choices are scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// Each choice continues the text (ARC, HellaSwag, PIQA, MMLU).
    Continuation,
    /// Each choice is a context and the text is the shared continuation (WinoGrande's partial
    /// scoring: the sentence up to the blank filled with each option, then the rest).
    Partial,
}

/// A task's items with what formatting them needs.
#[derive(Clone, Debug)]
pub struct McTask {
    /// For people: `synthetic:facts-mc`, `jsonl:items.jsonl`, `arc_easy`.
    pub name: String,
    pub items: Vec<McItem>,
    /// Where few-shot examples come from (the harness's fewshot split, else the items).
    pub fewshot_pool: Option<Vec<McItem>>,
    /// Put before the examples of every item.
    pub description: String,
    pub scoring: Scoring,
    /// Each item's subject (MMLU): it names the item's description and few-shot examples.
    pub subjects: Option<Vec<String>>,
    /// Each few-shot pool item's subject (MMLU).
    pub pool_subjects: Option<Vec<String>>,
    pub fewshot: Fewshot,
}

/// How few-shot examples are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fewshot {
    /// Drawn per item with a generator keyed by the seed and the item's index.
    Seeded,
    /// The first n pool items of the item's subject (the harness's `first_n` sampler, MMLU).
    FirstNOfSubject,
}

/// One request: the log-likelihood of `continuation` after `context`.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub context: String,
    pub continuation: String,
}

/// How prompts are put together (the harness's defaults: `" "` and `"\n\n"`).
#[derive(Clone, Debug)]
pub struct PromptFormat {
    pub target_delimiter: String,
    pub fewshot_delimiter: String,
    pub num_fewshot: usize,
    pub fewshot_seed: u64,
}

impl McTask {
    /// A task of continuation-scored items, no description, seeded few-shot draws from its own
    /// items.
    pub fn plain(name: impl Into<String>, items: Vec<McItem>) -> McTask {
        McTask {
            name: name.into(),
            items,
            fewshot_pool: None,
            description: String::new(),
            scoring: Scoring::Continuation,
            subjects: None,
            pool_subjects: None,
            fewshot: Fewshot::Seeded,
        }
    }

    /// The few-shot examples of item `i`: `num_fewshot` distinct items of the pool drawn with a
    /// generator keyed by the seed and `i`; from the task's own items, never `i` itself.
    pub fn shots(&self, i: usize, f: &PromptFormat) -> Result<Vec<&McItem>> {
        if f.num_fewshot == 0 {
            return Ok(Vec::new());
        }
        let (pool, own) = match &self.fewshot_pool {
            Some(p) => (p.as_slice(), false),
            None => (self.items.as_slice(), true),
        };
        if self.fewshot == Fewshot::FirstNOfSubject {
            let subject = self.subjects.as_ref().map(|s| s[i].as_str());
            let of_subject: Vec<&McItem> = pool
                .iter()
                .enumerate()
                .filter(|(j, _)| self.pool_subjects.as_ref().map(|s| s[*j].as_str()) == subject)
                .map(|(_, item)| item)
                .collect();
            if of_subject.len() < f.num_fewshot {
                bail!(
                    "{}: {} few-shot examples asked for, the subject has {}",
                    self.name,
                    f.num_fewshot,
                    of_subject.len()
                );
            }
            return Ok(of_subject[..f.num_fewshot].to_vec());
        }
        let mut candidates: Vec<usize> = (0..pool.len()).filter(|&j| !(own && j == i)).collect();
        if candidates.len() < f.num_fewshot {
            bail!(
                "{}: {} few-shot examples asked for, but only {} items can serve as examples",
                self.name,
                f.num_fewshot,
                candidates.len()
            );
        }
        let mut rng = SplitMix64::keyed(f.fewshot_seed, &[i as u64]);
        rng.shuffle(&mut candidates);
        Ok(candidates[..f.num_fewshot].iter().map(|&j| &pool[j]).collect())
    }

    /// The requests of item `i`, one per choice, in choice order.
    pub fn requests(&self, i: usize, f: &PromptFormat) -> Result<Vec<Request>> {
        let item = &self.items[i];
        let mut prefix = match &self.subjects {
            Some(s) => super::task_hub::mmlu_description(&s[i]),
            None => self.description.clone(),
        };
        for shot in self.shots(i, f)? {
            let (text, target) = match self.scoring {
                Scoring::Continuation => (shot.text.clone(), shot.choices[shot.gold].clone()),
                Scoring::Partial => (shot.choices[shot.gold].clone(), shot.text.clone()),
            };
            prefix.push_str(&text);
            prefix.push_str(&f.target_delimiter);
            prefix.push_str(&target);
            prefix.push_str(&f.fewshot_delimiter);
        }
        Ok(match self.scoring {
            Scoring::Continuation => item
                .choices
                .iter()
                .map(|c| Request {
                    context: format!("{prefix}{}", item.text),
                    continuation: format!("{}{c}", f.target_delimiter),
                })
                .collect(),
            Scoring::Partial => item
                .choices
                .iter()
                .map(|c| Request {
                    context: format!("{prefix}{c}"),
                    continuation: format!("{}{}", f.target_delimiter, item.text),
                })
                .collect(),
        })
    }

    /// The length the harness's `acc_norm` divides by: each choice's characters (Python's
    /// `len`; for partial scoring the choices are the contexts, and so are their lengths).
    pub fn choice_chars(&self, i: usize) -> Vec<usize> {
        self.items[i].choices.iter().map(|c| c.chars().count()).collect()
    }
}

// ---- sources ---------------------------------------------------------------------------------

/// The synthetic task names (`synthetic:<name>`).
pub const SYNTHETIC: [&str; 1] = ["facts-mc"];

/// Which fields of a JSONL line hold what.
#[derive(Clone, Debug, PartialEq)]
pub struct JsonlMapping {
    pub path: PathBuf,
    /// The item's text: a template where `{field}` is that field's value.
    pub text: String,
    /// The field holding the array of choice strings.
    pub choices: String,
    /// The field holding the gold choice: its index, its text, or a letter `A`, `B`, ….
    pub gold: String,
}

/// A task as a pipeline names it.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskSpec {
    Synthetic(String),
    Jsonl(JsonlMapping),
    /// A hub task (`arc_easy`, `mmlu:anatomy`, …; see [`super::task_hub`]).
    Hub(String),
}

impl TaskSpec {
    /// `"synthetic:facts-mc"`, or `{ jsonl = "items.jsonl", text = "…", choices = "…", gold = "…" }`.
    pub fn parse(v: &Json) -> Result<TaskSpec> {
        match v {
            Json::String(s) => match s.strip_prefix("synthetic:") {
                Some(name) if SYNTHETIC.contains(&name) => Ok(TaskSpec::Synthetic(name.to_string())),
                Some(name) => bail!(
                    "task `synthetic:{name}` is not known: the synthetic tasks are synthetic:{}",
                    SYNTHETIC.join(", synthetic:")
                ),
                None => match super::task_hub::check_name(s) {
                    Ok(()) => Ok(TaskSpec::Hub(s.clone())),
                    Err(e) => bail!(
                        "{e:#}; or synthetic:{}, or a local file {{ jsonl = \"items.jsonl\", text = \"{{question}}\", choices = \"choices\", gold = \"answer\" }}",
                        SYNTHETIC.join(", synthetic:")
                    ),
                },
            },
            Json::Object(o) => {
                let field = |k: &str, default: &str| -> Result<String> {
                    match o.get(k) {
                        None => Ok(default.to_string()),
                        Some(Json::String(s)) if !s.is_empty() => Ok(s.clone()),
                        Some(other) => bail!("task.{k} must be a non-empty string, found {other}"),
                    }
                };
                if let Some(k) = o.keys().find(|k| !["jsonl", "text", "choices", "gold"].contains(&k.as_str())) {
                    bail!("task has an unknown key `{k}` (expected jsonl, text, choices, gold)");
                }
                let Some(Json::String(path)) = o.get("jsonl") else {
                    bail!("a task table needs `jsonl = \"path/to/items.jsonl\"`");
                };
                Ok(TaskSpec::Jsonl(JsonlMapping {
                    path: PathBuf::from(path),
                    text: field("text", "{context}")?,
                    choices: field("choices", "choices")?,
                    gold: field("gold", "gold")?,
                }))
            }
            other => bail!("task must be a name or a table, found {other}"),
        }
    }

    /// What identifies the items in cache keys (a local file by its content hash).
    pub fn identity(&self, file_hash: impl Fn(&Path) -> Result<String>) -> Result<Json> {
        Ok(match self {
            TaskSpec::Synthetic(name) => {
                json!({ "kind": "synthetic", "name": name, "generator_version": synthetic::GENERATOR_VERSION })
            }
            TaskSpec::Hub(name) => super::task_hub::identity(name)?,
            TaskSpec::Jsonl(m) => json!({
                "kind": "jsonl",
                "blake3": file_hash(&m.path)?,
                "text": m.text, "choices": m.choices, "gold": m.gold,
            }),
        })
    }

    /// The items (`base` resolves a relative JSONL path; hub tasks come through `hub`, their
    /// few-shot split only `with_fewshot`).
    pub fn load(&self, base: &Path, hub: &super::HubOptions, with_fewshot: bool) -> Result<McTask> {
        match self {
            TaskSpec::Synthetic(_) => Ok(facts_mc()),
            TaskSpec::Jsonl(m) => load_jsonl(m, base),
            TaskSpec::Hub(name) => super::task_hub::load(name, hub, with_fewshot),
        }
    }
}

fn load_jsonl(m: &JsonlMapping, base: &Path) -> Result<McTask> {
    let path = base.join(&m.path);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading task items {}", path.display()))?;
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let doc: Map<String, Json> =
            serde_json::from_str(line).with_context(|| format!("{}: not a JSON object", at()))?;
        let item = item_of(&doc, m).with_context(at)?;
        items.push(item);
    }
    if items.is_empty() {
        bail!("{} holds no items", path.display());
    }
    Ok(McTask::plain(format!("jsonl:{}", m.path.display()), items))
}

fn item_of(doc: &Map<String, Json>, m: &JsonlMapping) -> Result<McItem> {
    let text = fill(&m.text, doc)?;
    let choices: Vec<String> = match doc.get(&m.choices) {
        Some(Json::Array(a)) if a.len() >= 2 => a
            .iter()
            .map(|c| c.as_str().map(str::to_string).with_context(|| format!("choice {c} is not a string")))
            .collect::<Result<_>>()?,
        Some(other) => bail!("field `{}` must be an array of at least two strings, found {other}", m.choices),
        None => bail!("no field `{}` (the choices)", m.choices),
    };
    let gold = match doc.get(&m.gold) {
        Some(Json::Number(n)) => n.as_u64().map(|g| g as usize),
        Some(Json::String(s)) => choices.iter().position(|c| c == s).or_else(|| letter_index(s)),
        _ => None,
    };
    match gold {
        Some(g) if g < choices.len() => Ok(McItem { text, choices, gold: g }),
        _ => bail!(
            "field `{}` must name the gold choice (an index below {}, a choice's text, or a letter), found {}",
            m.gold,
            choices.len(),
            doc.get(&m.gold).map_or("nothing".to_string(), Json::to_string)
        ),
    }
}

/// `A` → 0, `B` → 1, …
fn letter_index(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    (b.len() == 1 && b[0].is_ascii_uppercase()).then(|| (b[0] - b'A') as usize)
}

/// `template` with each `{field}` replaced by the field's value (`{{` and `}}` are braces).
fn fill(template: &str, doc: &Map<String, Json>) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if tail.starts_with('}') {
            bail!("template `{template}` has an unmatched `}}` (write `}}}}` for a brace)");
        }
        let close = tail.find('}').with_context(|| format!("template `{template}` has an unclosed `{{`"))?;
        let name = &tail[1..close];
        match doc.get(name) {
            Some(Json::String(s)) => out.push_str(s),
            Some(v @ (Json::Number(_) | Json::Bool(_))) => out.push_str(&v.to_string()),
            Some(other) => bail!("field `{name}` is not text: {other}"),
            None => bail!("no field `{name}` (named in the template `{template}`)"),
        }
        rest = &tail[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `synthetic:facts-mc`: each fact of the synthetic world as a question whose choices are its
/// completion and three completions of facts of the same group (capitals, planets, people,
/// counts, dates), in an order drawn from a fixed generator.
pub fn facts_mc() -> McTask {
    let world = synthetic::facts();
    // The groups of `synthetic::facts()`, by position: capitals, planets, people, counts, dates.
    let groups = [0..15, 15..22, 22..32, 32..39, 39..45];
    let mut rng = SplitMix64::keyed(0, &[u64::from(synthetic::GENERATOR_VERSION), 0x6d63]);
    let mut items = Vec::new();
    for (i, fact) in world.iter().enumerate() {
        let group = groups.iter().find(|g| g.contains(&i)).cloned().unwrap_or(0..world.len());
        let mut others: Vec<usize> = group.filter(|&j| j != i && world[j].completion != fact.completion).collect();
        rng.shuffle(&mut others);
        let mut choices: Vec<String> = others.iter().take(3).map(|&j| world[j].completion.clone()).collect();
        let gold = rng.index(choices.len() + 1);
        choices.insert(gold, fact.completion.clone());
        items.push(McItem { text: fact.prompt.clone(), choices, gold });
    }
    McTask::plain("synthetic:facts-mc", items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(shots: usize) -> PromptFormat {
        PromptFormat {
            target_delimiter: " ".into(),
            fewshot_delimiter: "\n\n".into(),
            num_fewshot: shots,
            fewshot_seed: 1234,
        }
    }

    #[test]
    fn prompts_are_put_together_as_the_harness_does() {
        let items = vec![
            McItem { text: "Q: one?\nA:".into(), choices: vec!["x".into(), "y".into()], gold: 1 },
            McItem { text: "Q: two?\nA:".into(), choices: vec!["u".into(), "v".into()], gold: 0 },
        ];
        let task = McTask { description: "About things.\n\n".into(), ..McTask::plain("t", items) };
        let r = task.requests(0, &fmt(0)).unwrap();
        assert_eq!(r[1], Request { context: "About things.\n\nQ: one?\nA:".into(), continuation: " y".into() });
        let r = task.requests(0, &fmt(1)).unwrap();
        assert_eq!(r[0].context, "About things.\n\nQ: two?\nA: u\n\nQ: one?\nA:", "the other item, with its gold");
        assert!(task.requests(0, &fmt(2)).is_err(), "an item is never its own example");
        let partial = McTask { scoring: Scoring::Partial, ..task };
        let r = partial.requests(1, &fmt(0)).unwrap();
        assert_eq!(r[0], Request { context: "About things.\n\nu".into(), continuation: " Q: two?\nA:".into() });
    }

    #[test]
    fn jsonl_items_follow_their_mapping() {
        let doc: Map<String, Json> =
            serde_json::from_str(r#"{"q": "Why {not}?", "opts": ["a", "b", "c"], "key": "C", "n": 2}"#).unwrap();
        let m = JsonlMapping {
            path: "x".into(),
            text: "{q} ({n}) {{x}}".into(),
            choices: "opts".into(),
            gold: "key".into(),
        };
        let item = item_of(&doc, &m).unwrap();
        assert_eq!(
            item,
            McItem { text: "Why {not}? (2) {x}".into(), choices: vec!["a".into(), "b".into(), "c".into()], gold: 2 }
        );
        let bad = JsonlMapping { gold: "q".into(), ..m.clone() };
        assert!(item_of(&doc, &bad).unwrap_err().to_string().contains("gold choice"));
        let missing = JsonlMapping { text: "{nope}".into(), ..m };
        assert!(item_of(&doc, &missing).unwrap_err().to_string().contains("no field `nope`"));
    }

    #[test]
    fn the_facts_task_has_one_question_per_fact() {
        let t = facts_mc();
        assert_eq!(t.items.len(), synthetic::facts().len());
        for item in &t.items {
            assert_eq!(item.choices.len(), 4);
            let mut distinct = item.choices.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), 4, "{item:?}");
        }
        assert_eq!(t.items[0].choices[t.items[0].gold], "Paris");
        assert_eq!(facts_mc().items, t.items, "deterministic");
        let golds: std::collections::HashSet<usize> = t.items.iter().map(|i| i.gold).collect();
        assert!(golds.len() > 2, "the gold position varies");
    }
}
