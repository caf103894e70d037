//! Whether an instance is cached, resumable or must run, and why — found by comparing its key
//! material with the nearest cached entry of the same kind.

use serde_json::Value as Json;

use super::Plan;
use crate::cache::{Cache, EntryState, EntrySummary, Manifest};

#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    Cached,
    /// Not finished, but resumable state exists.
    Partial,
    /// Must run, with the reasons.
    ToRun(Vec<String>),
    /// A damaged entry holds the key: `run` moves it to quarantine and recomputes it.
    Damaged(String),
}

impl Status {
    pub fn label(&self) -> &'static str {
        match self {
            Status::Cached => "cached",
            Status::Partial => "partial (resumable)",
            Status::ToRun(_) => "to run",
            Status::Damaged(_) => "damaged (recomputes)",
        }
    }
    pub fn reasons(&self) -> &[String] {
        match self {
            Status::ToRun(r) => r,
            Status::Damaged(why) => std::slice::from_ref(why),
            _ => &[],
        }
    }
}

/// Status of every instance (indexed like `plan.pipeline.instances`).
pub fn status_of(plan: &Plan, cache: &Cache, entries: &[EntrySummary]) -> Vec<Status> {
    let n = plan.pipeline.instances.len();
    let mut out = vec![Status::Cached; n];
    for &i in &plan.order {
        let key = &plan.keys[i];
        out[i] = match cache.inspect(key) {
            EntryState::Intact(_) => Status::Cached,
            EntryState::Damaged(why) => Status::Damaged(why),
            EntryState::Missing if cache.partial(key).exists() => Status::Partial,
            EntryState::Missing => Status::ToRun(reasons(plan, i, &out, entries)),
        };
    }
    out
}

fn reasons(plan: &Plan, i: usize, statuses: &[Status], entries: &[EntrySummary]) -> Vec<String> {
    let inst = &plan.pipeline.instances[i];
    let mut why = Vec::new();
    for r in &inst.inputs {
        if statuses[r.target] != Status::Cached {
            why.push(format!("new input: `{}` is not cached yet", plan.pipeline.instances[r.target].name));
        }
    }
    match nearest_entry(plan, i, entries) {
        None => {
            if why.is_empty() {
                why.push(format!("new: no cached `{}` entry to compare with", inst.kind));
            }
        }
        Some(m) => {
            for d in diff_material(&m.key_material, &plan.material[i]) {
                let line = if d.starts_with("version") {
                    format!("version bump: {d}")
                } else if d.starts_with("params") {
                    format!("new params: {d}")
                } else if d.starts_with("inputs") {
                    if why.iter().any(|w| w.starts_with("new input")) {
                        continue;
                    }
                    format!("new input: {d}")
                } else {
                    format!("changed {d}")
                };
                why.push(line);
            }
        }
    }
    if why.is_empty() {
        why.push("not in cache".into());
    }
    why
}

/// The cached entry most like instance `i`: same kind, preferring the same pipeline and instance
/// name, then the most equal key-material fields.
pub fn nearest_entry<'a>(plan: &Plan, i: usize, entries: &'a [EntrySummary]) -> Option<&'a Manifest> {
    let inst = &plan.pipeline.instances[i];
    let mine = &plan.material[i];
    entries.iter().map(|e| &e.manifest).filter(|m| m.kind == inst.kind && m.key != plan.keys[i]).max_by_key(|m| {
        let same_name = m.instance == inst.name;
        let same_pipeline = m.pipeline == plan.pipeline.name;
        let equal_fields = ["version", "params", "settings", "identity", "inputs"]
            .iter()
            .filter(|f| m.key_material.get(**f) == mine.get(**f))
            .count();
        let equal_params = leaf_diffs(
            "",
            m.key_material.get("params").unwrap_or(&Json::Null),
            mine.get("params").unwrap_or(&Json::Null),
        )
        .len();
        (same_name, same_pipeline, equal_fields, std::cmp::Reverse(equal_params), m.created)
    })
}

/// Human lines for every field that differs between two key materials: `params.steps: 20 → 30`.
pub fn diff_material(old: &Json, new: &Json) -> Vec<String> {
    let mut out = Vec::new();
    for field in ["version", "params", "settings", "identity", "inputs"] {
        let (a, b) = (old.get(field).unwrap_or(&Json::Null), new.get(field).unwrap_or(&Json::Null));
        if a == b {
            continue;
        }
        if field == "inputs" {
            out.push(format!("inputs: {}", input_diff(a, b)));
            continue;
        }
        for (path, x, y) in leaf_diffs(field, a, b) {
            out.push(format!("{path}: {} → {}", show(x), show(y)));
        }
    }
    out
}

fn input_diff(a: &Json, b: &Json) -> String {
    let slots = |v: &Json| -> Vec<(String, String)> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|x| {
                let slot = x.get("slot").and_then(Json::as_str).unwrap_or("?").to_string();
                let key = x.get("key").and_then(Json::as_str).unwrap_or("").chars().take(12).collect();
                (slot, key)
            })
            .collect()
    };
    let (sa, sb) = (slots(a), slots(b));
    let mut parts = Vec::new();
    for (slot, kb) in &sb {
        match sa.iter().find(|(s, _)| s == slot) {
            Some((_, ka)) if ka != kb => parts.push(format!("`{slot}` now reads {kb} (was {ka})")),
            None => parts.push(format!("`{slot}` added")),
            _ => {}
        }
    }
    for (slot, _) in &sa {
        if !sb.iter().any(|(s, _)| s == slot) {
            parts.push(format!("`{slot}` removed"));
        }
    }
    parts.join(", ")
}

fn show(v: Option<&Json>) -> String {
    match v {
        None => "(absent)".into(),
        Some(v) => v.to_string(),
    }
}

fn leaf_diffs<'a>(path: &str, a: &'a Json, b: &'a Json) -> Vec<(String, Option<&'a Json>, Option<&'a Json>)> {
    match (a, b) {
        (Json::Object(x), Json::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            let mut out = Vec::new();
            for k in keys {
                let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) if p == q => {}
                    (Some(p), Some(q)) => out.extend(leaf_diffs(&sub, p, q)),
                    (p, q) => out.push((sub, p, q)),
                }
            }
            out
        }
        _ if a == b => vec![],
        _ => vec![(path.to_string(), Some(a), Some(b))],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diff_names_changed_params_and_versions() {
        let old = json!({"version": 1, "params": {"steps": 20, "lr": 0.001}, "settings": {"device": "cpu"}});
        let new = json!({"version": 2, "params": {"steps": 30, "lr": 0.001}, "settings": {"device": "cpu"}});
        assert_eq!(diff_material(&old, &new), vec!["version: 1 → 2".to_string(), "params.steps: 20 → 30".to_string()]);
    }

    #[test]
    fn diff_reports_added_and_removed_params() {
        let old = json!({"params": {"a": 1}});
        let new = json!({"params": {"b": 2}});
        assert_eq!(
            diff_material(&old, &new),
            vec!["params.a: 1 → (absent)".to_string(), "params.b: (absent) → 2".to_string()]
        );
    }
}
