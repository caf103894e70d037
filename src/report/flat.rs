//! One flat row per instance for notebooks (`report --format csv|json`): see docs/report.md.

use serde_json::{Map, Value as Json};

use super::lineage::{position, sparsity_of};
use super::session::{Role, Session};

/// Flattens `v` under `prefix`: objects give dotted names, arrays give `<name>.count`, and the
/// per-tensor table of `prune` (hundreds of columns on a real model) gives `per_tensor.count`.
fn flatten(prefix: &str, v: &Json, out: &mut Map<String, Json>) {
    match v {
        Json::Object(m) if prefix.ends_with("per_tensor") || prefix.ends_with("_per_tensor") => {
            out.insert(format!("{prefix}.count"), Json::from(m.len()));
        }
        Json::Object(m) => {
            for (k, x) in m {
                flatten(&format!("{prefix}.{k}"), x, out);
            }
        }
        Json::Array(a) => {
            out.insert(format!("{prefix}.count"), Json::from(a.len()));
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// Rows of one session; `label` (the session file) goes into a `session` column when given.
pub fn rows(s: &Session, label: Option<&str>) -> Vec<Map<String, Json>> {
    let mut out = Vec::new();
    for (i, inst) in s.instances.iter().enumerate() {
        let mut r = Map::new();
        if let Some(l) = label {
            r.insert("session".into(), Json::from(l));
        }
        r.insert("pipeline".into(), Json::from(s.pipeline.clone()));
        r.insert("instance".into(), Json::from(inst.name.clone()));
        r.insert("kind".into(), Json::from(inst.kind.clone()));
        r.insert("key".into(), Json::from(inst.key.clone()));
        r.insert("status".into(), Json::from(inst.status.as_str()));
        r.insert("cached".into(), Json::from(inst.cached));
        r.insert("seconds".into(), Json::from(inst.seconds));
        r.insert("device".into(), Json::from(s.device.clone()));
        let p = position(s, i);
        let name = |j: Option<usize>| j.map(|j| Json::from(s.instances[j].name.clone())).unwrap_or(Json::Null);
        r.insert("model".into(), name(p.model));
        r.insert("model.load".into(), name(p.load));
        r.insert("model.prune".into(), name(p.prune));
        r.insert("model.finetune".into(), name(p.tuned));
        r.insert("model.swap".into(), name(p.swap));
        let sp = if inst.has_role(Role::Source) || inst.has_role(Role::Prune) { None } else { sparsity_of(s, &p) };
        r.insert("model.sparsity".into(), sp.map(Json::from).unwrap_or(Json::Null));
        if let Some(sw) = &inst.sweep {
            r.insert("sweep".into(), Json::from(sw.name.clone()));
            r.insert("sweep.stage".into(), Json::from(sw.stage.clone()));
            r.insert("sweep.index".into(), Json::from(sw.index));
            for (k, v) in &sw.values {
                flatten(&format!("sweep.{k}"), v, &mut r);
            }
        }
        for (slot, n) in &inst.inputs {
            r.insert(format!("input.{slot}"), Json::from(n.clone()));
        }
        for (k, v) in &inst.params {
            flatten(&format!("param.{k}"), v, &mut r);
        }
        for (k, v) in &inst.metrics {
            flatten(&format!("metric.{k}"), v, &mut r);
        }
        out.push(r);
    }
    out
}

/// Column names: the union of every row's names in order of first appearance.
pub fn columns(rows: &[Map<String, Json>]) -> Vec<String> {
    let mut cols: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for r in rows {
        for k in r.keys() {
            if seen.insert(k.clone()) {
                cols.push(k.clone());
            }
        }
    }
    cols
}

fn csv_field(v: Option<&Json>) -> String {
    let s = match v {
        None | Some(Json::Null) => return String::new(),
        Some(Json::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// RFC 4180 CSV with a header row; empty cells for absent values.
pub fn csv(rows: &[Map<String, Json>]) -> String {
    let cols = columns(rows);
    let mut out = cols.iter().map(|c| csv_field(Some(&Json::from(c.clone())))).collect::<Vec<_>>().join(",");
    out.push('\n');
    for r in rows {
        out.push_str(&cols.iter().map(|c| csv_field(r.get(c))).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}

/// A JSON array of the rows (records), for `pandas.DataFrame(json.load(f))`.
pub fn json(rows: &[Map<String, Json>]) -> String {
    let v = Json::Array(rows.iter().cloned().map(Json::Object).collect());
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}
