//! `rpt-flow run`: execute what is not cached, with Ctrl-C handled cleanly.

use std::path::{Path, PathBuf};

use clap::Args;

use super::{load_plan, open_cache, CliError, CliResult, PipelineArgs};
use crate::exec::{self, session_path, CancelFlag, Registry, RunOptions};

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
}

pub fn run(args: &RunArgs, registry: &Registry, cache_root: &Path, quiet: bool) -> CliResult {
    super::check_runnable(&args.pipeline.device)?;
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
    let outcome = exec::run(&plan, registry, &cache, &opts)?;
    let total = plan.order.len();
    if outcome.computed == 0 && outcome.cached == total {
        println!("nothing to compute: all {total} instances were cached");
    } else {
        println!("{total} instances: {} computed, {} cached", outcome.computed, outcome.cached);
    }
    println!("session: {}", outcome.session_path.display());
    match super::report_cmd::attach_tables(&outcome.session_path) {
        Ok(Some(main)) => {
            println!();
            print!("{}", main.markdown());
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("could not add the tables to {}: {e:#}", outcome.session_path.display()),
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
