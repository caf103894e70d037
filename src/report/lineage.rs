//! Where a measurement sits in the graph: which model it measured, that model's root `load`, the
//! nearest `prune` and attention swap above it and whether a `finetune` came after that prune.
//! Rows of the tables and "the baseline" are decided from these positions (docs/report.md).

use serde_json::Value as Json;

use super::session::{Instance, Role, Session};

/// The model an instance measured, described by its ancestry (indices into `Session::instances`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Position {
    /// The instance whose model was measured (the target of the `input` slot).
    pub model: Option<usize>,
    /// The `load` at the root of the chain.
    pub load: Option<usize>,
    /// The nearest `prune` above the measured model.
    pub prune: Option<usize>,
    /// The nearest `finetune` between the measured model and that prune (or the load).
    pub tuned: Option<usize>,
    /// The nearest attention swap above the measured model: its attention is no longer the
    /// load's, whatever came after.
    pub swap: Option<usize>,
}

impl Position {
    /// Unmodified: not pruned, fine-tuned or swapped (a baseline candidate).
    pub fn is_base(&self) -> bool {
        self.prune.is_none() && self.tuned.is_none() && self.swap.is_none()
    }
}

/// The slot that carries the model: `input`, else the first slot.
pub fn model_slot(inst: &Instance) -> Option<&str> {
    inst.input("input").or_else(|| inst.inputs.first().map(|(_, n)| n.as_str()))
}

/// The chain of models above instance `i`: the model it reads, that model's input, … up to a
/// stage without inputs.
pub fn ancestry(s: &Session, i: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut cur = model_slot(&s.instances[i]).and_then(|n| s.index_of(n));
    while let Some(j) = cur {
        if out.contains(&j) || out.len() > s.instances.len() {
            break;
        }
        out.push(j);
        cur = model_slot(&s.instances[j]).and_then(|n| s.index_of(n));
    }
    out
}

/// Fine-tunes in the lineage of the model instance `model` (itself included): how a control
/// point is matched to the level that has had as many.
pub fn finetunes_above(s: &Session, model: Option<usize>) -> usize {
    let Some(m) = model else { return 0 };
    std::iter::once(m).chain(ancestry(s, m)).filter(|&j| s.instances[j].has_role(Role::Train)).count()
}

/// The position of the model instance `i` reads.
pub fn position(s: &Session, i: usize) -> Position {
    match model_slot(&s.instances[i]).and_then(|n| s.index_of(n)) {
        Some(m) => position_of_model(s, m),
        None => Position::default(),
    }
}

/// The position of a model instance itself (as if something read it): the one lineage walk.
pub fn position_of_model(s: &Session, m: usize) -> Position {
    let mut p = Position { model: Some(m), ..Position::default() };
    for j in std::iter::once(m).chain(ancestry(s, m)) {
        let inst = &s.instances[j];
        if inst.has_role(Role::Train) && p.prune.is_none() && p.tuned.is_none() {
            p.tuned = Some(j);
        } else if inst.has_role(Role::Prune) && p.prune.is_none() {
            p.prune = Some(j);
        } else if inst.has_role(Role::Swap) && p.swap.is_none() {
            p.swap = Some(j);
        } else if inst.has_role(Role::Source) {
            p.load = Some(j);
        }
    }
    p
}

/// The sparsity a prune instance aimed at (its parameter; the metric or sweep value otherwise).
pub fn target_sparsity(inst: &Instance) -> Option<f64> {
    inst.param_f64("sparsity")
        .or_else(|| inst.metric_f64("target_sparsity"))
        .or_else(|| inst.sweep.as_ref().and_then(|sw| sw.values.get("sparsity")).and_then(Json::as_f64))
}

/// Target sparsity of a position: 0 for an unpruned model.
pub fn sparsity_of(s: &Session, p: &Position) -> Option<f64> {
    match p.prune {
        None => Some(0.0),
        Some(j) => target_sparsity(&s.instances[j]),
    }
}

