//! The local executor: runs a plan's instances in order, reusing cached entries, computing the
//! rest once (per-key locks), and recording everything in the session file.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use anyhow::{Context as _, Result};
use serde_json::{json, Value as Json};

use super::session::Session;
use super::{CancelFlag, Cancelled, InputArtifact, Progress, Registry, StageContext};
use crate::cache::{Cache, EntryInfo, EntryState};
use crate::plan::Plan;
use crate::session::{RunStatus, SessionRecord, StageStatus};

pub struct RunOptions {
    pub keep_going: bool,
    pub quiet: bool,
    /// `cpu`, `cuda`, `cuda:N`, or a list `cuda:0,cuda:1`: then one instance runs per device.
    pub device: String,
    pub session_path: PathBuf,
    pub cancel: CancelFlag,
    /// Instances run at once when independent (1: one after another); with a device list, one
    /// per device.
    pub jobs: usize,
}

#[derive(Debug, Default)]
pub struct RunOutcome {
    pub computed: usize,
    pub cached: usize,
    /// (instance, error) for every failed instance.
    pub failed: Vec<(String, String)>,
    pub skipped: Vec<String>,
    pub interrupted: bool,
    /// Cluster jobs left running when the orchestrator detached (SIGHUP, SIGTERM).
    pub detached: Vec<String>,
    pub session_path: PathBuf,
    /// The run's own session record as it last saved it: what the command reports from, since
    /// another run of the same pipeline may have rewritten the file since.
    pub record: Option<SessionRecord>,
}

impl RunOutcome {
    pub fn ok(&self) -> bool {
        self.failed.is_empty() && !self.interrupted
    }
    /// What the session says of the run once it ended.
    pub fn status(&self) -> RunStatus {
        if self.interrupted {
            RunStatus::Interrupted
        } else if !self.failed.is_empty() {
            RunStatus::Failed
        } else {
            RunStatus::Complete
        }
    }
}

enum Done {
    Cached(Json),
    Computed(Json, f64),
}

/// Where an instance is in this run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    /// Cached or computed: its consumers may start.
    Ready,
    /// Failed, skipped or interrupted: its consumers are skipped.
    Unavailable,
}

/// What a worker sends back: the instance, its label, the outcome, when it started and the
/// process's peak memory when it is the only one running (per-stage peaks need that).
struct Finished {
    i: usize,
    /// The device it ran on, when the run has several.
    device: Option<String>,
    label: String,
    result: Result<Done>,
    started: Instant,
    peak_rss_mb: Option<f64>,
}

