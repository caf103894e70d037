//! The tables of one session, chosen from the stage kinds present (docs/report.md).

use serde_json::Value as Json;

use super::lineage::{
    baseline, finetunes_above, model_slot, position, position_of_model, sibling, sparsity_of, Position, Protocol,
};
use super::session::{Instance, Role, Session};
use super::table::{cell, pct, pct_num, ppl, sig, signed, Table};

/// One group of perplexities: same root model, same protocol.
pub struct PplGroup {
    pub load: Option<usize>,
    pub protocol: Protocol,
    pub evals: Vec<usize>,
}

pub fn ppl_groups(s: &Session) -> Vec<PplGroup> {
    let mut groups: Vec<PplGroup> = Vec::new();
    for (i, inst) in s.of_role(Role::Perplexity) {
        let Some(proto) = Protocol::of(inst) else { continue };
        let load = position(s, i).load;
        match groups.iter_mut().find(|g| g.load == load && g.protocol == proto) {
            Some(g) => g.evals.push(i),
            None => groups.push(PplGroup { load, protocol: proto, evals: vec![i] }),
        }
    }
    groups
}

/// How a group is shown: attention swaps, a pruning sweep, a progressive (prune → fine-tune)
/// table, or a list.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Shape {
    Attention,
    Sweep,
    Progressive,
    List,
}

pub fn shape_of(s: &Session, g: &PplGroup) -> Shape {
    let pos: Vec<Position> = g.evals.iter().map(|&i| position(s, i)).collect();
    // A swapped model's fine-tune is an adaptation, not a 0% control; with prunes in the group
    // the pruning shapes win (their tables name each model's attention).
    let pruned = pos.iter().any(|p| p.prune.is_some());
    if pos.iter().any(|p| p.swap.is_some()) && !pruned {
        Shape::Attention
    } else if pos.iter().any(|p| p.tuned.is_some()) && pos.iter().any(|p| p.prune.is_some()) {
        Shape::Progressive
    } else if pos.iter().any(|p| p.prune.is_some()) {
        Shape::Sweep
    } else {
        Shape::List
    }
}

fn ppl_of(inst: &Instance) -> Option<f64> {
    inst.metric_f64("ppl")
}

fn ppl_cell(inst: &Instance) -> String {
    ppl_of(inst).map(ppl).unwrap_or_else(|| inst.absent())
}

fn vs(value: Option<f64>, base: Option<f64>) -> String {
    match (value, base) {
        (Some(v), Some(b)) if b > 0.0 => signed((v / b - 1.0) * 100.0),
        _ => "—".into(),
    }
}

/// `repetitive (1/5)`: the majority label of the `generate` on the same model, with the number
/// of correct answers out of the prompts.
fn text_label(s: &Session, model: Option<usize>) -> String {
    let Some(g) = sibling(s, Role::Generation, model) else { return "—".into() };
    let inst = &s.instances[g];
    match inst.metric_str("label") {
        Some(label) => {
            let n = inst.metric("outputs").and_then(Json::as_array).map(|a| a.len());
            let c = inst.metric("counts.correct").and_then(Json::as_u64);
            match (c, n) {
                (Some(c), Some(n)) => format!("{label} ({c}/{n})"),
                _ => label.to_string(),
            }
        }
        None => inst.absent(),
    }
}

/// `model `base` (key 1a2b3c4d5e6f, bitnet, f32, absmean) · device cpu`.
pub fn model_note(s: &Session, load: Option<usize>) -> String {
    let device = if s.device.is_empty() { "?" } else { &s.device };
    let Some(l) = load else { return format!("model: (no load stage found) · device {device}") };
    let inst = &s.instances[l];
    let dtype = inst
        .metric_str("dtype")
        .map(str::to_string)
        .or_else(|| inst.params.get("dtype").and_then(Json::as_str).map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let mut what = vec![format!("key {}", short(&inst.key))];
    if let Some(a) = inst.metric_str("arch") {
        what.push(a.to_string());
    }
    what.push(format!("dtype {dtype}"));
    if let Some(q) = inst.metric_str("quantization") {
        what.push(format!("quantization {q}"));
    }
    format!("model: `{}` ({}) · device {device}", inst.name, what.join(", "))
}

pub fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

fn sparsity_label(s: &Session, p: &Position) -> String {
    sparsity_of(s, p).map(pct).unwrap_or_else(|| p.prune.map(|j| s.instances[j].name.clone()).unwrap_or_default())
}

/// Labels that stay unique: a repeated sparsity gets its prune instance's name.
fn unique_labels(s: &Session, rows: &[Position]) -> Vec<String> {
    let labels: Vec<String> = rows.iter().map(|p| sparsity_label(s, p)).collect();
    labels
        .iter()
        .zip(rows)
        .map(|(l, p)| {
            if labels.iter().filter(|x| *x == l).count() > 1 {
                format!("{l} (`{}`)", p.prune.map(|j| s.instances[j].name.as_str()).unwrap_or(""))
            } else {
                l.clone()
            }
        })
        .collect()
}

fn sort_by_sparsity(s: &Session, v: &mut [Position]) {
    v.sort_by(|a, b| {
        let (x, y) = (sparsity_of(s, a).unwrap_or(f64::MAX), sparsity_of(s, b).unwrap_or(f64::MAX));
        x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal)
    });
}

fn ppl_notes(s: &Session, g: &PplGroup) -> Vec<String> {
    vec![model_note(s, g.load), format!("perplexity: {}", g.protocol.describe())]
}

fn baseline_footnote(s: &Session, g: &PplGroup, base: Option<usize>) -> String {
    let load = g.load.map(|l| s.instances[l].name.as_str()).unwrap_or("?");
    match base {
        Some(b) => format!(
            "baseline: `{}`, the eval-ppl with this protocol on `{load}` with no prune or fine-tune in between; vs baseline = (ppl / baseline − 1) × 100.",
            s.instances[b].name
        ),
        None => format!("no baseline: no eval-ppl with this protocol reads `{load}` unpruned and untuned."),
    }
}

