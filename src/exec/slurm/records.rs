//! Which Slurm job computes a key: `<cache>/jobs/<key>/job.json`, written before the orchestrator
//! moves on, beside the jobs' logs (`slurm-<id>.log`). A re-run after the orchestrator was killed
//! reads it to re-attach to a job still queued or running instead of submitting a second one.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::cache::Key;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobRecord {
    pub job_id: String,
    pub log: PathBuf,
    pub pipeline: String,
    pub instance: String,
    pub submitted: String,
    /// Who submitted it: `host:pid`.
    pub by: String,
}

/// The folder of a key's job record and logs.
pub fn dir(cache_root: &Path, key: &Key) -> PathBuf {
    cache_root.join("jobs").join(key.to_hex())
}

/// The log path sbatch is given (`%j` becomes the job id).
pub fn log_pattern(cache_root: &Path, key: &Key) -> PathBuf {
    dir(cache_root, key).join("slurm-%j.log")
}

pub fn read(cache_root: &Path, key: &Key) -> Option<JobRecord> {
    let text = std::fs::read_to_string(dir(cache_root, key).join("job.json")).ok()?;
    // A damaged record only costs a resubmission (the cache, not the record, says what is done).
    serde_json::from_str(&text).ok()
}

pub fn write(cache_root: &Path, key: &Key, record: &JobRecord) -> Result<()> {
    let path = dir(cache_root, key).join("job.json");
    let text = serde_json::to_string_pretty(record)? + "\n";
    crate::atomic_file::write(&path, text.as_bytes())
        .with_context(|| format!("recording the job in {}", path.display()))
}