/// The perplexity protocol of an `eval-ppl` (or an intervention that reports perplexity): the
/// parameters that change the number. Read from the parameters (known before running) with the
/// metrics' `protocol` object as a fallback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protocol {
    pub name: String,
    pub data: String,
    pub seq_len: String,
    pub stride: String,
    pub bos: String,
    pub max_windows: String,
    /// `joined` / `per-row` (and the minimum row length), and the analysis stages' `texts`.
    pub encode: String,
    pub texts: String,
}

fn text(v: Option<&Json>) -> String {
    match v {
        None | Some(Json::Null) => String::new(),
        Some(Json::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

impl Protocol {
    pub fn of(inst: &Instance) -> Option<Protocol> {
        let from_params = ["protocol", "data", "seq_len"].iter().any(|k| inst.params.contains_key(*k));
        let get = |param: &str, metric: &str| -> String {
            if from_params {
                text(inst.params.get(param))
            } else {
                text(inst.metric(&format!("protocol.{metric}")))
            }
        };
        if !from_params && inst.metric("protocol").is_none() {
            return None;
        }
        Some(Protocol {
            name: get("protocol", "name"),
            data: get("data", "data"),
            seq_len: get("seq_len", "seq_len"),
            stride: get("stride", "stride"),
            bos: get("bos", "bos"),
            max_windows: get("max_windows", "max_windows"),
            encode: match get("encode", "encode").as_str() {
                "per-row" => {
                    format!("per-row (rows under {} characters dropped)", get("min_row_chars", "min_row_chars"))
                }
                other => other.to_string(),
            },
            // eval-ppl has no `texts`: its windows are the analysis stages' "windows".
            texts: match get("texts", "texts").as_str() {
                "" => "windows".to_string(),
                t if t.starts_with('{') => "rows".to_string(),
                t => t.to_string(),
            },
        })
    }

    /// `chunks, synthetic:facts:test, seq_len 64, BOS stream-start, first 16 windows`.
    pub fn describe(&self) -> String {
        let mut s = format!("{}, {}, seq_len {}", self.name, self.data, self.seq_len);
        if !self.stride.is_empty() {
            s.push_str(&format!(", stride {}", self.stride));
        }
        if self.texts == "rows" {
            s = format!("one text per long row, {}, at most {} tokens", self.data, self.seq_len);
        } else if self.name == "texts" {
            s.push_str(", each text its own window (BOS as the tokenizer adds it)");
        }
        if !self.encode.is_empty() && self.encode != "joined" && self.texts != "rows" {
            s.push_str(&format!(", rows tokenised {}", self.encode));
        }
        if !self.bos.is_empty() && self.texts != "rows" && self.name != "texts" {
            s.push_str(&format!(", BOS {}", self.bos));
        }
        if !self.max_windows.is_empty() {
            s.push_str(&format!(", first {} windows", self.max_windows));
        }
        s
    }
}

/// The baseline of a perplexity measured at `pos` under `proto`: the first `eval-ppl` with the
/// same protocol whose model is the same `load` with no prune, fine-tune or swap in between.
pub fn baseline(s: &Session, pos: &Position, proto: &Protocol) -> Option<usize> {
    s.of_role(Role::Perplexity).map(|(i, _)| i).find(|&i| {
        let p = position(s, i);
        p.is_base() && p.load == pos.load && Protocol::of(&s.instances[i]).as_ref() == Some(proto)
    })
}

/// The first instance in `role` that measured exactly the model `model` (e.g. the generation
/// beside a perplexity).
pub fn sibling(s: &Session, role: Role, model: Option<usize>) -> Option<usize> {
    let model = model?;
    s.of_role(role).map(|(i, _)| i).find(|&i| model_slot(&s.instances[i]).and_then(|n| s.index_of(n)) == Some(model))
}