/// Runs the plan: up to `opts.jobs` instances at once, each when its inputs are ready, in plan
/// order otherwise (so `jobs = 1` is the sequential run). The session file is written by this
/// thread alone, after every instance.
pub fn run(plan: &Plan, registry: &Registry, cache: &Cache, opts: &RunOptions) -> Result<RunOutcome> {
    let p = &plan.pipeline;
    let total = plan.order.len();
    let devices: Vec<&str> = opts.device.split(',').collect();
    let several = devices.len() > 1;
    // One instance per device; a kind that needs the machine to itself gets its device alone.
    let jobs = if several { devices.len() } else { opts.jobs.max(1) };
    // Where each of the `jobs` running places computes: its own device, or all on the one.
    let places: Vec<&str> = if several { devices.clone() } else { vec![devices[0]; jobs] };
    let mut free: Vec<bool> = vec![true; places.len()];
    let mut held: Vec<Option<usize>> = vec![None; p.instances.len()];
    let progress = Progress::new(total, opts.quiet);
    let mut session = Session::new(opts.session_path.clone(), plan, registry, &opts.device, cache.root());
    session.save()?;
    let mut outcome = RunOutcome { session_path: opts.session_path.clone(), ..Default::default() };
    let mut state = vec![State::Waiting; p.instances.len()];
    let mut metrics: Vec<Json> = vec![Json::Null; p.instances.len()];
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); p.instances.len()];
    for (j, inst) in p.instances.iter().enumerate() {
        inst.inputs.iter().for_each(|r| consumers[r.target].push(j));
    }
    let verified = Verified::default();

    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = mpsc::channel::<Finished>();
        let mut running = 0usize;
        // An instance of a kind that runs alone is running: start nothing beside it.
        let mut alone_running = false;
        let mut stopping = false;
        loop {
            for (pos, &i) in plan.order.iter().enumerate() {
                if stopping || running >= jobs || alone_running {
                    break;
                }
                if state[i] != State::Waiting {
                    continue;
                }
                if opts.cancel.is_cancelled() {
                    outcome.interrupted = true;
                    stopping = true;
                    break;
                }
                let inst = &p.instances[i];
                let label = format!("[{}/{}] {} ({})", pos + 1, total, inst.name, inst.kind);
                if let Some(bad) = inst.inputs.iter().find(|r| state[r.target] == State::Unavailable) {
                    let why = format!("not run: input `{}` failed", p.instances[bad.target].name);
                    progress.line(&format!("{label}: {why}"));
                    let s = session.stage_mut(&inst.name);
                    s.status = StageStatus::Skipped;
                    s.error = Some(why);
                    outcome.skipped.push(inst.name.clone());
                    state[i] = State::Unavailable;
                    session.save()?;
                    continue;
                }
                if inst.inputs.iter().any(|r| state[r.target] != State::Ready) {
                    continue; // an input is still running (or waiting)
                }
                let needs_machine = !several && registry.get(&inst.kind).is_some_and(|s| s.runs_alone());
                if needs_machine && running > 0 {
                    break; // it goes next, once what runs now has finished
                }
                alone_running = needs_machine;
                let d = free.iter().position(|&f| f).expect("a place is free while fewer than `jobs` run");
                free[d] = false;
                held[i] = Some(d);
                let device = places[d];
                let label = if several { format!("{label} on {device}") } else { label };
                // An entry a stage is about to read has its bytes re-hashed first; one only
                // reported as cached needs its manifest checked.
                let read_next =
                    consumers[i].iter().any(|&j| !matches!(cache.inspect(&plan.keys[j]), EntryState::Intact(_)));
                let input_metrics: Vec<(usize, Json)> =
                    inst.inputs.iter().map(|r| (r.target, metrics[r.target].clone())).collect();
                state[i] = State::Running;
                running += 1;
                let (tx, progress, verified) = (tx.clone(), &progress, &verified);
                scope.spawn(move || {
                    let started = Instant::now();
                    // The process's peak is the stage's only when nothing runs beside it.
                    let alone = jobs == 1;
                    if alone {
                        super::memory::reset_peak();
                    }
                    let run = RunOne { plan, i, registry, cache, opts, device, progress, input_metrics, label: &label };
                    // Alone (one job, or a kind that runs alone), the stage runs on a pool worker,
                    // so that the model's parallel ops do not hand every op to another thread
                    // (`threads.rs`); beside others it keeps this thread (a worker waiting in an
                    // op could take up a whole other stage).
                    let stage = || run.run(read_next, verified);
                    let stage = || if alone || needs_machine { super::threads::on_pool_worker(stage) } else { stage() };
                    // A panicking stage fails like an erroring one (and the loop still hears back).
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(stage))
                        .unwrap_or_else(|panic| Err(anyhow::anyhow!("the stage panicked: {}", panic_text(&*panic))));
                    let peak_rss_mb = if alone { super::memory::peak_rss_mb() } else { None };
                    let device = several.then(|| device.to_string());
                    let _ = tx.send(Finished { i, device, label, result, started, peak_rss_mb });
                });
            }
            if running == 0 {
                break;
            }
            let done = rx.recv().context("a stage worker ended without reporting")?;
            running -= 1;
            alone_running = false;
            if let Some(d) = held[done.i].take() {
                free[d] = true;
            }
            record(plan, &progress, &mut session, &mut outcome, &mut state, &mut metrics, done);
            progress.instance_done();
            session.save()?;
            if outcome.interrupted || (!outcome.failed.is_empty() && !opts.keep_going) {
                // Start nothing more; what runs finishes (or sees the cancellation) first.
                stopping = true;
            }
        }
        Ok(())
    })?;
    progress.finish();
    session.set_status(outcome.status());
    session.save()?;
    outcome.record = Some(session.record);
    Ok(outcome)
}

/// What `run --only` did with its instance.
pub enum OnlyOutcome {
    Cached,
    Computed { seconds: f64 },
}