const TEXT_NOTE: &str = "text label: majority outcome of the `generate` on the same model (correct answers / prompts).";

pub fn sweep_table(s: &Session, g: &PplGroup, n: usize) -> Table {
    let mut t = Table::new(
        format!("pruning-sweep#{n}"),
        "Pruning sweep",
        &[
            ("sparsity", true),
            ("achieved (%)", true),
            ("ppl", true),
            ("vs baseline (%)", true),
            ("ternary 0 before → after prune (%)", true),
            ("text label", false),
        ],
    );
    t.notes = ppl_notes(s, g);
    let base = baseline(s, &position(s, g.evals[0]), &g.protocol).filter(|b| g.evals.contains(b));
    let base_ppl = base.and_then(|b| ppl_of(&s.instances[b]));
    if let Some(b) = base {
        let inst = &s.instances[b];
        t.push(vec![
            "0% (baseline)".into(),
            "0".into(),
            ppl_cell(inst),
            "—".into(),
            "—".into(),
            text_label(s, position(s, b).model),
        ]);
    }
    let mut rows: Vec<(Position, usize)> =
        g.evals.iter().map(|&i| (position(s, i), i)).filter(|(p, _)| p.prune.is_some()).collect();
    rows.sort_by(|a, b| {
        let (x, y) = (sparsity_of(s, &a.0).unwrap_or(f64::MAX), sparsity_of(s, &b.0).unwrap_or(f64::MAX));
        x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal)
    });
    let labels = unique_labels(s, &rows.iter().map(|r| r.0).collect::<Vec<_>>());
    for ((p, i), label) in rows.iter().zip(labels) {
        let inst = &s.instances[*i];
        let prune = p.prune.map(|j| &s.instances[j]);
        t.push(vec![
            label,
            metric_pct(prune, "sparsity"),
            ppl_cell(inst),
            vs(ppl_of(inst), base_ppl),
            ternary_cell(prune),
            text_label(s, p.model),
        ]);
    }
    t.footnotes = vec![ACHIEVED_NOTE.into(), TERNARY_NOTE.into(), baseline_footnote(s, g, base), TEXT_NOTE.into()];
    t
}

const ACHIEVED_NOTE: &str = "achieved: the pruned model's share of zero projection weights (the notebook rule prunes a percentile of the remaining nonzeros, so it differs from the level's name).";
const TERNARY_NOTE: &str = "ternary 0: share of projection weights that quantise to 0 before and after the prune (pruning small latent weights mostly removes weights that already round to 0, and lowers the absmean scale).";

fn ternary_cell(prune: Option<&Instance>) -> String {
    match (
        prune.and_then(|i| i.metric_f64("ternary_zero_before")),
        prune.and_then(|i| i.metric_f64("ternary_zero_after")),
    ) {
        (Some(x), Some(y)) => format!("{} → {}", pct_num(x), pct_num(y)),
        _ => "—".into(),
    }
}

fn metric_pct(inst: Option<&Instance>, path: &str) -> String {
    inst.and_then(|i| i.metric_f64(path)).map(pct_num).unwrap_or_else(|| "—".into())
}

pub fn progressive_table(s: &Session, g: &PplGroup, n: usize) -> Table {
    let (mut t, models) = progressive_table_without_tasks(s, g, n);
    // When tasks were scored on the models of the table, their acc joins each row.
    let tasks = task_names(s);
    if tasks.is_empty() || models.iter().all(Option::is_none) {
        return t;
    }
    for task in &tasks {
        t.columns.push(format!("{task} acc (%)"));
        t.numeric.push(true);
    }
    for (row, m) in t.rows.iter_mut().zip(&models) {
        row.extend(tasks.iter().map(|task| acc_cell(task_result(s, *m, task), "acc")));
    }
    t.footnotes.push("task acc: of the fine-tuned model of the row (the base for the baseline), ± one standard error; the tasks table has acc_norm.".into());
    t
}

