//! Reading session files (`sessions/YYYY-MM-DD/<pipeline>.json`, see docs/cli.md) into a light
//! typed view. Unknown fields are ignored and metrics stay JSON, so a report reads sessions of
//! stage kinds it does not know yet (their instances still appear in the flat rows).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde_json::{Map, Value as Json};

/// One run (or, for `report PIPELINE.toml`, the cached state of a pipeline).
#[derive(Clone, Debug, Default)]
pub struct Session {
    /// Where it was read from (None when built in memory).
    pub path: Option<PathBuf>,
    pub pipeline: String,
    pub description: String,
    pub file: String,
    pub profiles: Vec<String>,
    pub overrides: Vec<String>,
    pub seed: Json,
    pub device: String,
    pub status: String,
    pub started: String,
    pub finished: String,
    /// Instances in the order the session lists them (execution order).
    pub instances: Vec<Instance>,
}

#[derive(Clone, Debug, Default)]
pub struct Instance {
    pub name: String,
    pub kind: String,
    pub key: String,
    /// `pending`, `cached`, `done`, `failed`, `skipped`, `interrupted`; `missing` for a pipeline
    /// instance with no cache entry.
    pub status: String,
    pub cached: bool,
    pub seconds: f64,
    pub params: Map<String, Json>,
    /// (slot, instance name) in the order the session lists them.
    pub inputs: Vec<(String, String)>,
    /// The stage's metrics object (empty when it has not run).
    pub metrics: Map<String, Json>,
    pub sweep: Option<SweepPoint>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct SweepPoint {
    pub name: String,
    pub stage: String,
    pub index: u64,
    pub values: Map<String, Json>,
}

fn string(v: &Json, key: &str) -> String {
    match &v[key] {
        Json::String(s) => s.clone(),
        Json::Null => String::new(),
        other => other.to_string(),
    }
}

fn strings(v: &Json) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_str().map(str::to_string).unwrap_or(x.to_string())).collect())
        .unwrap_or_default()
}

impl Session {
    pub fn read(path: &Path) -> Result<Session> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let doc: Json =
            serde_json::from_str(&text).with_context(|| format!("{} is not a JSON session file", path.display()))?;
        let mut s = Session::from_json(&doc).with_context(|| format!("reading session {}", path.display()))?;
        s.path = Some(path.to_path_buf());
        Ok(s)
    }

    pub fn from_json(doc: &Json) -> Result<Session> {
        let Some(stages) = doc["stages"].as_object() else {
            bail!("no `stages` object: not an rpt-flow session file");
        };
        let mut instances = Vec::with_capacity(stages.len());
        for (name, s) in stages {
            let inputs = s["inputs"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
                .unwrap_or_default();
            let sweep = s["sweep"].as_object().map(|sw| SweepPoint {
                name: sw.get("name").and_then(Json::as_str).unwrap_or_default().to_string(),
                stage: sw.get("stage").and_then(Json::as_str).unwrap_or_default().to_string(),
                index: sw.get("index").and_then(Json::as_u64).unwrap_or(0),
                values: sw.get("values").and_then(Json::as_object).cloned().unwrap_or_default(),
            });
            instances.push(Instance {
                name: name.clone(),
                kind: string(s, "kind"),
                key: string(s, "key"),
                status: string(s, "status"),
                cached: s["cached"].as_bool().unwrap_or(false),
                seconds: s["seconds"].as_f64().unwrap_or(0.0),
                params: s["params"].as_object().cloned().unwrap_or_default(),
                inputs,
                metrics: s["metrics"].as_object().cloned().unwrap_or_default(),
                sweep,
                error: s["error"].as_str().map(str::to_string),
            });
        }
        Ok(Session {
            path: None,
            pipeline: string(doc, "pipeline"),
            description: string(doc, "description"),
            file: string(doc, "file"),
            profiles: strings(&doc["profiles"]),
            overrides: strings(&doc["overrides"]),
            seed: doc["seed"].clone(),
            device: string(doc, "device"),
            status: crate::exec::effective_status(doc),
            started: string(doc, "started"),
            finished: string(doc, "finished"),
            instances,
        })
    }

    /// `<pipeline>[.<profile>…]`, the stem of the session file and of the report files.
    pub fn stem(&self) -> String {
        match &self.path {
            Some(p) => p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            None => {
                let mut s = self.pipeline.clone();
                for p in &self.profiles {
                    s.push('.');
                    s.push_str(p);
                }
                s
            }
        }
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.instances.iter().position(|i| i.name == name)
    }

    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = (usize, &'a Instance)> + 'a {
        self.instances.iter().enumerate().filter(move |(_, i)| i.kind == kind)
    }
}

impl Instance {
    /// True when the stage produced metrics (ran or came from the cache).
    pub fn has_metrics(&self) -> bool {
        !self.metrics.is_empty()
    }

    /// A metric by dotted path (`protocol.seq_len`).
    pub fn metric(&self, path: &str) -> Option<&Json> {
        let mut parts = path.split('.');
        let mut v = self.metrics.get(parts.next()?)?;
        for p in parts {
            v = v.get(p)?;
        }
        Some(v)
    }

    pub fn metric_f64(&self, path: &str) -> Option<f64> {
        self.metric(path).and_then(Json::as_f64)
    }

    pub fn metric_str(&self, path: &str) -> Option<&str> {
        self.metric(path).and_then(Json::as_str)
    }

    pub fn param_f64(&self, name: &str) -> Option<f64> {
        self.params.get(name).and_then(Json::as_f64)
    }

    /// The instance a slot reads.
    pub fn input(&self, slot: &str) -> Option<&str> {
        self.inputs.iter().find(|(s, _)| s == slot).map(|(_, n)| n.as_str())
    }

    /// What to print instead of a number when the stage has no metrics: its status.
    pub fn absent(&self) -> String {
        match self.status.as_str() {
            "" | "pending" => "pending".into(),
            s => s.to_string(),
        }
    }
}