/// Runs one instance whose inputs are all in the cache, as a cluster job does: reuses its entry
/// or computes it (under the key's lock), and writes no session file.
pub fn run_only(plan: &Plan, i: usize, registry: &Registry, cache: &Cache, opts: &RunOptions) -> Result<OnlyOutcome> {
    let p = &plan.pipeline;
    let inst = &p.instances[i];
    let mut input_metrics = Vec::new();
    for r in &inst.inputs {
        let key = plan.keys[r.target];
        match cache.inspect(&key) {
            EntryState::Intact(m) => input_metrics.push((r.target, m.metrics)),
            state => anyhow::bail!(
                "input `{}` (entry {}) is {} in the cache {}: --only runs one instance whose inputs are computed; run without --only to compute them",
                p.instances[r.target].name,
                key.short(),
                if matches!(state, EntryState::Missing) { "not" } else { "damaged" },
                cache.root().display()
            ),
        }
    }
    let progress = Progress::new(1, opts.quiet);
    let label = format!("{} ({})", inst.name, inst.kind);
    let run = RunOne {
        plan,
        i,
        registry,
        cache,
        opts,
        device: &opts.device,
        progress: &progress,
        input_metrics,
        label: &label,
    };
    // One stage, alone: on a pool worker (`threads.rs`).
    let done = super::threads::on_pool_worker(|| run.run(false, &Verified::default()));
    progress.finish();
    match done? {
        Done::Cached(_) => Ok(OnlyOutcome::Cached),
        Done::Computed(_, seconds) => Ok(OnlyOutcome::Computed { seconds }),
    }
}

/// The message of a panic payload (a `&str` or `String`, as `panic!` makes them).
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Writes a finished instance into the session, the outcome and the run's state.
fn record(
    plan: &Plan,
    progress: &Progress,
    session: &mut Session,
    outcome: &mut RunOutcome,
    state: &mut [State],
    metrics: &mut [Json],
    done: Finished,
) {
    let Finished { i, device, label, result, started, peak_rss_mb } = done;
    let inst = &plan.pipeline.instances[i];
    let s = session.stage_mut(&inst.name);
    s.device = device;
    match result {
        Ok(Done::Cached(m)) => {
            progress.line(&format!("{label}: cached {}", plan.keys[i].short()));
            tracing::info!(instance = %inst.name, kind = %inst.kind, key = %plan.keys[i].short(), "stage cached");
            s.status = StageStatus::Cached;
            s.cached = true;
            s.seconds = 0.0;
            s.metrics = metrics_object(&m);
            metrics[i] = m;
            state[i] = State::Ready;
            outcome.cached += 1;
        }
        Ok(Done::Computed(m, secs)) => {
            let mem = peak_rss_mb.map(|mb| format!(", peak memory {:.2} GiB", mb / 1024.0)).unwrap_or_default();
            progress.line(&format!("{label}: done in {secs:.1}s{mem}"));
            tracing::info!(
                instance = %inst.name, kind = %inst.kind, key = %plan.keys[i].short(), seconds = secs,
                peak_rss_mb = peak_rss_mb.unwrap_or(f64::NAN), "stage done"
            );
            s.status = StageStatus::Done;
            s.seconds = secs;
            s.peak_rss_mb = peak_rss_mb;
            s.metrics = metrics_object(&m);
            metrics[i] = m;
            state[i] = State::Ready;
            outcome.computed += 1;
        }
        Err(e) if e.is::<Cancelled>() => {
            progress.line(&format!(
                "{label}: interrupted after {:.1}s; partial state kept, run again to continue",
                started.elapsed().as_secs_f64()
            ));
            s.status = StageStatus::Interrupted;
            outcome.interrupted = true;
            state[i] = State::Unavailable;
        }
        Err(e) => {
            let msg = format!("{e:#}");
            progress.line(&format!("{label}: FAILED: {msg}"));
            tracing::info!(
                instance = %inst.name, kind = %inst.kind, key = %plan.keys[i].short(), error = %msg, "stage failed"
            );
            s.status = StageStatus::Failed;
            s.error = Some(msg.clone());
            s.seconds = started.elapsed().as_secs_f64();
            outcome.failed.push((inst.name.clone(), msg));
            state[i] = State::Unavailable;
        }
    }
}

