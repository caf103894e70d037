//! The session file's one definition: `sessions/YYYY-MM-DD/<pipeline>….json`, what a run did and
//! measured. The executor writes it, `report` reads it, the CLI rebuilds one from the cache and
//! adds the report's tables; all through these types, so the format is written down once.
//!
//! Versioned by `format`. Files written before the field existed are format 1 and read as such
//! (every field this reader needs was already there); a file from a newer rpt-flow is refused
//! with a clear error rather than misread. Fields this version does not know are kept (`extra`)
//! so rewriting a file (adding tables) loses nothing.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::spec::schema::Role;

/// The format this rpt-flow writes. 2: `format` itself and each instance's `roles` (1: neither).
pub const FORMAT: u32 = 2;

/// A whole run's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    Running,
    Complete,
    Failed,
    Interrupted,
    /// Not a run: a pipeline's cached state assembled by `report PIPELINE.toml`.
    #[serde(rename = "from cache")]
    FromCache,
    /// A status this version does not know (a newer writer's).
    #[serde(other)]
    Unknown,
}

/// One instance's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageStatus {
    #[default]
    Pending,
    Cached,
    Done,
    Failed,
    /// Not run because an input failed.
    Skipped,
    Interrupted,
    /// In a session assembled from the cache: no entry for this key.
    Missing,
    #[serde(other)]
    Unknown,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Complete => "complete",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
            RunStatus::FromCache => "from cache",
            RunStatus::Unknown => "unknown",
        }
    }
}

impl StageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Pending => "pending",
            StageStatus::Cached => "cached",
            StageStatus::Done => "done",
            StageStatus::Failed => "failed",
            StageStatus::Skipped => "skipped",
            StageStatus::Interrupted => "interrupted",
            StageStatus::Missing => "missing",
            StageStatus::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for StageStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One session file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Where it was read from or goes (not stored in the file).
    #[serde(skip)]
    pub path: Option<PathBuf>,
    #[serde(default = "format_one")]
    pub format: u32,
    pub pipeline: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub file: String,
    #[serde(default)]
    pub profiles: Vec<String>,
    #[serde(default)]
    pub overrides: Vec<String>,
    #[serde(default)]
    pub seed: Json,
    #[serde(default)]
    pub device: String,
    #[serde(default)]
    pub cache: String,
    #[serde(default)]
    pub rpt_flow_version: String,
    #[serde(default)]
    pub started: String,
    #[serde(default)]
    pub finished: Option<String>,
    pub status: RunStatus,
    /// Who is running it: a reader that finds `running` with this process gone on this host
    /// knows the run was killed (`interrupted`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Instances in execution order (a JSON object keyed by instance name).
    #[serde(rename = "stages", with = "stages_in_order")]
    pub instances: Vec<StageRecord>,
    /// The report's tables, added when a run ends (report types are not the engine's: JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<Json>,
    /// Fields this version does not know, kept as they were.
    #[serde(flatten)]
    pub extra: Map<String, Json>,
}

fn format_one() -> u32 {
    1
}

/// One instance of a session.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StageRecord {
    /// The instance name (the key of its entry in `stages`).
    #[serde(skip)]
    pub name: String,
    #[serde(default)]
    pub kind: String,
    /// What the kind is to readers (see [`Role`]); a format-1 file has none written and gets
    /// those of the kinds that existed then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<Role>,
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub status: StageStatus,
    #[serde(default)]
    pub cached: bool,
    #[serde(default)]
    pub seconds: f64,
    /// Peak resident memory while it computed (Linux), when it computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_mb: Option<f64>,
    #[serde(default)]
    pub params: Map<String, Json>,
    /// (slot, instance name) in the order the pipeline gives them.
    #[serde(default, with = "pairs_in_order")]
    pub inputs: Vec<(String, String)>,
    /// The stage's metrics object (empty when it has not run).
    #[serde(default, deserialize_with = "object_or_empty")]
    pub metrics: Map<String, Json>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<SweepPoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The device it ran on, in a run over several (`--device cuda:0,cuda:1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The cluster job that computed it (`--executor slurm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobRef>,
    #[serde(flatten)]
    pub extra: Map<String, Json>,
}

/// A scheduler's job: its id and where its output went.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct JobRef {
    #[serde(default)]
    pub executor: String,
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub log: String,
}

/// Where an instance sits in a sweep.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SweepPoint {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub stage: String,
    #[serde(default)]
    pub index: u64,
    #[serde(default)]
    pub values: Map<String, Json>,
}

