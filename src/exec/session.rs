//! The session file: `sessions/YYYY-MM-DD/<pipeline>.json` (UTC date; `<pipeline>.<profile>.json`
//! when profiles are applied, so a `tiny` run never overwrites a full one). Rewritten atomically
//! after every instance, so a crash leaves the last complete state.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde_json::{json, Map, Value as Json};

use crate::plan::Plan;

pub struct Session {
    pub path: PathBuf,
    pub doc: Json,
}

/// Where a run of this plan writes its session today.
/// `DIR/YYYY-MM-DD/<pipeline>[.<profile>…][.cuda][.set-<8 hex>].json`: runs that compute
/// different keys — another device class, or `--set` overrides (named by a hash of them) — get
/// their own file instead of overwriting the plain run's.
pub fn session_path(dir: &Path, plan: &Plan, device: &str) -> PathBuf {
    let today = time::OffsetDateTime::now_utc().date();
    let mut name = plan.pipeline.name.clone();
    for p in &plan.pipeline.options.profiles {
        name.push('.');
        name.push_str(p);
    }
    if device.starts_with("cuda") {
        name.push_str(".cuda");
    }
    let sets = &plan.pipeline.options.sets;
    if !sets.is_empty() {
        let hash = blake3::hash(sets.join("\n").as_bytes()).to_hex();
        name.push_str(&format!(".set-{}", &hash[..8]));
    }
    dir.join(today.to_string()).join(format!("{name}.json"))
}

/// This machine's name (Linux), or "" where unknown.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The status a session file's reader should show: `running` becomes `interrupted` when the
/// recorded process is gone from this host (killed: it never wrote its final status).
pub fn effective_status(doc: &Json) -> String {
    let status = doc["status"].as_str().unwrap_or_default();
    if status != "running" {
        return status.to_string();
    }
    let (host, pid) = (doc["host"].as_str(), doc["pid"].as_u64());
    match (host, pid) {
        (Some(h), Some(pid)) if !h.is_empty() && h == host_name() && !Path::new(&format!("/proc/{pid}")).exists() => {
            "interrupted".to_string()
        }
        _ => status.to_string(),
    }
}

/// Every session file under `dir` (any depth: `DATE/<name>.json`) of a run of the pipeline `name`
/// from a file with the same file name as `file`, sorted by path.
pub fn recorded_sessions(dir: &Path, name: &str, file: &Path) -> Vec<(PathBuf, Json)> {
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
            let Ok(Ok(doc)) = std::fs::read_to_string(&p).map(|t| serde_json::from_str::<Json>(&t)) else {
                continue; // a report's JSON or a damaged file: not a session
            };
            let same_file = doc["file"].as_str().map(|f| Path::new(f).file_name() == file.file_name());
            if doc["pipeline"] == name && same_file == Some(true) {
                found.push((p, doc));
            }
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

impl Session {
    pub fn new(path: PathBuf, plan: &Plan, device: &str, cache_root: &Path) -> Session {
        let p = &plan.pipeline;
        let mut stages = Map::new();
        for &i in &plan.order {
            let inst = &p.instances[i];
            let inputs: Map<String, Json> = inst
                .inputs
                .iter()
                .map(|r| (r.slot.clone(), Json::String(p.instances[r.target].name.clone())))
                .collect();
            let mut s = json!({
                "kind": inst.kind,
                "key": plan.keys[i].to_hex(),
                "status": "pending",
                "cached": false,
                "seconds": 0.0,
                "params": Json::Object(inst.params.clone()),
                "inputs": inputs,
                "metrics": {},
            });
            if let Some(sw) = &inst.sweep {
                s["sweep"] = json!({
                    "name": sw.sweep,
                    "stage": sw.template,
                    "index": sw.index,
                    "values": Json::Object(sw.values.iter().cloned().collect()),
                });
            }
            stages.insert(inst.name.clone(), s);
        }
        let doc = json!({
            "pipeline": p.name,
            "description": p.description,
            "file": p.file.display().to_string(),
            "profiles": p.options.profiles,
            "overrides": p.options.sets,
            "seed": p.seed,
            "device": device,
            "cache": cache_root.display().to_string(),
            "rpt_flow_version": env!("CARGO_PKG_VERSION"),
            "started": now_rfc3339(),
            "finished": Json::Null,
            "status": "running",
            // Who is running it: a reader that finds "running" with this process gone on this
            // host knows the run was killed (`interrupted`).
            "host": host_name(),
            "pid": std::process::id(),
            "stages": stages,
        });
        Session { path, doc }
    }

    pub fn stage_mut(&mut self, name: &str) -> &mut Json {
        &mut self.doc["stages"][name]
    }

    pub fn set_status(&mut self, status: &str) {
        self.doc["status"] = json!(status);
        if status != "running" {
            self.doc["finished"] = json!(now_rfc3339());
        }
    }

    /// Writes the whole document to a temporary file beside the target and renames it over.
    pub fn save(&self) -> Result<()> {
        let dir = self.path.parent().context("session path has a parent")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            self.path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let text = serde_json::to_string_pretty(&self.doc)? + "\n";
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            // A full disk must not leave a half-written temporary file behind.
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("writing the session file {}", self.path.display()));
        }
        Ok(())
    }
}
