//! `--executor slurm` and the job settings given on the command line (shared by `run` and `plan`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::{CliError, PipelineArgs};
use crate::exec::slurm::SlurmOptions;
use crate::exec::Registry;
use crate::plan::Plan;
use crate::spec::executor;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Executor {
    /// This machine (see --jobs).
    Local,
    /// One sbatch job per instance that is not cached.
    Slurm,
}

#[derive(Args, Clone)]
#[command(next_help_heading = "Executor")]
pub struct ExecutorArgs {
    /// Where instances run.
    #[arg(long, value_enum, default_value = "local")]
    pub executor: Executor,
    /// A TOML file with an [executor.slurm] table (over the pipeline's own).
    #[arg(long, value_name = "FILE")]
    pub executor_config: Option<PathBuf>,
    /// Slurm partition for every job.
    #[arg(long)]
    pub partition: Option<String>,
    /// Slurm account.
    #[arg(long)]
    pub account: Option<String>,
    /// Slurm QOS.
    #[arg(long)]
    pub qos: Option<String>,
    /// Time limit of every job (minutes, H:MM:SS, D-HH:MM:SS); per kind in [executor.slurm.kinds].
    #[arg(long)]
    pub time: Option<String>,
    /// Generic resources of every job, e.g. gpu:1 ("" for none).
    #[arg(long)]
    pub gres: Option<String>,
    /// CPUs per job (--cpus-per-task).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub cpus_per_task: Option<u32>,
    /// Memory per job, e.g. 64G.
    #[arg(long)]
    pub mem: Option<String>,
    /// One more sbatch option for every job (repeatable), e.g. --sbatch-arg=--exclusive.
    #[arg(long, value_name = "OPTION", allow_hyphen_values = true)]
    pub sbatch_arg: Vec<String>,
    /// Seconds between reads of the queue.
    #[arg(long, value_name = "SECONDS")]
    pub poll_seconds: Option<f64>,
}

impl ExecutorArgs {
    /// Settings given on the command line while the executor is local: a likely mistake.
    pub fn check_local(&self) -> Result<(), CliError> {
        let slurm_only = self.executor_config.is_some()
            || self.partition.is_some()
            || self.account.is_some()
            || self.qos.is_some()
            || self.time.is_some()
            || self.gres.is_some()
            || self.cpus_per_task.is_some()
            || self.mem.is_some()
            || !self.sbatch_arg.is_empty()
            || self.poll_seconds.is_some();
        if self.executor == Executor::Local && slurm_only {
            return Err(CliError::Usage(
                "Slurm settings were given but the executor is local: add --executor slurm".into(),
            ));
        }
        Ok(())
    }
}

/// The pipeline's `[executor.slurm]`, then the config file's, then the command line's; and the
/// command every job runs.
pub fn slurm_options(
    args: &ExecutorArgs,
    pipeline: &PipelineArgs,
    plan: &Plan,
    registry: &Registry,
    cache_root: &Path,
) -> Result<SlurmOptions, CliError> {
    let mut settings = plan.pipeline.slurm.clone().unwrap_or_default();
    if let Some(path) = &args.executor_config {
        settings = settings.overlaid(&executor::load_config(path, &registry.catalog()).map_err(CliError::Spec)?);
    }
    let flags = executor::JobResources {
        partition: args.partition.clone(),
        account: args.account.clone(),
        qos: args.qos.clone(),
        time: args.time.clone(),
        gres: args.gres.clone(),
        cpus: args.cpus_per_task,
        mem: args.mem.clone(),
        extra: args.sbatch_arg.clone(),
    };
    executor::check_flags(&flags).map_err(CliError::Usage)?;
    let poll = match args.poll_seconds {
        Some(s) if !(0.1..=3600.0).contains(&s) => {
            return Err(CliError::Usage(format!("--poll-seconds {s}: give a number from 0.1 to 3600")))
        }
        other => other,
    };
    settings = settings.overlaid(&executor::SlurmSettings { all: flags, poll_seconds: poll, ..Default::default() });
    let program = match &settings.program {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe().map_err(|e| CliError::Failed(format!("finding this program's path: {e}")))?,
    };
    let absolute = |p: &Path, what: &str| {
        std::path::absolute(p).map_err(|e| CliError::Usage(format!("{what} {}: {e}", p.display())))
    };
    let cache_root = absolute(cache_root, "cache root")?;
    let mut command = vec![
        absolute(&program, "program")?.display().to_string(),
        "--cache".into(),
        cache_root.display().to_string(),
        "run".into(),
        absolute(&pipeline.pipeline, "pipeline")?.display().to_string(),
        "--device".into(),
        pipeline.device.clone(),
    ];
    for p in &pipeline.profiles {
        command.extend(["--profile".into(), p.clone()]);
    }
    for s in &pipeline.sets {
        command.extend(["--set".into(), s.clone()]);
    }
    let poll = Duration::from_secs_f64(settings.poll_seconds.unwrap_or(5.0));
    Ok(SlurmOptions { settings, command, cache_root, poll, detach: &DETACH })
}

static DETACH: AtomicBool = AtomicBool::new(false);

extern "C" fn on_detach(_: libc::c_int) {
    DETACH.store(true, Ordering::SeqCst);
}

/// For the Slurm orchestrator, a hang-up (a lost ssh session) or SIGTERM (its own job's time
/// limit) detaches rather than cancelling the pipeline's jobs: they go on, and the same command
/// re-attaches. Replaces the Ctrl-C handler's hold on those two signals; Ctrl-C still cancels.
pub fn detach_on_hangup() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGHUP, on_detach as extern "C" fn(libc::c_int) as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_detach as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
}
