//! The local executor: runs a plan's instances in order, reusing cached entries, computing the
//! rest once (per-key locks), and recording everything in the session file.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result};
use serde_json::{json, Value as Json};

use super::session::Session;
use super::{CancelFlag, Cancelled, InputArtifact, Progress, Registry, StageContext};
use crate::cache::{Cache, EntryInfo};
use crate::plan::Plan;

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
    let mut session = Session::new(opts.session_path.clone(), plan, &opts.device, cache.root());
    session.save()?;
    let mut outcome = RunOutcome { session_path: opts.session_path.clone(), ..Default::default() };
    let mut unavailable: HashSet<usize> = HashSet::new();
    let mut metrics: Vec<Json> = vec![Json::Null; p.instances.len()];

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
            s["status"] = json!("skipped");
            s["error"] = json!(why);
            outcome.skipped.push(inst.name.clone());
            unavailable.insert(i);
            session.save()?;
            continue;
        }
        let started = Instant::now();
        let result = run_one(plan, i, registry, cache, opts, &progress, &metrics, &label);
        progress.end_stage();
        let s = session.stage_mut(&inst.name);
        match result {
            Ok(Done::Cached(m)) => {
                progress.line(&format!("{label}: cached {}", plan.keys[i].short()));
                s["status"] = json!("cached");
                s["cached"] = json!(true);
                s["seconds"] = json!(0.0);
                s["metrics"] = m.clone();
                metrics[i] = m;
                outcome.cached += 1;
            }
            Ok(Done::Computed(m, secs)) => {
                progress.line(&format!("{label}: done in {secs:.1}s"));
                s["status"] = json!("done");
                s["seconds"] = json!(secs);
                s["metrics"] = m.clone();
                metrics[i] = m;
                outcome.computed += 1;
            }
            Err(e) if e.is::<Cancelled>() => {
                progress.line(&format!(
                    "{label}: interrupted after {:.1}s; partial state kept, run again to continue",
                    started.elapsed().as_secs_f64()
                ));
                s["status"] = json!("interrupted");
                outcome.interrupted = true;
                unavailable.insert(i);
            }
            Err(e) => {
                let msg = format!("{e:#}");
                progress.line(&format!("{label}: FAILED: {msg}"));
                s["status"] = json!("failed");
                s["error"] = json!(msg);
                s["seconds"] = json!(started.elapsed().as_secs_f64());
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
        "interrupted"
    } else if !outcome.failed.is_empty() {
        "failed"
    } else {
        "complete"
    };
    session.set_status(status);
    session.save()?;
    Ok(outcome)
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    plan: &Plan,
    i: usize,
    registry: &Registry,
    cache: &Cache,
    opts: &RunOptions,
    progress: &Progress,
    metrics: &[Json],
    label: &str,
) -> Result<Done> {
    let p = &plan.pipeline;
    let inst = &p.instances[i];
    let key = plan.keys[i];
    if let Some(m) = cached_metrics(cache, &key, &p.name)? {
        return Ok(Done::Cached(m));
    }
    // One process computes a key; others wait here and then find the entry.
    let _lock = match cache.try_lock(&key)? {
        Some(l) => l,
        None => {
            progress.line(&format!("{label}: another rpt-flow process is computing it; waiting"));
            cache.lock(&key)?
        }
    };
    if let Some(m) = cached_metrics(cache, &key, &p.name)? {
        return Ok(Done::Cached(m));
    }

    let stage = registry.get(&inst.kind).with_context(|| format!("unknown stage kind `{}`", inst.kind))?;
    stage.check(&inst.params).map_err(|e| anyhow::anyhow!("stage `{}`: {e}", inst.name))?;
    let mut input_locks = Vec::new();
    let mut inputs = Vec::new();
    for r in &inst.inputs {
        let k = plan.keys[r.target];
        input_locks.push(cache.lock_shared(&k)?);
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
    let seconds = started.elapsed().as_secs_f64();
    let manifest = pending.commit(EntryInfo {
        kind: inst.kind.clone(),
        version: stage.schema().version,
        key_material: plan.material[i].clone(),
        metrics: m,
        seconds,
        pipeline: p.name.clone(),
        instance: inst.name.clone(),
    })?;
    partial.remove()?;
    cache.touch(&key, &p.name)?;
    Ok(Done::Computed(manifest.metrics, seconds))
}

fn cached_metrics(cache: &Cache, key: &crate::cache::Key, pipeline: &str) -> Result<Option<Json>> {
    match cache.manifest(key)? {
        Some(m) => {
            cache.touch(key, pipeline)?;
            Ok(Some(m.metrics))
        }
        None => Ok(None),
    }
}
