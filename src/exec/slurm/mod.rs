//! `--executor slurm`: every instance that is not cached becomes one `sbatch` job that runs
//! `rpt-flow run P --only NAME --expect-key KEY` against the shared cache, after its inputs' jobs
//! (`--dependency=afterok`, `--kill-on-invalid-dep=yes`). The cache is the truth: a job is done
//! when its entry is committed. This process submits, watches the queue and writes the same
//! session file a local run writes; killed, it is re-run and re-attaches to the jobs it had
//! submitted (recorded in the cache, see [`records`]).

mod queue;
mod records;
pub mod sbatch;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde_json::Value as Json;

use super::session::Session;
use super::{Progress, Registry, RunOptions, RunOutcome};
use crate::cache::{Cache, EntryState, Key, Manifest};
use crate::plan::Plan;
use crate::session::{JobRef, RunStatus, StageStatus};
use crate::spec::executor::SlurmSettings;
use queue::JobState;

/// How jobs are submitted.
pub struct SlurmOptions {
    /// `[executor.slurm]` from the pipeline, the config file and the command line, merged.
    pub settings: SlurmSettings,
    /// What every job runs before `--only NAME --expect-key KEY`: the program, the cache, `run`,
    /// the pipeline file and its profiles, overrides and device (absolute paths).
    pub command: Vec<String>,
    /// The cache root as an absolute path: job records and logs (`<root>/jobs/`) are named by it.
    pub cache_root: std::path::PathBuf,
    pub poll: Duration,
    /// Set when this process is told to go away (SIGHUP, SIGTERM): it stops watching and leaves
    /// the jobs in the queue, where the same command re-attaches to them. (Ctrl-C, the `cancel`
    /// flag, cancels them instead.)
    pub detach: &'static std::sync::atomic::AtomicBool,
}