/// The table, and the model each row stands for (the one its `ppl after` measured; none for a
/// control row of its own).
fn progressive_table_without_tasks(s: &Session, g: &PplGroup, n: usize) -> (Table, Vec<Option<usize>>) {
    let mut t = Table::new(
        format!("progressive#{n}"),
        "Progressive pruning with fine-tuning",
        &[
            ("sparsity", true),
            ("achieved (%)", true),
            ("ppl before", true),
            ("ppl after", true),
            ("vs baseline (%)", true),
            ("recovery", true),
            ("before/after", true),
            ("0% control", true),
            ("after ft: zeros / ternary 0 (%)", true),
            ("ternary 0 before → after prune (%)", true),
            ("text label", false),
        ],
    );
    t.notes = ppl_notes(s, g);
    let base = baseline(s, &position(s, g.evals[0]), &g.protocol).filter(|b| g.evals.contains(b));
    let base_inst = base.map(|b| &s.instances[b]);
    let base_ppl = base_inst.and_then(ppl_of);
    let base_cell = base_inst.map(ppl_cell).unwrap_or_else(|| "—".into());
    let dash = || "—".to_string();
    let mut models = Vec::new();
    if let Some(b) = base {
        models.push(position(s, b).model);
        let mut row = vec!["0% (baseline)".into(), "0".into(), base_cell.clone()];
        row.extend(std::iter::repeat_n(dash(), 7));
        row.push(text_label(s, position(s, b).model));
        t.push(row);
    }
    let pos: Vec<(Position, usize)> = g.evals.iter().map(|&i| (position(s, i), i)).collect();
    // The 0% control: fine-tunes of the unpruned model, by how many fine-tunes they have had.
    let controls: Vec<(usize, usize)> = pos
        .iter()
        .filter(|(p, _)| p.prune.is_none() && p.tuned.is_some())
        .map(|(p, i)| (finetunes_above(s, p.model), *i))
        .collect();
    let mut matched = Vec::new();
    let mut prunes: Vec<Position> = Vec::new();
    for (p, _) in &pos {
        if p.prune.is_some() && !prunes.iter().any(|q| q.prune == p.prune) {
            prunes.push(Position { tuned: None, model: p.prune, ..*p });
        }
    }
    sort_by_sparsity(s, &mut prunes);
    let labels = unique_labels(s, &prunes);
    for (pr, label) in prunes.iter().zip(labels) {
        let before = pos.iter().find(|(p, _)| p.prune == pr.prune && p.tuned.is_none());
        let after = pos.iter().find(|(p, _)| p.prune == pr.prune && p.tuned.is_some());
        let b = before.map(|(_, i)| &s.instances[*i]);
        let a = after.map(|(_, i)| &s.instances[*i]);
        let (bp, ap) = (b.and_then(ppl_of), a.and_then(ppl_of));
        let (recovery, ratio) = match (bp, ap) {
            (Some(bp), Some(ap)) if ap > 0.0 => (format!("{:.2}", bp - ap), format!("{:.3}×", bp / ap)),
            _ => (dash(), dash()),
        };
        let control = after.and_then(|(p, _)| {
            let k = finetunes_above(s, p.model);
            controls.iter().find(|(c, _)| *c == k).map(|&(_, i)| {
                matched.push(i);
                ppl_cell(&s.instances[i])
            })
        });
        let prune = pr.prune.map(|j| &s.instances[j]);
        let tuned = after.and_then(|(p, _)| p.tuned).map(|j| &s.instances[j]);
        let ternary = ternary_cell(prune);
        let label_model = after.map(|(p, _)| p.model).or(before.map(|(p, _)| p.model)).flatten();
        models.push(label_model);
        t.push(vec![
            label,
            metric_pct(prune, "sparsity"),
            b.map(ppl_cell).unwrap_or_else(dash),
            a.map(ppl_cell).unwrap_or_else(dash),
            vs(ap.or(if a.is_none() { bp } else { None }), base_ppl),
            recovery,
            ratio,
            control.unwrap_or_else(dash),
            match (
                tuned.and_then(|i| i.metric_f64("sparsity_after")),
                tuned.and_then(|i| i.metric_f64("ternary_zero_after")),
            ) {
                (Some(z), Some(t)) => format!("{} / {}", pct_num(z), pct_num(t)),
                (Some(z), None) => pct_num(z),
                _ => dash(),
            },
            ternary,
            text_label(s, label_model),
        ]);
    }
    // Control points that match no level get rows of their own.
    for (k, i) in controls.iter().filter(|(_, i)| !matched.contains(i)) {
        let inst = &s.instances[*i];
        let mut row = vec![format!("0% control, {k} fine-tune(s)"), "0".into(), base_cell.clone(), ppl_cell(inst)];
        row.push(vs(ppl_of(inst), base_ppl));
        row.extend(std::iter::repeat_n(dash(), 5));
        row.push(text_label(s, position(s, *i).model));
        t.push(row);
        models.push(None);
    }
    t.footnotes = vec![
        "ppl before: the pruned model; ppl after: the same model after its fine-tune; vs baseline uses ppl after."
            .into(),
        "recovery = ppl before − ppl after (the report's column); before/after = their ratio.".into(),
        ACHIEVED_NOTE.into(),
        "after ft: the share of projection weights that are exactly 0 after the fine-tune (below achieved when pruned weights grew back, as they do when the masks are not re-applied), and the share that quantises to 0.".into(),
        "0% control: the unpruned model after as many fine-tunes as the level has had (same steps, same batches).".into(),
        TERNARY_NOTE.into(),
        baseline_footnote(s, g, base),
        TEXT_NOTE.into(),
    ];
    (t, models)
}

pub fn list_table(s: &Session, groups: &[&PplGroup]) -> Table {
    let mut t = Table::new(
        "perplexity",
        "Perplexity",
        &[
            ("instance", false),
            ("model", false),
            ("protocol", false),
            ("data", false),
            ("seq_len", true),
            ("BOS", false),
            ("ppl", true),
            ("bits/byte", true),
            ("tokens", true),
        ],
    );
    let mut loads: Vec<Option<usize>> = Vec::new();
    for g in groups {
        if !loads.contains(&g.load) {
            loads.push(g.load);
        }
        for &i in &g.evals {
            let inst = &s.instances[i];
            let model = position(s, i).model.map(|m| describe_model(s, m)).unwrap_or_default();
            t.push(vec![
                inst.name.clone(),
                model,
                g.protocol.name.clone(),
                g.protocol.data.clone(),
                g.protocol.seq_len.clone(),
                g.protocol.bos.clone(),
                ppl_cell(inst),
                inst.metric_f64("bits_per_byte").map(sig).unwrap_or_else(|| "—".into()),
                cell(inst.metric("tokens")),
            ]);
        }
    }
    t.notes = loads.iter().map(|&l| model_note(s, l)).collect();
    t.footnotes = vec![
        "protocols: chunks = Wanda/SparseGPT windows, llama-cpp = second half of each chunk scored, rolling = strided, rpt-notebook = the RPT notebooks' range(0, n−L, L) windows, texts = each text its own window, token-weighted (docs/data.md, docs/seed-protocols.md); bits/byte does not depend on the tokenizer."
            .into(),
    ];
    t
}

fn is_intervention(inst: &Instance) -> bool {
    inst.metrics.contains_key("intervention") || (!inst.has_metrics() && inst.params.contains_key("intervention"))
}

