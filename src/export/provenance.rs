//! Where an exported model comes from: the instances of its pipeline (from a plan or a session
//! file) with kinds, keys, parameters, inputs and metrics; its lineage (the instances it was
//! computed from) and its readers (the instances that measured it); and the recipe, the lineage
//! as a pipeline file that plans to the same keys.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{json, Map, Value as Json};

/// One instance of the pipeline.
#[derive(Clone, Debug, Serialize)]
pub struct Node {
    pub name: String,
    pub kind: String,
    /// 64 hex digits.
    pub key: String,
    pub params: Map<String, Json>,
    /// (slot, instance name) in the pipeline's order.
    pub inputs: Vec<(String, String)>,
    /// Its metrics, where the session or the cache has them.
    pub metrics: Option<Map<String, Json>>,
    /// Whether its kind produces a model (a reader that does is not a measurement of it).
    #[serde(skip)]
    pub model: bool,
    /// The sweep point it belongs to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep: Option<Json>,
}

/// Where the metrics and keys were read.
#[derive(Clone, Debug)]
pub enum Origin {
    /// A pipeline file planned now; metrics from the cache entries' manifests.
    Pipeline,
    /// A session file written by `run`; metrics as that run recorded them.
    Session(String),
}

/// A pipeline's instances and the one being exported.
#[derive(Clone, Debug)]
pub struct Provenance {
    pub pipeline: String,
    pub description: String,
    /// The pipeline file as given (or as the session recorded it).
    pub file: String,
    pub origin: Origin,
    pub profiles: Vec<String>,
    pub overrides: Vec<String>,
    pub seed: Json,
    /// Device class of the keys (`cpu` or `cuda`).
    pub device: String,
    pub nodes: Vec<Node>,
    /// Index of the exported instance in `nodes`.
    pub target: usize,
}

impl Provenance {
    pub fn target(&self) -> &Node {
        &self.nodes[self.target]
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// The exported instance and every instance it was computed from (through any input slot),
    /// inputs before the instances that read them, the exported instance last.
    pub fn lineage(&self) -> Vec<usize> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        self.visit(self.target, &mut seen, &mut out);
        out
    }

    fn visit(&self, i: usize, seen: &mut BTreeSet<usize>, out: &mut Vec<usize>) {
        if !seen.insert(i) {
            return;
        }
        for (_, name) in &self.nodes[i].inputs {
            if let Some(j) = self.index_of(name) {
                self.visit(j, seen, out);
            }
        }
        out.push(i);
    }

    /// Instances that read the exported model directly (its measurements), in pipeline order.
    pub fn readers(&self) -> Vec<usize> {
        let name = &self.target().name;
        (0..self.nodes.len()).filter(|&i| self.nodes[i].inputs.iter().any(|(_, n)| n == name)).collect()
    }

    /// Stage names for the recipe: the instance names made valid TOML stage names (letters,
    /// digits, `-`, `_`), unique within the lineage.
    pub fn recipe_names(&self) -> BTreeMap<String, String> {
        let mut names = BTreeMap::new();
        let mut used = BTreeSet::new();
        for i in self.lineage() {
            let base = stage_name(&self.nodes[i].name);
            let mut name = base.clone();
            let mut n = 2;
            while !used.insert(name.clone()) {
                name = format!("{base}-{n}");
                n += 1;
            }
            names.insert(self.nodes[i].name.clone(), name);
        }
        names
    }

    /// The lineage as a pipeline file: every stage with its resolved parameters (sweeps expanded,
    /// defaults, profiles and overrides applied), so planning it gives the same keys.
    pub fn recipe_toml(&self) -> String {
        let names = self.recipe_names();
        let mut s = String::new();
        s.push_str(&format!(
            "# The stages rpt-flow {} ran to produce `{}` (pipeline `{}`, {}), with every parameter\n",
            env!("CARGO_PKG_VERSION"),
            self.target().name,
            self.pipeline,
            self.file
        ));
        s.push_str("# resolved. `rpt-flow plan` on this file shows the same keys; relative paths in it resolve\n");
        s.push_str("# against this file's folder (the original pipeline's were against its own).\n");
        if !self.profiles.is_empty() || !self.overrides.is_empty() {
            s.push_str(&format!(
                "# Profiles {:?} and overrides {:?} are already applied below.\n",
                self.profiles, self.overrides
            ));
        }
        s.push_str("\n[pipeline]\n");
        s.push_str(&format!("name = {}\n", toml_string(&format!("{}-export", stage_name(&self.pipeline)))));
        if let Some(seed) = self.seed.as_i64() {
            s.push_str(&format!("seed = {seed}\n"));
        }
        for i in self.lineage() {
            let n = &self.nodes[i];
            s.push_str(&format!("\n# {} (key {})\n", n.name, n.key));
            s.push_str(&format!("[stages.{}]\n", names[&n.name]));
            s.push_str(&format!("kind = {}\n", toml_string(&n.kind)));
            for (slot, from) in &n.inputs {
                let target = names.get(from).cloned().unwrap_or_else(|| from.clone());
                s.push_str(&format!("{} = {}\n", toml_key(slot), toml_string(&target)));
            }
            for (k, v) in &n.params {
                if let Some(v) = toml_value(v) {
                    s.push_str(&format!("{} = {v}\n", toml_key(k)));
                }
            }
        }
        s
    }