impl SlurmOptions {
    fn detached(&self) -> bool {
        self.detach.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl SlurmOptions {
    fn job_command(&self, instance: &str, key: &Key) -> Vec<String> {
        let mut c = self.command.clone();
        c.extend(["--only".into(), instance.into(), "--expect-key".into(), key.to_hex()]);
        c
    }

    fn sbatch_args(&self, plan: &Plan, i: usize, after: &[String], log: &Path) -> Vec<String> {
        let inst = &plan.pipeline.instances[i];
        let resources = self.settings.for_kind(&inst.kind);
        let command = self.job_command(&inst.name, &plan.keys[i]);
        sbatch::args(&sbatch::JobSpec {
            pipeline: &plan.pipeline.name,
            instance: &inst.name,
            after,
            resources: &resources,
            log,
            command: &command,
        })
    }
}

/// What would be submitted now (`plan --executor slurm`): per instance not cached, a comment line
/// naming it and its `sbatch` line, its inputs' job ids in shell variables. Asks Slurm nothing.
pub fn dry_run(plan: &Plan, cache: &Cache, slurm: &SlurmOptions) -> Vec<(String, String)> {
    let p = &plan.pipeline;
    let total = plan.order.len();
    let mut var: HashMap<usize, String> = HashMap::new();
    let mut lines = Vec::new();
    for (pos, &i) in plan.order.iter().enumerate() {
        if matches!(cache.inspect(&plan.keys[i]), EntryState::Intact(_)) {
            continue;
        }
        let inst = &p.instances[i];
        let after: Vec<String> =
            inst.inputs.iter().filter_map(|r| var.get(&r.target)).map(|v| format!("${v}")).collect();
        let log = records::log_pattern(&slurm.cache_root, &plan.keys[i]);
        let args = slurm.sbatch_args(plan, i, &after, &log);
        let name = format!("J{}", pos + 1);
        let comment = format!("# [{}/{total}] {} ({}) {}", pos + 1, inst.name, inst.kind, plan.keys[i].short());
        let quoted: Vec<String> = args
            .iter()
            // Dependencies name shell variables: keep `$J3` expandable.
            .map(|a| if a.starts_with("--dependency=") { format!("\"{a}\"") } else { sbatch::shell_quote(a) })
            .collect();
        lines.push((comment, format!("{name}=$(sbatch --parsable {})", quoted.join(" "))));
        var.insert(i, name);
    }
    lines
}

/// Where an instance is in this run.
#[derive(Clone, PartialEq)]
enum Slot {
    Waiting,
    /// Cached or computed.
    Ready,
    /// Its job is queued or running.
    Job {
        id: String,
        log: String,
        running: bool,
    },
    /// Failed, skipped or interrupted.
    Unavailable,
}

/// Submits what is not cached, re-attaches to recorded jobs still in the queue, and waits.
pub fn run(
    plan: &Plan,
    registry: &Registry,
    cache: &Cache,
    opts: &RunOptions,
    slurm: &SlurmOptions,
) -> Result<RunOutcome> {
    let total = plan.order.len();
    let progress = Progress::new(total, opts.quiet);
    let session = Session::new(opts.session_path.clone(), plan, registry, &opts.device, cache.root());
    session.save()?;
    let mut w = Watch {
        plan,
        cache,
        progress: &progress,
        session,
        outcome: RunOutcome { session_path: opts.session_path.clone(), ..Default::default() },
        slots: vec![Slot::Waiting; plan.pipeline.instances.len()],
        labels: HashMap::new(),
        stopped_after: None,
        cancelled_by_us: HashSet::new(),
    };
    for (pos, &i) in plan.order.iter().enumerate() {
        let inst = &plan.pipeline.instances[i];
        w.labels.insert(i, format!("[{}/{total}] {} ({})", pos + 1, inst.name, inst.kind));
    }
    let result = w.submit_all(opts, slurm).and_then(|()| w.watch(opts, slurm));
    progress.finish();
    let Watch { mut session, mut outcome, slots, .. } = w;
    if let Err(e) = result {
        // Leave nothing of ours queued behind an orchestrator that gave up.
        let ids: Vec<String> = slots.iter().filter_map(job_id).collect();
        if let Err(c) = queue::cancel(&ids) {
            tracing::warn!("could not cancel jobs {}: {c:#}", ids.join(","));
        }
        session.set_status(RunStatus::Failed);
        session.save()?;
        return Err(e);
    }
    outcome.skipped.sort();
    session.set_status(outcome.status());
    session.save()?;
    outcome.record = Some(session.record);
    Ok(outcome)
}

fn job_id(slot: &Slot) -> Option<String> {
    match slot {
        Slot::Job { id, .. } => Some(id.clone()),
        _ => None,
    }
}

struct Watch<'a> {
    plan: &'a Plan,
    cache: &'a Cache,
    progress: &'a Progress,
    session: Session,
    outcome: RunOutcome,
    slots: Vec<Slot>,
    labels: HashMap<usize, String>,
    /// Without --keep-going, the instance whose failure stopped the run: what has not run
    /// stays `pending`, as in a local run.
    stopped_after: Option<String>,
    /// Jobs this run cancelled when it stopped.
    cancelled_by_us: HashSet<String>,
}

impl Watch<'_> {
    /// In plan order: cached entries are ready; a recorded job still queued or running is
    /// adopted; the rest is submitted after its inputs' jobs.
    fn submit_all(&mut self, opts: &RunOptions, slurm: &SlurmOptions) -> Result<()> {
        let (plan, cache) = (self.plan, self.cache);
        let missing: Vec<usize> = plan
            .order
            .iter()
            .copied()
            .filter(|&i| !matches!(cache.inspect(&plan.keys[i]), EntryState::Intact(_)))
            .collect();
        let recorded: HashMap<usize, records::JobRecord> =
            missing.iter().filter_map(|&i| records::read(&slurm.cache_root, &plan.keys[i]).map(|r| (i, r))).collect();
        if !missing.is_empty() {
            // An unreachable controller stops the run before anything is submitted.
            queue::check_reachable()?;
        }
        let ids: Vec<String> = recorded.values().map(|r| r.job_id.clone()).collect();
        let states = queue::states(&ids).context("reading the Slurm queue")?;
        for &i in &plan.order {
            if opts.cancel.is_cancelled() {
                self.outcome.interrupted = true;
                return Ok(());
            }
            let inst = &plan.pipeline.instances[i];
            let key = plan.keys[i];
            if let EntryState::Intact(m) = cache.inspect(&key) {
                self.ready(i, &m, true);
                continue;
            }
            if let Some(bad) = inst.inputs.iter().find(|r| self.slots[r.target] == Slot::Unavailable) {
                let why = format!("not run: input `{}` failed", plan.pipeline.instances[bad.target].name);
                self.skip(i, why);
                continue;
            }
            if self.stopped_after.is_some() {
                self.not_run(i);
                continue;
            }
            if let Some(rec) =
                recorded.get(&i).filter(|r| states.get(&r.job_id).is_some_and(JobState::is_waiting_or_running))
            {
                self.line(i, &format!("re-attached to job {} (submitted {})", rec.job_id, rec.submitted));
                self.start(i, rec.job_id.clone(), rec.log.display().to_string());
                continue;
            }
            let after: Vec<String> = inst.inputs.iter().filter_map(|r| job_id(&self.slots[r.target])).collect();
            let log_pattern = records::log_pattern(&slurm.cache_root, &key);
            let job_dir = records::dir(&slurm.cache_root, &key);
            std::fs::create_dir_all(&job_dir)
                .with_context(|| format!("creating the job folder {}", job_dir.display()))?;
            match queue::submit(&slurm.sbatch_args(plan, i, &after, &log_pattern)) {
                Ok(id) => {
                    let log = log_pattern.display().to_string().replace("%j", &id);
                    let record = records::JobRecord {
                        job_id: id.clone(),
                        log: log.clone().into(),
                        pipeline: plan.pipeline.name.clone(),
                        instance: inst.name.clone(),
                        submitted: crate::session::now_rfc3339(),
                        by: format!("{}:{}", crate::session::host_name(), std::process::id()),
                    };
                    if let Err(e) = records::write(&slurm.cache_root, &key, &record) {
                        tracing::warn!("{e:#}: a re-run after a crash would submit this instance again");
                    }
                    let after_text =
                        if after.is_empty() { String::new() } else { format!(" after {}", after.join(", ")) };
                    self.line(i, &format!("submitted job {id}{after_text}"));
                    self.start(i, id, log);
                }
                Err(e) => {
                    self.fail(i, format!("{e:#}"));
                    if !opts.keep_going {
                        self.stop_after_failure(inst.name.clone());
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads the queue until no job of this run is waiting or running.
    fn watch(&mut self, opts: &RunOptions, slurm: &SlurmOptions) -> Result<()> {
        let plan = self.plan;
        let mut last_warning: Option<Instant> = None;
        loop {
            if !opts.keep_going && self.stopped_after.is_none() {
                if let Some((name, _)) = self.outcome.failed.first() {
                    let name = name.clone();
                    self.stop_after_failure(name);
                }
            }
            let jobs: Vec<(usize, String)> =
                plan.order.iter().filter_map(|&i| job_id(&self.slots[i]).map(|id| (i, id))).collect();
            if jobs.is_empty() {
                return Ok(());
            }
            if slurm.detached() {
                let ids: Vec<String> = jobs.iter().map(|(_, id)| id.clone()).collect();
                self.progress.line(&format!(
                    "detached: jobs {} stay in the queue; run the same command to re-attach",
                    ids.join(", ")
                ));
                self.outcome.interrupted = true;
                self.outcome.detached = ids;
                return Ok(());
            }
            if opts.cancel.is_cancelled() {
                let ids: Vec<String> = jobs.iter().map(|(_, id)| id.clone()).collect();
                self.progress.line(&format!("cancelling jobs {}", ids.join(", ")));
                queue::cancel(&ids)?;
                for (i, _) in jobs {
                    // A job that committed its entry since the last look at the queue (in the
                    // instant of the Ctrl-C) is done: the cache is the truth.
                    match self.cache.inspect(&plan.keys[i]) {
                        EntryState::Intact(m) => self.ready(i, &m, false),
                        _ => self.interrupted(i),
                    }
                }
                return Ok(());
            }
            sleep_unless_told(slurm, &opts.cancel);
            let ids: Vec<String> = jobs.iter().map(|(_, id)| id.clone()).collect();
            let states = match queue::states(&ids) {
                Ok(s) => s,
                Err(e) => {
                    // A controller restart is not a failed run: keep asking, say so each minute.
                    if last_warning.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(60)) {
                        self.progress.line(&format!("warning: {e:#}; still waiting for jobs {}", ids.join(", ")));
                        last_warning = Some(Instant::now());
                    }
                    continue;
                }
            };
            for (i, id) in jobs {
                let state = states.get(&id).cloned().unwrap_or(JobState::Gone);
                self.update(i, &id, state);
            }
        }
    }

    /// Without --keep-going, once an instance failed: cancel the jobs of this run still waiting
    /// (running ones finish), as a local run starts nothing more.
    fn stop_after_failure(&mut self, failed: String) {
        let ids: Vec<String> = self
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::Job { id, running: false, .. } => Some(id.clone()),
                _ => None,
            })
            .collect();
        if let Err(e) = queue::cancel(&ids) {
            tracing::warn!("could not cancel jobs {}: {e:#}", ids.join(","));
        }
        self.cancelled_by_us.extend(ids);
        self.stopped_after = Some(failed);
    }

    fn update(&mut self, i: usize, id: &str, state: JobState) {
        let Slot::Job { log, running, .. } = self.slots[i].clone() else { return };
        let key = self.plan.keys[i];
        match state {
            JobState::Pending(_) if state.never_satisfied() => {
                // A cluster without kill_invalid_depend may leave it pending: cancel it ourselves.
                let _ = queue::cancel(&[id.to_string()]);
                self.skip_after_input(i);
            }
            JobState::Pending(_) => {}
            JobState::Active(_) => {
                if !running {
                    self.line(i, &format!("running (job {id})"));
                    if let Slot::Job { running, .. } = &mut self.slots[i] {
                        *running = true;
                    }
                }
            }
            _ if state.never_satisfied() => self.skip_after_input(i),
            JobState::Ended { .. } if self.cancelled_by_us.contains(id) => self.not_run(i),
            JobState::Completed | JobState::Gone | JobState::Ended { .. } => match self.cache.inspect(&key) {
                // Its commit is what counts, whatever the queue says of the job's end.
                EntryState::Intact(m) => self.ready(i, &m, false),
                _ => {
                    let why = match &state {
                        JobState::Ended { state, reason } => format!("{state} ({reason})"),
                        JobState::Completed => "ended without committing its entry".into(),
                        _ => "is no longer in the queue and left no entry".into(),
                    };
                    let hint = if matches!(&state, JobState::Ended { state, .. } if state == "TIMEOUT") {
                        " — it hit its time limit: raise `time` for this kind in [executor.slurm.kinds]; a fine-tune resumes from its last checkpoint when run again"
                    } else {
                        ""
                    };
                    let detail = last_error_line(Path::new(&log)).map(|l| format!(": {l}")).unwrap_or_default();
                    self.fail(i, format!("job {id} {why}{detail}{hint} (log: {log})"));
                }
            },
        }
    }

    fn line(&self, i: usize, msg: &str) {
        self.progress.line(&format!("{}: {msg}", self.labels[&i]));
    }

    fn start(&mut self, i: usize, id: String, log: String) {
        let name = &self.plan.pipeline.instances[i].name;
        self.session.stage_mut(name).job = Some(JobRef { executor: "slurm".into(), id: id.clone(), log: log.clone() });
        self.slots[i] = Slot::Job { id, log, running: false };
        self.save();
    }

    fn ready(&mut self, i: usize, m: &Manifest, cached: bool) {
        let name = self.plan.pipeline.instances[i].name.clone();
        let s = self.session.stage_mut(&name);
        s.metrics = match &m.metrics {
            Json::Object(o) => o.clone(),
            _ => Default::default(),
        };
        if cached {
            s.status = StageStatus::Cached;
            s.cached = true;
            self.outcome.cached += 1;
            self.line(i, &format!("cached {}", m.key.short()));
        } else {
            s.status = StageStatus::Done;
            s.seconds = m.seconds;
            self.outcome.computed += 1;
            self.line(i, &format!("done in {:.1}s", m.seconds));
        }
        if let Err(e) = self.cache.touch(&m.key, &self.plan.pipeline.name) {
            tracing::warn!("could not record the use of entry {}: {e:#}", m.key.short());
        }
        self.finish(i, Slot::Ready);
    }

    fn fail(&mut self, i: usize, msg: String) {
        let name = self.plan.pipeline.instances[i].name.clone();
        self.line(i, &format!("FAILED: {msg}"));
        let s = self.session.stage_mut(&name);
        s.status = StageStatus::Failed;
        s.error = Some(msg.clone());
        self.outcome.failed.push((name, msg));
        self.finish(i, Slot::Unavailable);
    }

    /// Not run because the run stopped after a failure: `pending`, as a local run leaves it.
    fn not_run(&mut self, i: usize) {
        let failed = self.stopped_after.clone().unwrap_or_default();
        self.line(i, &format!("not run: the run stopped after `{failed}` failed (--keep-going runs the rest)"));
        self.session.stage_mut(&self.plan.pipeline.instances[i].name).job = None;
        self.finish(i, Slot::Unavailable);
    }

    fn skip(&mut self, i: usize, why: String) {
        if self.stopped_after.is_some() {
            return self.not_run(i);
        }
        let name = self.plan.pipeline.instances[i].name.clone();
        self.line(i, &why);
        let s = self.session.stage_mut(&name);
        s.status = StageStatus::Skipped;
        s.error = Some(why);
        self.outcome.skipped.push(name);
        self.finish(i, Slot::Unavailable);
    }

    /// Slurm cancelled it because an input's job failed.
    fn skip_after_input(&mut self, i: usize) {
        let p = &self.plan.pipeline;
        let why = match p.instances[i].inputs.iter().find(|r| self.slots[r.target] == Slot::Unavailable) {
            Some(r) => format!("not run: input `{}` failed", p.instances[r.target].name),
            None => "not run: Slurm cancelled it because an input's job failed".into(),
        };
        self.skip(i, why);
    }

    fn interrupted(&mut self, i: usize) {
        let name = self.plan.pipeline.instances[i].name.clone();
        self.line(i, "cancelled; partial state is kept, run again to continue");
        self.session.stage_mut(&name).status = StageStatus::Interrupted;
        self.outcome.interrupted = true;
        self.finish(i, Slot::Unavailable);
    }

    fn finish(&mut self, i: usize, slot: Slot) {
        self.slots[i] = slot;
        self.progress.instance_done();
        self.save();
    }

    fn save(&self) {
        if let Err(e) = self.session.save() {
            // The jobs go on whatever happens to this file; the next run rewrites it.
            self.progress.line(&format!("warning: {e:#}"));
        }
    }
}

/// Waits one poll interval, or less when Ctrl-C or a detaching signal comes.
fn sleep_unless_told(slurm: &SlurmOptions, cancel: &super::CancelFlag) {
    let start = Instant::now();
    while start.elapsed() < slurm.poll && !cancel.is_cancelled() && !slurm.detached() {
        std::thread::sleep(Duration::from_millis(50).min(slurm.poll));
    }
}

/// The last error a job printed (rpt-flow's `error: …`, or Slurm's own), from the end of its log.
fn last_error_line(log: &Path) -> Option<String> {
    let bytes = std::fs::read(log).ok()?;
    let tail = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(64 * 1024)..]).into_owned();
    let lines: Vec<&str> = tail.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let line = lines.iter().rev().find(|l| l.contains("error:")).or(lines.last())?;
    Some(line.chars().take(500).collect())
}