pub fn residual_table(s: &Session, i: usize) -> Table {
    let inst = &s.instances[i];
    let mut t = Table::new(
        format!("residuals:{}", inst.name),
        format!("Residual statistics — `{}`", inst.name),
        &[
            ("layer", true),
            ("mean \\|c\\|", true),
            ("% zeros", true),
            ("max \\|c\\|", true),
            ("correction ratio", true),
            ("branching ratio", true),
        ],
    );
    let p = position(s, i);
    t.notes.push(model_note(s, p.load));
    let what = p.model.map(|m| describe_model(s, m)).unwrap_or_default();
    t.notes.push(format!(
        "measured on {what}: {} texts (windows), {} tokens",
        cell(inst.metric("windows")),
        cell(inst.metric("tokens"))
    ));
    let layers = inst.metric("layers").and_then(Json::as_array).cloned().unwrap_or_default();
    if layers.is_empty() {
        t.push(vec![inst.absent(), "—".into(), "—".into(), "—".into(), "—".into(), "—".into()]);
    }
    let f = |l: &Json, k: &str| l.get(k).and_then(Json::as_f64);
    for (n, l) in layers.iter().enumerate() {
        t.push(vec![
            l.get("layer").and_then(Json::as_u64).unwrap_or(n as u64).to_string(),
            f(l, "mean_abs_c").map(sig).unwrap_or_else(|| "—".into()),
            f(l, "zero_fraction").map(pct_num).unwrap_or_else(|| "—".into()),
            f(l, "max_abs_c").map(sig).unwrap_or_else(|| "—".into()),
            f(l, "correction_ratio").map(sig).unwrap_or_else(|| "—".into()),
            f(l, "branching_ratio").map(sig).unwrap_or_else(|| "—".into()),
        ]);
    }
    t.footnotes = vec![
        "c = h_out − h_in, the layer's correction to the residual stream; per text, branching ratio = mean‖h_out‖ / mean‖h_in‖ over its tokens and correction ratio = mean‖c‖ / mean‖h_in‖ (ratios of means, as the criticality notebook), averaged over texts (1 = critical); % zeros: entries of c exactly 0 (in bf16 mostly rounding: a small correction vanishes against a large stream).".into(),
    ];
    t
}

/// `base`, or `level[sparsity=0.1].tuned (10% sparsity, fine-tuned)`.
pub fn describe_model(s: &Session, m: usize) -> String {
    let p = Position { model: Some(m), ..position_of_model(s, m) };
    let mut what = Vec::new();
    if p.prune.is_some() {
        what.push(format!("{} sparsity", sparsity_label(s, &p)));
    }
    if let Some(w) = p.swap {
        what.push(attention_label(s, w));
    }
    if p.tuned.is_some() {
        what.push("fine-tuned".to_string());
    }
    if what.is_empty() {
        format!("`{}`", s.instances[m].name)
    } else {
        format!("`{}` ({})", s.instances[m].name, what.join(", "))
    }
}

pub fn intervention_tables(s: &Session, n0: usize) -> Vec<Table> {
    // Group by (measured model, mode).
    let mut groups: Vec<(Option<usize>, String, Vec<usize>)> = Vec::new();
    for (i, inst) in s.of_role(Role::Residuals) {
        if !is_intervention(inst) {
            continue;
        }
        let model = position(s, i).model;
        let mode = inst
            .metric_str("intervention.mode")
            .or_else(|| inst.params.get("intervention").and_then(|v| v.get("mode")).and_then(Json::as_str))
            .unwrap_or("intervention")
            .to_string();
        match groups.iter_mut().find(|g| g.0 == model && g.1 == mode) {
            Some(g) => g.2.push(i),
            None => groups.push((model, mode, vec![i])),
        }
    }
    let mut out = Vec::new();
    for (k, (model, mode, mut members)) in groups.into_iter().enumerate() {
        let value = |i: &usize| s.instances[*i].metric_f64("intervention.value").unwrap_or(f64::MAX);
        members.sort_by(|a, b| value(a).partial_cmp(&value(b)).unwrap_or(std::cmp::Ordering::Equal));
        let mut t = Table::new(
            format!("interventions#{}", n0 + k),
            format!("Interventions — {mode} on {}", model.map(|m| describe_model(s, m)).unwrap_or_default()),
            &[
                (mode.as_str(), true),
                ("% zeroed (notebook)", true),
                ("% newly zeroed", true),
                ("ppl", true),
                ("vs baseline (%)", true),
                ("text label", false),
            ],
        );
        let first = &s.instances[members[0]];
        let pos = position(s, members[0]);
        let proto = Protocol::of(first);
        t.notes.push(model_note(s, pos.load));
        if let Some(p) = &proto {
            t.notes.push(format!("perplexity: {}", p.describe()));
        }
        // The baseline: the same model, same protocol, no intervention; else the unmodified load.
        let same_model = proto.as_ref().and_then(|p| {
            let clean_hook =
                |i: &usize| s.instances[*i].has_role(Role::Residuals) && !is_intervention(&s.instances[*i]);
            s.of_role(Role::Perplexity)
                .chain(s.of_role(Role::Residuals))
                .map(|(i, _)| i)
                .filter(|i| s.instances[*i].has_role(Role::Perplexity) || clean_hook(i))
                .find(|&i| position(s, i).model == model && Protocol::of(&s.instances[i]).as_ref() == Some(p))
        });
        let base = same_model.or_else(|| proto.as_ref().and_then(|p| baseline(s, &pos, p)));
        let base_ppl = base.and_then(|b| ppl_of(&s.instances[b]));
        if let Some(b) = base {
            t.push(vec![
                "none (baseline)".into(),
                "0.00".into(),
                "0.00".into(),
                ppl_cell(&s.instances[b]),
                "—".into(),
                text_label(s, position(s, b).model),
            ]);
        }
        for i in &members {
            let inst = &s.instances[*i];
            let label = match inst.metric_str("label") {
                Some(l) => {
                    let c = inst.metric("counts.correct").and_then(Json::as_u64);
                    let n = inst.metric("outputs").and_then(Json::as_array).map(|a| a.len());
                    match (c, n) {
                        (Some(c), Some(n)) => format!("{l} ({c}/{n})"),
                        _ => l.to_string(),
                    }
                }
                None => "—".into(),
            };
            t.push(vec![
                inst.metric_f64("intervention.value").map(|v| v.to_string()).unwrap_or_else(|| inst.name.clone()),
                inst.metric_f64("intervention.masked_fraction").map(pct_num).unwrap_or_else(|| "—".into()),
                inst.metric_f64("intervention.zeroed_fraction").map(pct_num).unwrap_or_else(|| inst.absent()),
                ppl_cell(inst),
                vs(ppl_of(inst), base_ppl),
                label,
            ]);
        }
        t.footnotes = vec![
            match base {
                Some(b) => format!(
                    "baseline: `{}` (same model and protocol, no intervention); vs baseline = (ppl / baseline − 1) × 100.",
                    s.instances[b].name
                ),
                None => "no baseline: no eval-ppl (or hook-residuals without intervention) with this protocol on this model.".into(),
            },
            "% zeroed (notebook): share of entries of c below the cut, exact zeros included (the predictive-coding notebook's measure); % newly zeroed: nonzero entries the intervention set to zero; text label: the intervention's own generations.".into(),
        ];
        out.push(t);
    }
    out
}

