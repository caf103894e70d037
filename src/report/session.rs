//! Reading session files for reports. The record's types are `crate::session`'s (the one
//! definition the executor writes); this adds what a report asks of them. Unknown fields are
//! kept and metrics stay JSON, so a report reads sessions of stage kinds it does not know yet
//! (their instances still appear in the flat rows).

use std::path::Path;

use anyhow::Result;
use serde_json::Value as Json;

pub use crate::session::{RunStatus, SessionRecord as Session, StageRecord as Instance, StageStatus, SweepPoint};
pub use crate::spec::schema::Role;

impl Session {
    /// Reads a session file for a report: `running` shows as `interrupted` when the run was
    /// killed (see [`Session::effective_status`]).
    pub fn read_for_report(path: &Path) -> Result<Session> {
        let mut s = Session::read(path)?;
        s.status = s.effective_status();
        Ok(s)
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

    /// The instances whose kind declared `role`, with their indices.
    pub fn of_role(&self, role: Role) -> impl Iterator<Item = (usize, &Instance)> + '_ {
        self.instances.iter().enumerate().filter(move |(_, i)| i.has_role(role))
    }
}

impl Instance {
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// True when the stage produced metrics (ran or came from the cache).
    pub fn has_metrics(&self) -> bool {
        !self.metrics.is_empty()
    }

    /// A metric by dotted path (`protocol.seq_len`). The report reads only what its roles
    /// promise (`Role::reads`): reading anything else is a report bug, caught by tests.
    pub fn metric(&self, path: &str) -> Option<&Json> {
        let top = path.split('.').next().unwrap_or_default();
        debug_assert!(
            self.roles.iter().any(|r| r.reads().contains(&top)),
            "the report reads metric `{top}` of `{}` ({}), which none of its roles {:?} promises",
            self.name,
            self.kind,
            self.roles
        );
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
        self.status.as_str().to_string()
    }
}