/// How a stage's metrics disagree with its kind's report contract: a top-level metric it does not
/// declare, or a declared `always` metric it did not write. None for kinds declaring no contract.
fn contract_problem(contract: &crate::spec::schema::ReportContract, m: &Json) -> Option<String> {
    if contract.metrics.is_empty() {
        return None;
    }
    let obj = m.as_object()?;
    let undeclared: Vec<&str> = obj.keys().map(String::as_str).filter(|k| contract.metric(k).is_none()).collect();
    let missing: Vec<&str> =
        contract.metrics.iter().filter(|d| d.always && !obj.contains_key(d.name)).map(|d| d.name).collect();
    match (undeclared.is_empty(), missing.is_empty()) {
        (true, true) => None,
        _ => Some(format!(
            "its metrics disagree with its kind's declared report contract (undeclared: {undeclared:?}; missing: {missing:?}); declare them in the kind's REPORT"
        )),
    }
}

/// The metrics as the session stores them: an object (a stage that returned none has `{}`).
fn metrics_object(m: &Json) -> serde_json::Map<String, Json> {
    match m {
        Json::Object(o) => o.clone(),
        Json::Null => serde_json::Map::new(),
        other => [("value".to_string(), other.clone())].into_iter().collect(),
    }
}

/// Keys whose files this process has re-hashed and found intact (each is hashed once).
#[derive(Default)]
struct Verified(Mutex<HashSet<crate::cache::Key>>);

impl Verified {
    fn inspect(&self, cache: &Cache, key: &crate::cache::Key, full: bool) -> EntryState {
        if !full || self.contains(key) {
            return cache.inspect(key);
        }
        let state = cache.inspect_full(key);
        if matches!(state, EntryState::Intact(_)) {
            self.insert(*key);
        }
        state
    }
    fn contains(&self, key: &crate::cache::Key) -> bool {
        self.0.lock().expect("verified set").contains(key)
    }
    fn insert(&self, key: crate::cache::Key) {
        self.0.lock().expect("verified set").insert(key);
    }
}

struct RunOne<'a> {
    plan: &'a Plan,
    i: usize,
    registry: &'a Registry,
    cache: &'a Cache,
    opts: &'a RunOptions,
    /// Where it computes (one of the run's devices).
    device: &'a str,
    progress: &'a Progress,
    /// The metrics of its inputs (by instance index), which the stage sees.
    input_metrics: Vec<(usize, Json)>,
    label: &'a str,
}

