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
pub fn session_path(dir: &Path, plan: &Plan) -> PathBuf {
    let today = time::OffsetDateTime::now_utc().date();
    let mut name = plan.pipeline.name.clone();
    for p in &plan.pipeline.options.profiles {
        name.push('.');
        name.push_str(p);
    }
    dir.join(today.to_string()).join(format!("{name}.json"))
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
        {
            let mut f = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
            f.write_all(serde_json::to_string_pretty(&self.doc)?.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path).with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }
}