/// One row per perturbed model when there are several: its perplexity, Lyapunov exponent,
/// amplification and branching ratios, with the criticality regulariser its last fine-tune ran
/// under (λ and the mean ratio the fine-tune ended on) — how the regularised chains compare.
pub fn criticality_table(s: &Session) -> Option<Table> {
    let perturbs: Vec<usize> = s.of_role(Role::Perturbation).map(|(i, _)| i).collect();
    if perturbs.len() < 2 {
        return None;
    }
    let mut t = Table::new(
        "criticality",
        "Criticality by model",
        &[
            ("model", false),
            ("regulariser λ", true),
            ("ppl", true),
            ("Lyapunov", true),
            ("amplification", true),
            ("mean BR (layers 1…)", true),
            ("BR per layer", false),
            ("BR at end of fine-tune", true),
        ],
    );
    let mut loads = Vec::new();
    for i in perturbs {
        let inst = &s.instances[i];
        let p = position(s, i);
        if !loads.contains(&p.load) {
            loads.push(p.load);
        }
        let tuned = p.tuned.map(|j| &s.instances[j]);
        let lambda = tuned.and_then(|f| f.params.get("criticality_lambda")).map(|v| cell(Some(v)));
        let trained = tuned.and_then(|f| f.metric_f64("criticality.final_mean_branching"));
        let ppl = sibling(s, Role::Perplexity, p.model).and_then(|e| ppl_of(&s.instances[e]));
        let per_layer = inst
            .metric("branching.per_layer")
            .and_then(Json::as_array)
            .map(|a| a.iter().filter_map(Json::as_f64).map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| inst.absent());
        let g = |k: &str| inst.metric_f64(k).map(sig).unwrap_or_else(|| "—".into());
        t.push(vec![
            p.model.map(|m| describe_model(s, m)).unwrap_or_else(|| "—".into()),
            lambda.unwrap_or_else(|| if tuned.is_some() { "off".into() } else { "—".into() }),
            ppl.map(super::table::ppl).unwrap_or_else(|| "—".into()),
            g("lyapunov"),
            g("amplification"),
            g("branching.mean_without_first"),
            per_layer,
            trained.map(sig).unwrap_or_else(|| "—".into()),
        ]);
    }
    t.notes = loads.iter().map(|&l| model_note(s, l)).collect();
    t.footnotes = vec![
        "Lyapunov, amplification and BR as in the perturbation tables (the notebook's conventions: from layer 0's output; BR = mean token norm out / in per layer, averaged over texts).".into(),
        "regulariser λ: the criticality_lambda of the model's last fine-tune (off: fine-tuned without it); BR at end of fine-tune: the mean branching ratio over the regulariser's layers on the fine-tune's last batch.".into(),
        "ppl: the eval-ppl on the same model, if any.".into(),
    ];
    Some(t)
}

pub fn perturbation_table(s: &Session, i: usize) -> Table {
    let inst = &s.instances[i];
    let mut t = Table::new(
        format!("perturbation:{}", inst.name),
        format!("Perturbation growth — `{}`", inst.name),
        &[("layer", true), ("δ", true), ("ln(δ_l / δ_l−1)", true)],
    );
    let p = position(s, i);
    t.notes.push(model_note(s, p.load));
    let g = |k: &str| inst.metric_f64(k).map(sig).unwrap_or_else(|| "—".into());
    t.notes.push(format!(
        "measured on {}: λ = {} per layer and amplification {} from layer 0's output to the last layer's (the notebook's convention); from the embedding: λ = {}, amplification {}; peak at boundary {}; mean branching ratio {} ({} without layer 0); noise {} eps {}",
        p.model.map(|m| describe_model(s, m)).unwrap_or_default(),
        g("lyapunov"),
        g("amplification"),
        g("lyapunov_from_embedding"),
        g("amplification_from_embedding"),
        cell(inst.metric("peak_layer")),
        g("branching.mean"),
        g("branching.mean_without_first"),
        inst.metric_str("scale").unwrap_or("?"),
        inst.metric_f64("eps").map(|v| v.to_string()).unwrap_or_else(|| "—".into()),
    ));
    let delta: Vec<f64> = inst
        .metric("delta")
        .and_then(Json::as_array)
        .map(|a| a.iter().filter_map(Json::as_f64).collect())
        .unwrap_or_default();
    let local: Vec<f64> = inst
        .metric("local_exponents")
        .and_then(Json::as_array)
        .map(|a| a.iter().filter_map(Json::as_f64).collect())
        .unwrap_or_default();
    if delta.is_empty() {
        t.push(vec![inst.absent(), "—".into(), "—".into()]);
    }
    for (l, d) in delta.iter().enumerate() {
        t.push(vec![
            if l == 0 { "embedding".into() } else { (l - 1).to_string() },
            sig(*d),
            if l == 0 { "—".into() } else { local.get(l - 1).copied().map(sig).unwrap_or_else(|| "—".into()) },
        ]);
    }
    t.footnotes = vec!["δ: per text ‖h̃ − h‖_F / ‖h‖_F over the whole output of the embedding or of decoder layer l, after Gaussian noise of size eps at the embedding, averaged over texts; λ = (ln δ_last − ln δ_layer 0)/(L − 1), amplification = δ_last/δ_layer 0 (the notebook's convention; the embedding-based figures are given beside it).".into()];
    t
}