impl SessionRecord {
    /// Reads a session file, refusing one that is not a session or comes from a newer format.
    /// `status` is as recorded; see [`SessionRecord::effective_status`].
    pub fn read(path: &Path) -> Result<SessionRecord> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut s = SessionRecord::parse(&text).with_context(|| format!("reading session {}", path.display()))?;
        s.path = Some(path.to_path_buf());
        Ok(s)
    }

    pub fn parse(text: &str) -> Result<SessionRecord> {
        let doc: Json = serde_json::from_str(text).context("not JSON: not an rpt-flow session file")?;
        if !doc.get("stages").is_some_and(Json::is_object) {
            bail!("no `stages` object: not an rpt-flow session file");
        }
        let format = doc.get("format").map(|f| f.as_u64().unwrap_or(u64::MAX)).unwrap_or(1);
        if format > u64::from(FORMAT) {
            bail!("session format {format} is newer than this rpt-flow reads (up to {FORMAT}); use a newer rpt-flow");
        }
        let mut s: SessionRecord = serde_json::from_value(doc)?;
        if s.format == 1 {
            for st in &mut s.instances {
                st.roles = format_1_roles(&st.kind).to_vec();
            }
        }
        Ok(s)
    }

    /// The status a reader should show: `running` becomes `interrupted` when the recorded
    /// process is gone from this host (killed: it never wrote its final status).
    pub fn effective_status(&self) -> RunStatus {
        if self.status != RunStatus::Running || self.host.is_empty() || self.host != host_name() {
            return self.status;
        }
        match self.pid {
            Some(pid) if !Path::new(&format!("/proc/{pid}")).exists() => RunStatus::Interrupted,
            _ => self.status,
        }
    }

    pub fn stage(&self, name: &str) -> Option<&StageRecord> {
        self.instances.iter().find(|s| s.name == name)
    }

    pub fn stage_mut(&mut self, name: &str) -> Option<&mut StageRecord> {
        self.instances.iter_mut().find(|s| s.name == name)
    }

    /// Writes the record to `path` atomically: a temporary file beside it, synced, renamed over.
    /// A failure (a full disk) removes the temporary file and leaves the old file as it was.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)? + "\n";
        crate::atomic_file::write(path, text.as_bytes())
            .with_context(|| format!("writing the session file {}", path.display()))
    }
}

/// Format 1 recorded no roles: these are the roles of the kinds that existed then (frozen: new
/// kinds declare theirs, and their sessions record them).
fn format_1_roles(kind: &str) -> &'static [Role] {
    match kind {
        "load" => &[Role::Source],
        "prune" => &[Role::Prune],
        "finetune" => &[Role::Train],
        "eval-ppl" => &[Role::Perplexity],
        "generate" => &[Role::Generation],
        "hook-residuals" => &[Role::Residuals],
        "perturb" => &[Role::Perturbation],
        _ => &[],
    }
}

/// This machine's name (Linux), or "" where unknown.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Every session file under `dir` (any depth: `DATE/<name>.json`) of a run of the pipeline `name`
/// from a file with the same file name as `file`, sorted by path. Files that are not sessions
/// (a report's JSON, a damaged file, a newer format) are passed over.
pub fn recorded_sessions(dir: &Path, name: &str, file: &Path) -> Vec<SessionRecord> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue }; // no sessions yet: nothing recorded
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Ok(s) = SessionRecord::read(&p) else { continue };
            if s.pipeline == name && Path::new(&s.file).file_name() == file.file_name() {
                found.push(s);
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// Metrics are an object; anything else (never written by rpt-flow) reads as none.
fn object_or_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Map<String, Json>, D::Error> {
    Ok(match Json::deserialize(d)? {
        Json::Object(m) => m,
        _ => Map::new(),
    })
}

/// `stages` is a JSON object keyed by instance name, in execution order.
mod stages_in_order {
    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};

    use super::StageRecord;

    pub fn serialize<S: Serializer>(stages: &[StageRecord], s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(stages.len()))?;
        for st in stages {
            m.serialize_entry(&st.name, st)?;
        }
        m.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<StageRecord>, D::Error> {
        struct Stages;
        impl<'de> Visitor<'de> for Stages {
            type Value = Vec<StageRecord>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of stages keyed by instance name")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((name, mut st)) = map.next_entry::<String, StageRecord>()? {
                    st.name = name;
                    out.push(st);
                }
                Ok(out)
            }
        }
        d.deserialize_map(Stages)
    }
}

