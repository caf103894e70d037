//! The session file: `sessions/YYYY-MM-DD/<pipeline>.json` (UTC date; `<pipeline>.<profile>.json`
//! when profiles are applied, so a `tiny` run never overwrites a full one). Rewritten atomically
//! after every instance, so a crash leaves the last complete state. The format is
//! `crate::session`'s.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::{Map, Value as Json};

use super::Registry;
use crate::plan::Plan;
use crate::session::{host_name, now_rfc3339, RunStatus, SessionRecord, StageRecord, SweepPoint, FORMAT};

/// The record of the run in progress and where it is saved.
pub struct Session {
    pub path: PathBuf,
    pub record: SessionRecord,
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

impl Session {
    /// A new record of this plan: every instance `pending`, the run `running`.
    pub fn new(path: PathBuf, plan: &Plan, registry: &Registry, device: &str, cache_root: &Path) -> Session {
        let p = &plan.pipeline;
        let stages = plan
            .order
            .iter()
            .map(|&i| {
                let inst = &p.instances[i];
                StageRecord {
                    name: inst.name.clone(),
                    kind: inst.kind.clone(),
                    roles: registry.roles(&inst.kind),
                    key: plan.keys[i].to_hex(),
                    params: inst.params.clone(),
                    inputs: inst.inputs.iter().map(|r| (r.slot.clone(), p.instances[r.target].name.clone())).collect(),
                    sweep: inst.sweep.as_ref().map(|sw| SweepPoint {
                        name: sw.sweep.clone(),
                        stage: sw.template.clone(),
                        index: sw.index as u64,
                        values: sw.values.iter().cloned().collect(),
                    }),
                    ..StageRecord::default()
                }
            })
            .collect();
        let record = SessionRecord {
            path: Some(path.clone()),
            format: FORMAT,
            pipeline: p.name.clone(),
            description: p.description.clone(),
            file: p.file.display().to_string(),
            profiles: p.options.profiles.clone(),
            overrides: p.options.sets.clone(),
            seed: Json::from(p.seed),
            device: device.to_string(),
            cache: cache_root.display().to_string(),
            rpt_flow_version: env!("CARGO_PKG_VERSION").to_string(),
            started: now_rfc3339(),
            finished: None,
            status: RunStatus::Running,
            host: host_name(),
            pid: Some(std::process::id()),
            instances: stages,
            tables: None,
            extra: Map::new(),
        };
        Session { path, record }
    }

    pub fn stage_mut(&mut self, name: &str) -> &mut StageRecord {
        self.record.stage_mut(name).expect("every planned instance has a stage record")
    }

    pub fn set_status(&mut self, status: RunStatus) {
        self.record.status = status;
        if status != RunStatus::Running {
            self.record.finished = Some(now_rfc3339());
        }
    }

    /// Writes the whole record atomically (see [`SessionRecord::write`]).
    pub fn save(&self) -> Result<()> {
        self.record.write(&self.path)
    }
}