    /// The provenance as `rpt_flow.json` holds it.
    pub fn to_json(&self) -> Json {
        let lineage: Vec<&Node> = self.lineage().into_iter().map(|i| &self.nodes[i]).collect();
        let readers: Vec<&Node> = self.readers().into_iter().map(|i| &self.nodes[i]).collect();
        let (origin, session) = match &self.origin {
            Origin::Pipeline => ("pipeline (metrics from the cache manifests)", Json::Null),
            Origin::Session(p) => ("session", json!(p)),
        };
        json!({
            "pipeline": self.pipeline,
            "description": self.description,
            "file": self.file,
            "provenance_from": origin,
            "session": session,
            "profiles": self.profiles,
            "overrides": self.overrides,
            "seed": self.seed,
            "device": self.device,
            "instance": self.target().name,
            "kind": self.target().kind,
            "key": self.target().key,
            "params": self.target().params,
            "metrics": self.target().metrics,
            "lineage": lineage,
            "measured_by": readers,
            "recipe_stage_names": self.recipe_names(),
        })
    }
}

/// An instance name as a stage name: `level[sparsity=0.1].tuned` → `level-sparsity-0_1-tuned`.
pub fn stage_name(instance: &str) -> String {
    let mut out = String::new();
    for c in instance.chars() {
        let mapped = match c {
            c if c.is_ascii_alphanumeric() || c == '_' || c == '-' => c,
            '.' if out.ends_with(|p: char| p.is_ascii_digit()) => '_',
            _ => '-',
        };
        if mapped == '-' && out.ends_with('-') {
            continue;
        }
        out.push(mapped);
    }
    let out = out.trim_matches('-').to_string();
    if out.is_empty() {
        "stage".into()
    } else {
        out
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn toml_key(k: &str) -> String {
    if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        k.to_string()
    } else {
        toml_string(k)
    }
}

/// A JSON value as an inline TOML value; None for null (TOML has none: the parameter is left
/// out, which is what a null default means).
fn toml_value(v: &Json) -> Option<String> {
    Some(match v {
        Json::Null => return None,
        Json::Bool(b) => b.to_string(),
        Json::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        Json::Number(n) => toml::Value::Float(n.as_f64().unwrap_or(f64::NAN)).to_string(),
        Json::String(s) => toml_string(s),
        Json::Array(a) => format!("[{}]", a.iter().filter_map(toml_value).collect::<Vec<_>>().join(", ")),
        Json::Object(o) => {
            let fields: Vec<String> =
                o.iter().filter_map(|(k, v)| toml_value(v).map(|v| format!("{} = {v}", toml_key(k)))).collect();
            if fields.is_empty() {
                "{}".into()
            } else {
                format!("{{ {} }}", fields.join(", "))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_become_stage_names() {
        assert_eq!(stage_name("level[sparsity=0.1].tuned"), "level-sparsity-0_1-tuned");
        assert_eq!(stage_name("base"), "base");
        assert_eq!(stage_name("grid[a=1,b=x].after"), "grid-a-1-b-x-after");
    }

    #[test]
    fn values_round_trip_through_toml() {
        let v = json!({"a": 0.1, "b": 3, "c": "x\"y", "d": [1.0, 2.5], "e": {"f": true, "g": null}, "h": 1e-4});
        let text = format!("v = {}", toml_value(&v).unwrap());
        let back: toml::Table = text.parse().unwrap();
        let back = serde_json::to_value(&back["v"]).unwrap();
        assert_eq!(back, json!({"a": 0.1, "b": 3, "c": "x\"y", "d": [1.0, 2.5], "e": {"f": true}, "h": 1e-4}));
        assert!(back["d"][0].is_f64(), "a float stays a float");
    }
}
