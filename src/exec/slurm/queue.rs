//! Talking to Slurm through its commands: `sbatch` to submit, `squeue` to read states (no
//! accounting is assumed, so no `sacct`), `scancel` by job id. Nothing here knows pipelines.

use std::collections::HashMap;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// What the queue says of one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Waiting, with Slurm's reason (`Dependency`, `Priority`, `DependencyNeverSatisfied`…).
    Pending(String),
    /// Running, or finishing (COMPLETING, CONFIGURING…): its entry may not be committed yet.
    Active(String),
    Completed,
    /// Ended without success: the state (FAILED, TIMEOUT, CANCELLED…) and its reason.
    Ended {
        state: String,
        reason: String,
    },
    /// Not known to the controller (purged after MinJobAge, or never existed).
    Gone,
}

impl JobState {
    fn parse(state: &str, reason: &str) -> JobState {
        match state {
            "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESV_DEL_HOLD" => {
                JobState::Pending(reason.into())
            }
            "COMPLETED" => JobState::Completed,
            "CANCELLED" | "FAILED" | "TIMEOUT" | "PREEMPTED" | "NODE_FAIL" | "REVOKED" | "SPECIAL_EXIT"
            | "BOOT_FAIL" | "DEADLINE" | "OUT_OF_MEMORY" => {
                JobState::Ended { state: state.into(), reason: reason.into() }
            }
            other => JobState::Active(other.into()),
        }
    }
    pub fn is_waiting_or_running(&self) -> bool {
        matches!(self, JobState::Pending(_) | JobState::Active(_))
    }
    /// Slurm gave up on it because an input's job failed.
    pub fn never_satisfied(&self) -> bool {
        match self {
            JobState::Pending(r) => r == "DependencyNeverSatisfied",
            JobState::Ended { state, reason } => state == "CANCELLED" && reason == "DependencyNeverSatisfied",
            _ => false,
        }
    }
}

/// Fails with what to do when the controller does not answer (before anything is submitted).
pub fn check_reachable() -> Result<()> {
    let out = Command::new("sinfo")
        .args(["--noheader", "--format=%P"])
        .output()
        .context("Slurm does not answer: `sinfo` could not run; is Slurm's client installed and on PATH?")?;
    if !out.status.success() {
        bail!(
            "Slurm does not answer (`sinfo`: {}); is slurmctld up, and SLURM_CONF right?",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Submits `sbatch --parsable ARGS` and returns the job id.
pub fn submit(args: &[String]) -> Result<String> {
    let out = Command::new("sbatch")
        .arg("--parsable")
        .args(args)
        .output()
        .context("running sbatch (is Slurm's client installed and on PATH?)")?;
    if !out.status.success() {
        bail!("sbatch failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    // `--parsable` prints `id` or `id;cluster`.
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().split(';').next().unwrap_or_default().to_string();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        bail!("sbatch printed `{}`, not a job id", text.trim());
    }
    Ok(id)
}

/// The states of these jobs; ids the controller no longer knows are `Gone`.
pub fn states(ids: &[String]) -> Result<HashMap<String, JobState>> {
    let mut states: HashMap<String, JobState> = ids.iter().map(|id| (id.clone(), JobState::Gone)).collect();
    if ids.is_empty() {
        return Ok(states);
    }
    let out = Command::new("squeue")
        .args(["--noheader", "--states=all", "--format=%i|%T|%r", "--jobs"])
        .arg(ids.join(","))
        .output()
        .context("running squeue")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // squeue fails when none of the ids is known any more.
        if stderr.contains("Invalid job id") {
            return Ok(states);
        }
        bail!("squeue failed: {}", stderr.trim());
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut f = line.trim().split('|');
        let (Some(id), Some(state), reason) = (f.next(), f.next(), f.next().unwrap_or("")) else { continue };
        if let Some(s) = states.get_mut(id) {
            *s = JobState::parse(state, reason);
        }
    }
    Ok(states)
}

/// Cancels these jobs by id (never by name: another run's jobs may share a name).
pub fn cancel(ids: &[String]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let out = Command::new("scancel").args(ids).output().context("running scancel")?;
    if !out.status.success() {
        bail!("scancel failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_states_are_read_as_slurm_means_them() {
        assert_eq!(JobState::parse("PENDING", "Dependency"), JobState::Pending("Dependency".into()));
        assert!(JobState::parse("COMPLETING", "None").is_waiting_or_running());
        assert_eq!(JobState::parse("COMPLETED", "None"), JobState::Completed);
        let killed = JobState::parse("CANCELLED", "DependencyNeverSatisfied");
        assert!(killed.never_satisfied() && !killed.is_waiting_or_running());
        assert!(JobState::parse("PENDING", "DependencyNeverSatisfied").never_satisfied());
        assert!(!JobState::parse("CANCELLED", "None").never_satisfied());
        assert!(matches!(JobState::parse("TIMEOUT", "TimeLimit"), JobState::Ended { .. }));
    }
}