pub fn finetune_table(s: &Session) -> Option<Table> {
    let mut t = Table::new(
        "finetune",
        "Fine-tuning",
        &[
            ("instance", false),
            ("model", false),
            ("steps", true),
            ("final loss", true),
            ("tokens/s", true),
            ("seconds", true),
        ],
    );
    let mut loads = Vec::new();
    for (i, inst) in s.of_role(Role::Train) {
        let p = position(s, i);
        if !loads.contains(&p.load) {
            loads.push(p.load);
        }
        t.push(vec![
            inst.name.clone(),
            p.model.map(|m| describe_model(s, m)).unwrap_or_default(),
            cell(inst.metric("steps")),
            inst.metric_f64("final_loss").map(sig).unwrap_or_else(|| inst.absent()),
            inst.metric_f64("tokens_per_second").map(|x| format!("{x:.0}")).unwrap_or_else(|| "—".into()),
            inst.metric_f64("seconds").map(|x| format!("{x:.1}")).unwrap_or_else(|| "—".into()),
        ]);
    }
    t.notes = loads.iter().map(|&l| model_note(s, l)).collect();
    (!t.rows.is_empty()).then_some(t)
}

pub fn text_table(s: &Session) -> Option<Table> {
    let mut t = Table::new(
        "text",
        "Fact prompts",
        &[
            ("instance", false),
            ("model", false),
            ("correct", true),
            ("wrong", true),
            ("repetitive", true),
            ("unscored", true),
            ("accuracy", true),
            ("label", false),
        ],
    );
    let mut loads = Vec::new();
    for (i, inst) in s.of_role(Role::Generation) {
        let p = position(s, i);
        if !loads.contains(&p.load) {
            loads.push(p.load);
        }
        let c = |k: &str| cell(inst.metric(&format!("counts.{k}")));
        t.push(vec![
            inst.name.clone(),
            p.model.map(|m| describe_model(s, m)).unwrap_or_default(),
            c("correct"),
            c("wrong"),
            c("repetitive"),
            c("unscored"),
            inst.metric_f64("accuracy").map(pct).unwrap_or_else(|| "—".into()),
            inst.metric_str("label").map(str::to_string).unwrap_or_else(|| inst.absent()),
        ]);
    }
    t.notes = loads.iter().map(|&l| model_note(s, l)).collect();
    t.footnotes = vec!["label: majority outcome (correct if at least half the scored answers are; repetitive if at least half the outputs loop).".into()];
    (!t.rows.is_empty()).then_some(t)
}

pub fn models_table(s: &Session) -> Option<Table> {
    let mut t = Table::new(
        "models",
        "Models",
        &[
            ("instance", false),
            ("key", false),
            ("model", false),
            ("arch", false),
            ("parameters", true),
            ("layers", true),
            ("hidden", true),
            ("dtype", false),
            ("quantization", false),
            ("ternary zeros", true),
        ],
    );
    for (_, inst) in s.of_role(Role::Source) {
        let model = match inst.params.get("model") {
            Some(Json::String(m)) => m.clone(),
            Some(Json::Object(o)) if o.contains_key("random") => "random init".into(),
            Some(other) => other.to_string(),
            None => "—".into(),
        };
        t.push(vec![
            inst.name.clone(),
            short(&inst.key).to_string(),
            model,
            cell(inst.metric("arch")),
            cell(inst.metric("parameters")),
            cell(inst.metric("layers")),
            cell(inst.metric("hidden_size")),
            inst.metric_str("dtype").map(str::to_string).unwrap_or_else(|| cell(inst.params.get("dtype"))),
            inst.metric_str("quantization").map(str::to_string).unwrap_or_else(|| inst.absent()),
            inst.metric_f64("ternary_zero_fraction").map(pct_num).unwrap_or_else(|| "—".into()),
        ]);
    }
    t.notes = vec![format!("device {}", if s.device.is_empty() { "?" } else { &s.device })];
    t.footnotes = vec!["ternary zeros: % of the quantised weights that are 0 before any pruning.".into()];
    (!t.rows.is_empty()).then_some(t)
}

/// The tasks the session scored, in order of first appearance.
fn task_names(s: &Session) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (_, inst) in s.of_role(Role::Tasks) {
        if let Some(t) = inst.metric_str("task") {
            if !names.iter().any(|n| n == t) {
                names.push(t.to_string());
            }
        }
    }
    names
}

/// The instance that scored `task` on exactly the model `model`.
fn task_result<'a>(s: &'a Session, model: Option<usize>, task: &str) -> Option<&'a Instance> {
    let model = model?;
    s.of_role(Role::Tasks).map(|(_, inst)| inst).find(|inst| {
        inst.metric_str("task") == Some(task) && model_slot(inst).and_then(|n| s.index_of(n)) == Some(model)
    })
}

/// `43.75 ± 1.20`: acc in percent with its standard error.
fn acc_cell(inst: Option<&Instance>, metric: &str) -> String {
    let Some(inst) = inst else { return "—".into() };
    match (inst.metric_f64(metric), inst.metric_f64(&format!("{metric}_stderr"))) {
        (Some(a), Some(e)) => format!("{} ± {}", pct_num(a), pct_num(e)),
        (Some(a), None) => pct_num(a),
        _ => "—".into(),
    }
}

