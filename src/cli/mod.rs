//! The command line: one file per subcommand. `main` takes the stage registry so that the
//! shipped binary and test harnesses share every line of it.

mod cache_cmd;
mod completions;
mod explain;
mod export;
mod graph;
mod plan_cmd;
mod report_cmd;
mod run_cmd;
mod schema;
mod slurm_args;
mod stages_cmd;
mod validate;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::cache::Cache;
use crate::exec::{FileHasher, Identifier, Registry};
use crate::plan::{self, Plan, Settings};
use crate::spec::{self, SpecErrors, SpecOptions};

/// Exit codes (documented in docs/cli.md).
pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;
pub const EXIT_INTERRUPTED: u8 = 130;

#[derive(Parser)]
#[command(name = "rpt-flow", version, about = "Declarative, cached LLM compression and analysis experiments", long_about = None)]
struct Cli {
    /// Cache root.
    #[arg(long, global = true, env = "RPT_CACHE", default_value = "cache")]
    cache: PathBuf,
    /// No progress output (errors and results still print).
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a pipeline; print every problem with file:line:col. Writes nothing.
    Validate(validate::ValidateArgs),
    /// Show the expanded instances in execution order with keys and cache status.
    Plan(plan_cmd::PlanArgs),
    /// Draw the DAG (Graphviz dot or Mermaid).
    Graph(graph::GraphArgs),
    /// Run what is not cached; write sessions/YYYY-MM-DD/<pipeline>.json.
    Run(run_cmd::RunArgs),
    /// Tables and plots of a session (or of a pipeline's cached results); CSV/JSON rows.
    Report(report_cmd::ReportArgs),
    /// Show what went into an instance's key, and how it differs from the nearest cached entry.
    Explain(explain::ExplainArgs),
    /// Write an instance's model as a Hugging Face directory (model card, provenance, recipe) or a GGUF file.
    Export(export::ExportArgs),
    /// List stage kinds with their parameters.
    Stages(stages_cmd::StagesArgs),
    /// Print a JSON Schema of the pipeline format (for editors: Taplo / Even Better TOML).
    Schema(schema::SchemaArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(completions::CompletionsArgs),
    /// Inspect and maintain the cache.
    #[command(subcommand)]
    Cache(cache_cmd::CacheCommand),
}

/// A pipeline file with its profiles and overrides.
#[derive(Args, Clone)]
pub struct PipelineArgs {
    /// The pipeline TOML file.
    pub pipeline: PathBuf,
    /// Apply a `[profiles.<name>]` table (repeatable; applied in the order the file defines them).
    #[arg(long = "profile", short = 'p')]
    pub profiles: Vec<String>,
    /// Override a value: --set stages.base.model=builtin:tiny-bitnet (repeatable).
    #[arg(long = "set", short = 's', value_name = "PATH=VALUE")]
    pub sets: Vec<String>,
    /// Device: cpu, cuda, cuda:N, or a list cuda:0,cuda:1 to run one instance per GPU (the class
    /// is part of every key).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Why a command did not succeed.
pub enum CliError {
    /// A bad pipeline: printed with locations, exit 2.
    Spec(SpecErrors),
    /// Bad arguments or files: exit 2.
    Usage(String),
    /// Something failed while running: exit 1.
    Failed(String),
    Interrupted,
    /// Already reported (as JSON on stdout, by a `--format json` command): exit with this code.
    Exit(u8),
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> CliError {
        CliError::Failed(format!("{e:#}"))
    }
}

pub type CliResult = Result<(), CliError>;

/// Runs the CLI with the given stage kinds and returns the process exit code.
pub fn main(registry: Registry) -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    if !matches!(cli.command, Command::Run(_)) {
        default_sigpipe();
    }
    let result = match &cli.command {
        Command::Validate(a) => validate::run(a, &registry),
        Command::Plan(a) => plan_cmd::run(a, &registry, &cli.cache),
        Command::Graph(a) => graph::run(a, &registry),
        Command::Run(a) => run_cmd::run(a, &registry, &cli.cache, cli.quiet),
        Command::Report(a) => report_cmd::run(a, &registry, &cli.cache),
        Command::Explain(a) => explain::run(a, &registry, &cli.cache),
        Command::Export(a) => export::run(a, &registry, &cli.cache),
        Command::Stages(a) => stages_cmd::run(a, &registry),
        Command::Schema(a) => schema::run(a, &registry),
        Command::Completions(a) => completions::run(a),
        Command::Cache(c) => cache_cmd::run(c, &registry, &cli.cache),
    };
    match result {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(CliError::Spec(e)) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
        Err(CliError::Usage(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
        Err(CliError::Failed(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(EXIT_FAILED)
        }
        Err(CliError::Interrupted) => ExitCode::from(EXIT_INTERRUPTED),
        Err(CliError::Exit(code)) => ExitCode::from(code),
    }
}

/// Commands that print a listing end quietly when the reader goes away (`rpt-flow plan … | head`),
/// as other command-line tools do, instead of panicking on the broken pipe. Not `run`: a closed
/// pipe must not kill a computation midway.
fn default_sigpipe() {
    // SAFETY: restores the default disposition of one signal before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::exec::log_writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Checks `--device` and returns its class (`cpu` or `cuda`). Any build can plan for either
/// class (keys are pure: `plan --device cuda` on a laptop shows what a GPU run has cached);
/// running on one is [`check_runnable`]'s business.
pub fn device_class(device: &str) -> Result<String, CliError> {
    if device.contains(',') {
        return device_list_class(device);
    }
    let (class, ordinal) = device.split_once(':').unwrap_or((device, "0"));
    match class {
        "cpu" if !device.contains(':') => Ok("cpu".into()),
        "cuda" if ordinal.parse::<usize>().is_ok() => Ok("cuda".into()),
        _ => Err(CliError::Usage(format!(
            "--device `{device}` is not cpu, cuda or cuda:N (or a list of GPUs, cuda:0,cuda:1)"
        ))),
    }
}

/// A list of GPUs (`cuda:0,cuda:1`): distinct, each `cuda:N`; one instance runs per device.
fn device_list_class(list: &str) -> Result<String, CliError> {
    let mut seen = Vec::new();
    for d in list.split(',') {
        let ordinal = d.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok());
        match ordinal {
            Some(n) if !seen.contains(&n) => seen.push(n),
            Some(_) => return Err(CliError::Usage(format!("--device {list}: `{d}` is listed twice"))),
            None => {
                return Err(CliError::Usage(format!(
                    "--device {list}: `{d}` is not cuda:N; a device list names GPUs, e.g. cuda:0,cuda:1"
                )))
            }
        }
    }
    Ok("cuda".into())
}

/// Fails for a device this build cannot compute on (cuda without the `cuda` feature).
pub fn check_runnable(device: &str) -> Result<(), CliError> {
    if device_class(device)? == "cuda" && !cfg!(feature = "cuda") {
        return Err(CliError::Usage(format!(
            "--device {device}: this rpt-flow was built without CUDA; rebuild with `cargo build --release --features cuda`"
        )));
    }
    Ok(())
}

/// Reads, validates and plans a pipeline; file hashes are remembered in the cache root when one
/// is given (`validate` passes none: it writes nothing).
pub fn load_plan(args: &PipelineArgs, registry: &Registry, cache_root: Option<&Path>) -> Result<Plan, CliError> {
    // Without a cache root (validate, graph) no key is shown: identities ask no remote service.
    plan_for_class(args, &device_class(&args.device)?, registry, cache_root, cache_root.is_some())
}

/// The plan with keys for a device class (`cpu` or `cuda`) whether or not this build can run on
/// it (`cache gc --keep` must know the keys of GPU runs on a CPU-only build). With `remote`
/// false, identities use local information only (no hub request: a branch resolves through the
/// local refs, which every download writes).
pub fn plan_for_class(
    args: &PipelineArgs,
    class: &str,
    registry: &Registry,
    cache_root: Option<&Path>,
    remote: bool,
) -> Result<Plan, CliError> {
    let settings = Settings { device_class: class.to_string() };
    let options = SpecOptions { profiles: args.profiles.clone(), sets: args.sets.clone() };
    let catalog = registry.catalog();
    let pipeline = spec::load(&args.pipeline, &catalog, &options).map_err(CliError::Spec)?;
    let files = match cache_root {
        Some(root) => FileHasher::persistent(root.join("file-hashes.json")),
        None => FileHasher::in_memory(),
    }
    .relative_to(&pipeline.base_dir());
    let files = if remote { files } else { files.local_only() };
    let plan =
        plan::build(pipeline, &catalog, &settings, &Identifier { registry, files: &files }).map_err(CliError::Spec)?;
    files.save();
    Ok(plan)
}

/// The cache at `root`; a path that exists but is not a directory is a usage error (exit 2).
pub fn open_cache(root: &std::path::Path) -> Result<Cache, CliError> {
    if root.exists() && !root.is_dir() {
        return Err(CliError::Usage(format!(
            "cache root {} is not a directory: pass a directory with --cache (or RPT_CACHE)",
            root.display()
        )));
    }
    Ok(Cache::open(root))
}