impl RunOne<'_> {
    /// Reuses the entry when it is intact (its files re-hashed when `full`), else computes it,
    /// moving a damaged entry to quarantine first.
    fn run(&self, full: bool, verified: &Verified) -> Result<Done> {
        let RunOne { plan, i, cache, progress, label, .. } = *self;
        let key = plan.keys[i];
        if let EntryState::Intact(m) = verified.inspect(cache, &key, full) {
            return Ok(Done::Cached(self.reuse(*m)));
        }
        // One process computes a key; others wait here and then find the entry.
        let _lock = match cache.try_lock(&key)? {
            Some(l) => l,
            None => {
                progress.line(&format!("{label}: another rpt-flow process is computing it; waiting"));
                cache.lock(&key)?
            }
        };
        match verified.inspect(cache, &key, full) {
            EntryState::Intact(m) => return Ok(Done::Cached(self.reuse(*m))),
            EntryState::Damaged(why) => {
                let to = cache.quarantine(&key, &why)?;
                progress.line(&format!(
                    "{label}: warning: the cached entry {} is damaged ({why}); moved to {} and recomputing",
                    key.short(),
                    to.display()
                ));
            }
            EntryState::Missing => {}
        }
        self.compute(verified)
    }

    fn reuse(&self, m: crate::cache::Manifest) -> Json {
        // Last use is advisory (it orders `gc --older-than`): a read-only cache — a shared
        // cluster cache often is one for most users — must still serve its entries.
        if let Err(e) = self.cache.touch(&m.key, &self.plan.pipeline.name) {
            tracing::warn!("could not record the use of entry {}: {e:#}", m.key.short());
        }
        m.metrics
    }

    fn compute(&self, verified: &Verified) -> Result<Done> {
        let RunOne { plan, i, registry, cache, opts, progress, label, .. } = *self;
        let p = &plan.pipeline;
        let inst = &p.instances[i];
        let key = plan.keys[i];
        let stage = registry.get(&inst.kind).with_context(|| format!("unknown stage kind `{}`", inst.kind))?;
        stage.check(&inst.params).map_err(|e| anyhow::anyhow!("stage `{}`: {e}", inst.name))?;
        let mut input_locks = Vec::new();
        let mut inputs = Vec::new();
        for r in &inst.inputs {
            let k = plan.keys[r.target];
            input_locks.push(cache.lock_shared(&k)?);
            // Never compute from bytes that were not verified (normally done when the input was
            // visited; this catches an input damaged since).
            if let EntryState::Damaged(why) = verified.inspect(cache, &k, true) {
                anyhow::bail!(
                "input `{}` (entry {}) is damaged: {why}. Run `rpt-flow cache verify --fix` and run again to recompute it",
                p.instances[r.target].name,
                k.short()
            );
            }
            inputs.push(InputArtifact {
                slot: r.slot.clone(),
                instance: p.instances[r.target].name.clone(),
                kind: p.instances[r.target].kind.clone(),
                key: k,
                dir: cache.entry_dir(&k),
                metrics: self
                    .input_metrics
                    .iter()
                    .find(|(t, _)| *t == r.target)
                    .map(|(_, m)| m.clone())
                    .unwrap_or_default(),
            });
        }
        let pending = cache.begin(&key)?;
        let partial = cache.partial(&key);
        let resumed = partial.exists();
        progress.line(&format!("{label}: {}", if resumed { "resuming from partial state" } else { "running" }));
        tracing::info!(
            instance = %inst.name, kind = %inst.kind, key = %key.short(), device = %self.device, resumed,
            inputs = inst.inputs.len(), "stage start"
        );
        tracing::debug!(instance = %inst.name, params = %Json::Object(inst.params.clone()), "stage parameters");
        let stage_progress = progress.stage(&inst.name);
        let started = Instant::now();
        let base_dir = p.base_dir();
        let ctx = StageContext {
            pipeline: &p.name,
            instance: &inst.name,
            key,
            params: &inst.params,
            inputs,
            out_dir: pending.dir(),
            partial: &partial,
            device: self.device,
            base_dir: &base_dir,
            progress: &stage_progress,
            cancel: &opts.cancel,
        };
        let m = stage.run(&ctx)?;
        let m = if m.is_null() { json!({}) } else { m };
        if let Some(problem) = contract_problem(stage.report(), &m) {
            let msg = format!("stage `{}` ({}): {problem}", inst.name, inst.kind);
            // A kind's declared metrics are what reports read: in tests (debug builds) a drift
            // fails the stage; a user's long run keeps its result and says so.
            if cfg!(debug_assertions) {
                anyhow::bail!("{msg}");
            }
            self.progress.line(&format!("warning: {msg}"));
        }
        let seconds = started.elapsed().as_secs_f64();
        let manifest = pending.commit(EntryInfo {
            kind: inst.kind.clone(),
            version: stage.schema().version,
            key_material: plan.material[i].clone(),
            metrics: m,
            seconds,
            pipeline: p.name.clone(),
            instance: inst.name.clone(),
            inputs: inst.inputs.iter().map(|r| plan.keys[r.target]).collect(),
        })?;
        partial.remove()?;
        // Its files were hashed as they were committed: a stage reading it next need not
        // hash them again (4.8 GB per level at 2B).
        verified.insert(key);
        cache.touch(&key, &p.name)?;
        Ok(Done::Computed(manifest.metrics, seconds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::schema::{MetricDef, ReportContract, Role};

    static CONTRACT: ReportContract = ReportContract {
        roles: &[Role::Perplexity],
        metrics: &[
            MetricDef { name: "ppl", always: true, help: "" },
            MetricDef { name: "extra", always: false, help: "" },
        ],
    };

    #[test]
    fn metrics_must_match_the_declared_contract() {
        assert_eq!(contract_problem(&CONTRACT, &json!({"ppl": 3.0})), None);
        assert_eq!(contract_problem(&CONTRACT, &json!({"ppl": 3.0, "extra": 1})), None);
        let renamed = contract_problem(&CONTRACT, &json!({"perplexity": 3.0})).unwrap();
        assert!(
            renamed.contains("undeclared: [\"perplexity\"]") && renamed.contains("missing: [\"ppl\"]"),
            "{renamed}"
        );
        assert_eq!(contract_problem(&ReportContract::NONE, &json!({"anything": 1})), None, "no contract declared");
    }
}