/// Multiple-choice accuracy of every model the session scored, one column pair per task.
pub fn tasks_table(s: &Session) -> Option<Table> {
    let tasks = task_names(s);
    if tasks.is_empty() {
        return None;
    }
    let mut models: Vec<usize> = Vec::new();
    for (_, inst) in s.of_role(Role::Tasks) {
        if let Some(m) = model_slot(inst).and_then(|n| s.index_of(n)) {
            if !models.contains(&m) {
                models.push(m);
            }
        }
    }
    let headers: Vec<String> =
        tasks.iter().flat_map(|t| [format!("{t} acc (%)"), format!("{t} acc_norm (%)")]).collect();
    let mut columns: Vec<(&str, bool)> = vec![("model", false)];
    columns.extend(headers.iter().map(|h| (h.as_str(), true)));
    let mut t = Table::new("tasks", "Multiple-choice tasks (lm-evaluation-harness scoring)", &columns);
    for m in models {
        let mut row = vec![describe_model(s, m)];
        for task in &tasks {
            let r = task_result(s, Some(m), task);
            row.push(acc_cell(r, "acc"));
            row.push(acc_cell(r, "acc_norm"));
        }
        t.push(row);
    }
    let shots: Vec<String> = s
        .of_role(Role::Tasks)
        .filter_map(|(_, i)| i.metric_f64("num_fewshot"))
        .map(|n| format!("{n}"))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    t.notes = vec![format!("few-shot examples: {}", shots.join(", "))];
    t.footnotes = vec![
        "acc: the gold choice has the highest summed log-likelihood; acc_norm: per character of the choice; ± one standard error (sample sd / √n).".into(),
        "Prompts and tokenisation as lm-evaluation-harness 0.4.9's HF model class; docs/tasks.md.".into(),
    ];
    Some(t)
}

/// Every table of a session, the main one first.
pub fn tables(s: &Session) -> Vec<Table> {
    let groups = ppl_groups(s);
    let mut attention = Vec::new();
    let mut progressive = Vec::new();
    let mut sweeps = Vec::new();
    let mut listed = Vec::new();
    for g in &groups {
        match shape_of(s, g) {
            Shape::Attention => attention.push(attention_table(s, g, attention.len() + 1)),
            Shape::Progressive => progressive.push(progressive_table(s, g, progressive.len() + 1)),
            Shape::Sweep => sweeps.push(sweep_table(s, g, sweeps.len() + 1)),
            Shape::List => listed.push(g),
        }
    }
    let mut out = attention;
    out.extend(speed_table(s));
    out.extend(super::equilibrium::table(s));
    out.extend(progressive);
    out.extend(sweeps);
    out.extend(intervention_tables(s, 1));
    for (i, inst) in s.of_role(Role::Residuals) {
        if !is_intervention(inst) {
            out.push(residual_table(s, i));
        }
    }
    out.extend(criticality_table(s));
    for (i, _) in s.of_role(Role::Perturbation) {
        out.push(perturbation_table(s, i));
    }
    if !listed.is_empty() {
        out.push(list_table(s, &listed));
    }
    out.extend(tasks_table(s));
    out.extend(finetune_table(s));
    out.extend(text_table(s));
    out.extend(models_table(s));
    out
}

/// `holographic w=4 R=2`: a swap's `attention` metric (its name until it has run).
pub fn attention_label(s: &Session, w: usize) -> String {
    let inst = &s.instances[w];
    inst.metric_str("attention").map(str::to_string).unwrap_or_else(|| format!("`{}`", inst.name))
}

/// Full attention against each attention swap of the group's load: perplexity as swapped and
/// after the adaptation fine-tune, and the adapted model's generations.
pub fn attention_table(s: &Session, g: &PplGroup, n: usize) -> Table {
    let mut t = Table::new(
        format!("attention#{n}"),
        "Attention",
        &[
            ("attention", false),
            ("layers", false),
            ("window", true),
            ("regions", true),
            ("reach (tokens)", true),
            ("ppl before", true),
            ("ppl after", true),
            ("vs full (%)", true),
            ("text label", false),
        ],
    );
    t.notes = ppl_notes(s, g);
    let dash = || "—".to_string();
    let base = baseline(s, &position(s, g.evals[0]), &g.protocol).filter(|b| g.evals.contains(b));
    let base_ppl = base.and_then(|b| ppl_of(&s.instances[b]));
    let full = vec!["full".into(), "all".into(), dash(), dash(), "all".into()];
    let base_cell = base.map(|b| ppl_cell(&s.instances[b])).unwrap_or_else(dash);
    t.push([full, vec![base_cell, dash(), dash(), text_label(s, g.load)]].concat());
    let eval_on = |m: Option<usize>| m.and_then(|m| g.evals.iter().copied().find(|&i| position(s, i).model == Some(m)));
    let total_layers = g.load.and_then(|l| s.instances[l].metric("layers")).and_then(Json::as_u64);
    let mut dims: Vec<String> = Vec::new();
    for (w, inst) in s.of_role(Role::Swap).filter(|(w, _)| position_of_model(s, *w).load == g.load) {
        // The adaptation: the first fine-tune reading the swapped model.
        let adapted = sibling(s, Role::Train, Some(w));
        let (before, after) = (eval_on(Some(w)), eval_on(adapted));
        let (bp, ap) = (before.and_then(|i| ppl_of(&s.instances[i])), after.and_then(|i| ppl_of(&s.instances[i])));
        let layers = match inst.metric("layers").and_then(Json::as_array) {
            Some(l) if total_layers == Some(l.len() as u64) => "all".to_string(),
            Some(l) => l.iter().map(|x| cell(Some(x))).collect::<Vec<_>>().join(", "),
            None => cell(inst.params.get("layers")),
        };
        let metric_or_param = |k: &str| cell(inst.metric(k).or_else(|| inst.params.get(k)));
        let dim = cell(inst.metric("boundary_dim"));
        if dim != "—" && !dims.contains(&dim) {
            dims.push(dim);
        }
        t.push(vec![
            attention_label(s, w),
            layers,
            metric_or_param("window"),
            metric_or_param("regions"),
            cell(inst.metric("reach")),
            before.map(|i| ppl_cell(&s.instances[i])).unwrap_or_else(dash),
            after.map(|i| ppl_cell(&s.instances[i])).unwrap_or_else(dash),
            vs(ap.or(if after.is_none() { bp } else { None }), base_ppl),
            text_label(s, adapted.or(Some(w))),
        ]);
    }
    if !dims.is_empty() {
        t.notes.push(format!("boundary_dim {}", dims.join(", ")));
    }
    let load = g.load.map(|l| s.instances[l].name.as_str()).unwrap_or("?");
    t.footnotes = vec![
        "ppl before: the model as it is (full: the load; a swap: the swapped model before any training); ppl after: the swapped model after its adaptation (the fine-tune reading it).".into(),
        "reach: how far back a token sees, its own region of `window` tokens and the `regions` summarised regions before it, (R + 1) · w; full attention sees the whole window.".into(),
        match base {
            Some(b) => format!(
                "full: `{}`, the eval-ppl with this protocol on `{load}` with no prune, fine-tune or swap in between; vs full = (ppl after / full − 1) × 100 (ppl before when there is no adaptation).",
                s.instances[b].name
            ),
            None => format!("no full-attention perplexity: no eval-ppl with this protocol reads `{load}` unmodified."),
        },
        "text label: majority outcome of the `generate` on the adapted model (the swapped one without adaptation, the load for full), correct answers / prompts.".into(),
    ];
    t
}

