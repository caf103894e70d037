//! `rpt-flow run`: execute what is not cached, with Ctrl-C handled cleanly.

use std::path::{Path, PathBuf};

use clap::Args;

use super::slurm_args::{detach_on_hangup, slurm_options, Executor, ExecutorArgs};
use super::{load_plan, open_cache, CliError, CliResult, PipelineArgs};
use crate::exec::{self, session_path, CancelFlag, Cancelled, OnlyOutcome, Registry, RunOptions};
use crate::plan::Plan;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Where session files go.
    #[arg(long, env = "RPT_SESSIONS", default_value = "sessions")]
    pub sessions: PathBuf,
    /// On a failure, keep running the branches that do not depend on it.
    #[arg(long)]
    pub keep_going: bool,
    /// Run up to N independent instances at once (a chain stays in order). Results are the same
    /// as one at a time; per-stage peak memory is recorded only with 1.
    #[arg(long, short = 'j', default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: u16,
    /// Run this one instance, whose inputs must be cached, and write no session (what each
    /// cluster job runs).
    #[arg(long, value_name = "INSTANCE")]
    pub only: Option<String>,
    /// With --only: fail unless the instance's key is this one (the pipeline, its files or
    /// rpt-flow changed since the job was submitted).
    #[arg(long, value_name = "KEY", requires = "only")]
    pub expect_key: Option<String>,
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

pub fn run(args: &RunArgs, registry: &Registry, cache_root: &Path, quiet: bool) -> CliResult {
    let slurm = args.executor.executor == Executor::Slurm;
    let device_list = args.pipeline.device.contains(',');
    if device_list && (slurm || args.only.is_some()) {
        return Err(CliError::Usage(format!(
            "--device {}: a device list is for local runs (one instance per GPU); a Slurm job or --only runs on one, e.g. --device cuda",
            args.pipeline.device
        )));
    }
    if device_list && args.jobs > 1 {
        return Err(CliError::Usage(format!(
            "--device {} runs one instance per device: leave out --jobs",
            args.pipeline.device
        )));
    }
    if slurm {
        if args.only.is_some() {
            return Err(CliError::Usage("--only runs one instance here: it does not go with --executor slurm".into()));
        }
        if args.jobs > 1 {
            return Err(CliError::Usage(
                "--jobs is for the local executor: with --executor slurm every independent job may run at once".into(),
            ));
        }
    } else {
        args.executor.check_local()?;
        // With Slurm the jobs compute (possibly with another build); here they must be runnable.
        super::check_runnable(&args.pipeline.device)?;
    }
    let plan = load_plan(&args.pipeline, registry, Some(cache_root))?;
    let cache = open_cache(cache_root)?;
    let cancel = CancelFlag::default();
    install_ctrlc(&cancel);
    let opts = RunOptions {
        keep_going: args.keep_going,
        quiet,
        device: args.pipeline.device.clone(),
        session_path: session_path(&args.sessions, &plan, &args.pipeline.device),
        cancel,
        jobs: usize::from(args.jobs),
    };
    if let Some(name) = &args.only {
        return run_only(args, name, &plan, registry, &cache, &opts);
    }
    let mut outcome = if slurm {
        let slurm = slurm_options(&args.executor, &args.pipeline, &plan, registry, cache_root)?;
        detach_on_hangup();
        exec::slurm::run(&plan, registry, &cache, &opts, &slurm)?
    } else {
        exec::run(&plan, registry, &cache, &opts)?
    };
    let total = plan.order.len();
    if outcome.computed == 0 && outcome.cached == total {
        println!("nothing to compute: all {total} instances were cached");
    } else {
        println!("{total} instances: {} computed, {} cached", outcome.computed, outcome.cached);
    }
    println!("session: {}", outcome.session_path.display());
    let tables = match outcome.record.take() {
        Some(record) => super::report_cmd::attach_tables(&outcome.session_path, record),
        None => Ok(None),
    };
    match tables {
        Ok(Some(main)) => {
            println!();
            print!("{}", main.markdown());
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("could not add the tables to {}: {e:#}", outcome.session_path.display()),
    }
    if !outcome.detached.is_empty() {
        eprintln!(
            "detached: {} job(s) go on in the queue ({}); run the same command to re-attach",
            outcome.detached.len(),
            outcome.detached.join(", ")
        );
        return Err(CliError::Interrupted);
    }
    if outcome.interrupted {
        eprintln!(
            "interrupted: finished stages are cached and partial state is kept; run the same command to continue"
        );
        return Err(CliError::Interrupted);
    }
    if !outcome.failed.is_empty() {
        let mut msg = format!("{} instance(s) failed:", outcome.failed.len());
        for (name, err) in &outcome.failed {
            msg.push_str(&format!("\n  {name}: {err}"));
        }
        if !outcome.skipped.is_empty() {
            msg.push_str(&format!("\n  not run because an input failed: {}", outcome.skipped.join(", ")));
        }
        return Err(CliError::Failed(msg));
    }
    Ok(())
}

/// `--only NAME`: one instance, no session.
fn run_only(
    args: &RunArgs,
    name: &str,
    plan: &Plan,
    registry: &Registry,
    cache: &crate::cache::Cache,
    opts: &RunOptions,
) -> CliResult {
    let p = &plan.pipeline;
    let Some(i) = p.instance(name) else {
        let hint = crate::spec::diag::nearest(name, p.instances.iter().map(|i| i.name.as_str()))
            .map(|n| format!(" (did you mean `{n}`?)"))
            .unwrap_or_default();
        return Err(CliError::Usage(format!(
            "--only {name}: {} has no such instance{hint}; `rpt-flow plan` lists them",
            p.file.display()
        )));
    };
    let key = plan.keys[i];
    if let Some(expected) = &args.expect_key {
        if key.to_hex() != *expected {
            return Err(CliError::Failed(format!(
                "the key of `{name}` is now {key}, not {expected} as when its job was submitted: the pipeline, a file it reads or rpt-flow changed since; run the pipeline again to submit what it now means"
            )));
        }
    }
    match exec::run_only(plan, i, registry, cache, opts) {
        Ok(OnlyOutcome::Cached) => println!("{name}: cached {}", key.short()),
        Ok(OnlyOutcome::Computed { seconds }) => println!("{name}: computed in {seconds:.1}s, entry {}", key.short()),
        Err(e) if e.is::<Cancelled>() => {
            eprintln!("interrupted: partial state is kept; run again to continue");
            return Err(CliError::Interrupted);
        }
        Err(e) => return Err(CliError::Failed(format!("`{name}`: {e:#}"))),
    }
    Ok(())
}

/// First Ctrl-C: ask the running stage to stop cleanly. Second: leave at once.
fn install_ctrlc(cancel: &CancelFlag) {
    let flag = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.is_cancelled() {
            eprintln!("\naborting");
            std::process::exit(super::EXIT_INTERRUPTED as i32);
        }
        eprintln!("\nstopping after cleanup (Ctrl-C again to abort at once)");
        flag.cancel();
    });
}