/// `inputs` is a JSON object slot → instance name, in the pipeline's order.
mod pairs_in_order {
    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(pairs: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(pairs.len()))?;
        for (k, v) in pairs {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
        struct Pairs;
        impl<'de> Visitor<'de> for Pairs {
            type Value = Vec<(String, String)>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of input slots")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(pair) = map.next_entry::<String, String>()? {
                    out.push(pair);
                }
                Ok(out)
            }
        }
        d.deserialize_map(Pairs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = r#"{
      "pipeline": "p", "description": "d", "file": "pipelines/p.toml", "profiles": ["tiny"],
      "overrides": [], "seed": 0, "device": "cpu", "cache": "cache", "rpt_flow_version": "0.1.0",
      "started": "2026-11-26T08:00:00Z", "finished": null, "status": "complete",
      "stages": {
        "z-first": { "kind": "load", "key": "ab", "status": "done", "cached": false, "seconds": 1.5,
                     "params": {"model": "builtin:tiny-bitnet"}, "inputs": {}, "metrics": {"layers": 4} },
        "a-second": { "kind": "eval-ppl", "key": "cd", "status": "failed", "cached": false,
                      "seconds": 0.1, "params": {}, "inputs": {"input": "z-first", "extra": "z-first"},
                      "metrics": {}, "error": "boom",
                      "sweep": {"name": "s", "stage": "t", "index": 2, "values": {"x": 0.5}} }
      },
      "tables": [{"title": "t"}],
      "a_future_field": {"kept": true}
    }"#;

    #[test]
    fn a_format_1_file_reads_in_order_and_rewrites_without_loss() {
        let s = SessionRecord::parse(V1).unwrap();
        assert_eq!(s.format, 1);
        assert_eq!(s.status, RunStatus::Complete);
        let names: Vec<&str> = s.instances.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["z-first", "a-second"], "execution order, not alphabetical");
        let b = s.stage("a-second").unwrap();
        assert_eq!(b.status, StageStatus::Failed);
        assert_eq!(b.inputs, [("input".to_string(), "z-first".to_string()), ("extra".into(), "z-first".into())]);
        assert_eq!(b.sweep.as_ref().unwrap().index, 2);
        assert_eq!(b.error.as_deref(), Some("boom"));
        assert_eq!(s.stage("z-first").unwrap().metrics["layers"], 4);
        assert_eq!(s.stage("z-first").unwrap().roles, [Role::Source], "format 1: the roles its kinds had");
        assert_eq!(s.stage("a-second").unwrap().roles, [Role::Perplexity]);
        // Rewriting keeps every field, including ones this version does not know (and adds the
        // roles format 1 lacked).
        let mut again: Json = serde_json::to_value(&s).unwrap();
        for st in again["stages"].as_object_mut().unwrap().values_mut() {
            assert!(st.as_object_mut().unwrap().remove("roles").is_some());
        }
        let before: Json = serde_json::from_str(V1).unwrap();
        for (k, v) in before.as_object().unwrap() {
            assert_eq!(&again[k], v, "field {k}");
        }
    }

    #[test]
    fn newer_formats_and_non_sessions_are_refused_clearly() {
        let newer = V1.replacen("\"pipeline\"", "\"format\": 99, \"pipeline\"", 1);
        let e = format!("{:#}", SessionRecord::parse(&newer).unwrap_err());
        assert!(e.contains("format 99 is newer"), "{e}");
        let e = format!("{:#}", SessionRecord::parse("{\"rows\": []}").unwrap_err());
        assert!(e.contains("not an rpt-flow session file"), "{e}");
    }

    #[test]
    fn unknown_statuses_read_as_unknown() {
        let odd = V1.replace("\"status\": \"complete\"", "\"status\": \"paused\"").replace("\"done\"", "\"queued\"");
        let s = SessionRecord::parse(&odd).unwrap();
        assert_eq!(s.status, RunStatus::Unknown);
        assert_eq!(s.instances[0].status, StageStatus::Unknown);
    }

    #[test]
    fn running_with_a_dead_pid_on_this_host_is_interrupted() {
        let mut s = SessionRecord::parse(V1).unwrap();
        s.status = RunStatus::Running;
        assert_eq!(s.effective_status(), RunStatus::Running, "no host recorded: as written");
        s.host = host_name();
        s.pid = Some(std::process::id());
        assert_eq!(s.effective_status(), RunStatus::Running, "alive");
        s.pid = Some(u32::MAX - 7);
        if !host_name().is_empty() {
            assert_eq!(s.effective_status(), RunStatus::Interrupted);
        }
        s.host = "elsewhere".into();
        assert_eq!(s.effective_status(), RunStatus::Running, "another host's process cannot be checked");
    }
}