/// A MiB cell: one decimal, — when not measured.
fn mib(v: Option<&Json>) -> String {
    v.and_then(Json::as_f64).map(|m| format!("{m:.1}")).unwrap_or_else(|| "—".into())
}

/// Forward speed and peak memory per timed model and sequence length, with the speed-up over
/// full attention on the same load at the same length.
pub fn speed_table(s: &Session) -> Option<Table> {
    let mut t = Table::new(
        "speed",
        "Forward speed",
        &[
            ("attention", false),
            ("length", true),
            ("tokens/s", true),
            ("vs full", true),
            ("seconds", true),
            ("forward memory (MiB)", true),
            ("peak memory (MiB)", true),
        ],
    );
    t.key_columns = 2;
    let lengths = |i: usize| s.instances[i].metric("lengths").and_then(Json::as_array).cloned().unwrap_or_default();
    let tps = |l: &Json| l.get("tokens_per_second").and_then(Json::as_f64);
    let length = |l: &Json| l.get("length").and_then(Json::as_u64);
    let (mut loads, mut devices, mut beyond) = (Vec::new(), Vec::new(), false);
    for (i, inst) in s.of_role(Role::Speed) {
        let p = position(s, i);
        if !loads.contains(&p.load) {
            loads.push(p.load);
        }
        let device = format!("{}, batch {}", inst.metric_str("device").unwrap_or("?"), cell(inst.metric("batch")));
        if inst.has_metrics() && !devices.contains(&device) {
            devices.push(device);
        }
        let label = match (inst.metric_str("attention"), p.swap) {
            (Some(a), _) => a.to_string(),
            (None, Some(w)) => attention_label(s, w),
            (None, None) => "full".to_string(),
        };
        // Full attention on the same load: the first unmodified model timed there.
        let full =
            s.of_role(Role::Speed).map(|(j, _)| j).find(|&j| position(s, j).is_base() && position(s, j).load == p.load);
        let rows = lengths(i);
        if rows.is_empty() {
            t.push(vec![label.clone(), "—".into(), inst.absent(), "—".into(), "—".into(), "—".into(), "—".into()]);
        }
        for l in &rows {
            let far = l.get("beyond_context").and_then(Json::as_bool) == Some(true);
            beyond |= far;
            let base = full.and_then(|f| lengths(f).into_iter().find(|x| length(x) == length(l))).and_then(|x| tps(&x));
            t.push(vec![
                label.clone(),
                format!("{}{}", cell(l.get("length")), if far { " †" } else { "" }),
                tps(l).map(|x| format!("{x:.0}")).unwrap_or_else(|| "—".into()),
                match (tps(l), base) {
                    (Some(x), Some(b)) if b > 0.0 && !p.is_base() => format!("{:.2}×", x / b),
                    _ => "—".into(),
                },
                l.get("seconds").and_then(Json::as_f64).map(sig).unwrap_or_else(|| "—".into()),
                mib(l.get("forward_memory_mb")),
                mib(l.get("peak_memory_mb")),
            ]);
        }
    }
    t.notes = loads.iter().map(|&l| model_note(s, l)).collect();
    t.notes.push(format!("timed on {}", if devices.is_empty() { "?".to_string() } else { devices.join("; ") }));
    t.footnotes = vec![
        "tokens/s: one forward of the model's body (no LM head) over batch × length random tokens, the median of the repeats; vs full: tokens/s over full attention's on the same load at the same length; seconds: that forward's median time.".into(),
        "forward memory: how far the process's resident memory rose above its level just before the timed forwards (what the forward needed, as far as the allocator asked the system for it); peak memory: the high-water mark itself (the loaded model and whatever earlier stages left included); not measured (—) on CUDA.".into(),
    ];
    if beyond {
        let ctx: Vec<String> = s
            .of_role(Role::Speed)
            .filter_map(|(_, inst)| inst.metric("max_position_embeddings").map(|v| cell(Some(v))))
            .fold(Vec::new(), |mut v, c| {
                if !v.contains(&c) {
                    v.push(c);
                }
                v
            });
        t.footnotes.push(format!(
            "†: beyond the model's trained context (max_position_embeddings = {}): RoPE is extended for timing only, the outputs mean nothing.",
            ctx.join(", ")
        ));
    }
    (!t.rows.is_empty()).then_some(t)
}
