//! The local executor: runs a plan's instances in order, reusing cached entries, computing the
//! rest once (per-key locks), and recording everything in the session file.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result};
use serde_json::{json, Value as Json};

use super::session::Session;
use super::{CancelFlag, Cancelled, InputArtifact, Progress, Registry, StageContext};
use crate::cache::{Cache, EntryInfo, EntryState};
use crate::plan::Plan;
use crate::session::{RunStatus, StageStatus};

pub struct RunOptions {
    pub keep_going: bool,
    pub quiet: bool,
    /// `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    pub session_path: PathBuf,
    pub cancel: CancelFlag,
}

#[derive(Debug, Default)]
pub struct RunOutcome {
    pub computed: usize,
    pub cached: usize,
    /// (instance, error) for every failed instance.
    pub failed: Vec<(String, String)>,
    pub skipped: Vec<String>,
    pub interrupted: bool,
    pub session_path: PathBuf,
}

impl RunOutcome {
    pub fn ok(&self) -> bool {
        self.failed.is_empty() && !self.interrupted
    }
}

enum Done {
    Cached(Json),
    Computed(Json, f64),
}

pub fn run(plan: &Plan, registry: &Registry, cache: &Cache, opts: &RunOptions) -> Result<RunOutcome> {
    let p = &plan.pipeline;
    let total = plan.order.len();
    let progress = Progress::new(total, opts.quiet);
    let mut session = Session::new(opts.session_path.clone(), plan, registry, &opts.device, cache.root());
    session.save()?;
    let mut outcome = RunOutcome { session_path: opts.session_path.clone(), ..Default::default() };
    let mut unavailable: HashSet<usize> = HashSet::new();
    let mut metrics: Vec<Json> = vec![Json::Null; p.instances.len()];
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); p.instances.len()];
    for (j, inst) in p.instances.iter().enumerate() {
        inst.inputs.iter().for_each(|r| consumers[r.target].push(j));
    }
    let mut verified = Verified::default();

    for (pos, &i) in plan.order.iter().enumerate() {
        let inst = &p.instances[i];
        let label = format!("[{}/{}] {} ({})", pos + 1, total, inst.name, inst.kind);
        if opts.cancel.is_cancelled() {
            outcome.interrupted = true;
            break;
        }
        if let Some(bad) = inst.inputs.iter().find(|r| unavailable.contains(&r.target)) {
            let why = format!("not run: input `{}` failed", p.instances[bad.target].name);
            progress.line(&format!("{label}: {why}"));
            let s = session.stage_mut(&inst.name);
            s.status = StageStatus::Skipped;
            s.error = Some(why);
            outcome.skipped.push(inst.name.clone());
            unavailable.insert(i);
            session.save()?;
            continue;
        }
        let started = Instant::now();
        super::memory::reset_peak();
        // An entry a stage is about to read has its bytes re-hashed first; one only reported as
        // cached needs its manifest checked.
        let read_next = consumers[i].iter().any(|&j| !matches!(cache.inspect(&plan.keys[j]), EntryState::Intact(_)));
        let run = RunOne { plan, i, registry, cache, opts, progress: &progress, metrics: &metrics, label: &label };
        let result = run.run(read_next, &mut verified);
        progress.end_stage();
        let s = session.stage_mut(&inst.name);
        match result {
            Ok(Done::Cached(m)) => {
                progress.line(&format!("{label}: cached {}", plan.keys[i].short()));
                s.status = StageStatus::Cached;
                s.cached = true;
                s.seconds = 0.0;
                s.metrics = metrics_object(&m);
                metrics[i] = m;
                outcome.cached += 1;
            }
            Ok(Done::Computed(m, secs)) => {
                let peak = super::memory::peak_rss_mb();
                let mem = peak.map(|mb| format!(", peak memory {:.2} GiB", mb / 1024.0)).unwrap_or_default();
                progress.line(&format!("{label}: done in {secs:.1}s{mem}"));
                s.status = StageStatus::Done;
                s.seconds = secs;
                s.peak_rss_mb = peak;
                s.metrics = metrics_object(&m);
                metrics[i] = m;
                outcome.computed += 1;
            }
            Err(e) if e.is::<Cancelled>() => {
                progress.line(&format!(
                    "{label}: interrupted after {:.1}s; partial state kept, run again to continue",
                    started.elapsed().as_secs_f64()
                ));
                s.status = StageStatus::Interrupted;
                outcome.interrupted = true;
                unavailable.insert(i);
            }
            Err(e) => {
                let msg = format!("{e:#}");
                progress.line(&format!("{label}: FAILED: {msg}"));
                s.status = StageStatus::Failed;
                s.error = Some(msg.clone());
                s.seconds = started.elapsed().as_secs_f64();
                outcome.failed.push((inst.name.clone(), msg));
                unavailable.insert(i);
            }
        }
        progress.instance_done();
        session.save()?;
        if outcome.interrupted || (!outcome.failed.is_empty() && !opts.keep_going) {
            break;
        }
    }
    progress.finish();
    let status = if outcome.interrupted {
        RunStatus::Interrupted
    } else if !outcome.failed.is_empty() {
        RunStatus::Failed
    } else {
        RunStatus::Complete
    };
    session.set_status(status);
    session.save()?;
    Ok(outcome)
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
struct Verified(HashSet<crate::cache::Key>);

impl Verified {
    fn inspect(&mut self, cache: &Cache, key: &crate::cache::Key, full: bool) -> EntryState {
        if !full || self.0.contains(key) {
            return cache.inspect(key);
        }
        let state = cache.inspect_full(key);
        if matches!(state, EntryState::Intact(_)) {
            self.0.insert(*key);
        }
        state
    }
}

struct RunOne<'a> {
    plan: &'a Plan,
    i: usize,
    registry: &'a Registry,
    cache: &'a Cache,
    opts: &'a RunOptions,
    progress: &'a Progress,
    metrics: &'a [Json],
    label: &'a str,
}

impl RunOne<'_> {
    /// Reuses the entry when it is intact (its files re-hashed when `full`), else computes it,
    /// moving a damaged entry to quarantine first.
    fn run(&self, full: bool, verified: &mut Verified) -> Result<Done> {
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

    fn compute(&self, verified: &mut Verified) -> Result<Done> {
        let RunOne { plan, i, registry, cache, opts, progress, metrics, label } = *self;
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
                metrics: metrics[r.target].clone(),
            });
        }
        let pending = cache.begin(&key)?;
        let partial = cache.partial(&key);
        let resumed = partial.exists();
        progress.line(&format!("{label}: {}", if resumed { "resuming from partial state" } else { "running" }));
        progress.begin_stage(&inst.name);
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
            device: &opts.device,
            base_dir: &base_dir,
            progress,
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
        verified.0.insert(key);
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
