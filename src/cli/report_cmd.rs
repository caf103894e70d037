//! `rpt-flow report`: tables and plots of a session file, of a pipeline's cached results, or of
//! several side by side; flat CSV/JSON rows for notebooks.

use std::path::{Path, PathBuf};

use clap::Args;

use super::{load_plan, open_cache, CliError, CliResult, PipelineArgs};
use crate::exec::{self, session_path, Registry};
use crate::report::{self, flat, plots, Session};
use crate::session::{recorded_sessions, RunStatus, StageStatus};

#[derive(Args)]
pub struct ReportArgs {
    /// Session files (`sessions/…/x.json`) or pipelines (`pipelines/x.toml`, read from the cache
    /// without running anything). Two or more are compared side by side.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// For pipelines: apply a `[profiles.<name>]` table (repeatable).
    #[arg(long = "profile", short = 'p')]
    pub profiles: Vec<String>,
    /// For pipelines: override a value (repeatable).
    #[arg(long = "set", short = 's', value_name = "PATH=VALUE")]
    pub sets: Vec<String>,
    /// For pipelines: the device class the keys were computed for.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// markdown: write `<name>.md` and plots, print the tables; csv/json: print one flat row per
    /// instance on stdout and write nothing.
    #[arg(long, default_value = "markdown", value_parser = ["markdown", "csv", "json"])]
    pub format: String,
    /// Where a pipeline's report goes (as `run` would put its session).
    #[arg(long, env = "RPT_SESSIONS", default_value = "sessions")]
    pub sessions: PathBuf,
    /// Write the report here instead of beside the (first) session file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Do not draw plots.
    #[arg(long)]
    pub no_plots: bool,
}

pub fn run(args: &ReportArgs, registry: &Registry, cache_root: &Path) -> CliResult {
    let mut sessions = Vec::new();
    for input in &args.inputs {
        let s = if input.extension().is_some_and(|e| e == "toml") {
            from_pipeline(args, input, registry, cache_root)?
        } else {
            Session::read_for_report(input).map_err(|e| CliError::Usage(format!("{e:#}")))?
        };
        sessions.push(s);
    }
    match args.format.as_str() {
        "csv" | "json" => {
            let many = sessions.len() > 1;
            let mut rows = Vec::new();
            for s in &sessions {
                let label = s.path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| s.stem());
                rows.extend(flat::rows(s, many.then_some(label.as_str())));
            }
            print!("{}", if args.format == "csv" { flat::csv(&rows) } else { flat::json(&rows) });
            Ok(())
        }
        _ => write_report(args, &sessions),
    }
}

fn write_report(args: &ReportArgs, sessions: &[Session]) -> CliResult {
    let first = &sessions[0];
    let dir = match (&args.out, &first.path) {
        (Some(d), _) => d.clone(),
        (None, Some(p)) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
        (None, None) => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| CliError::Failed(format!("creating {}: {e}", dir.display())))?;
    let stem = sessions.iter().map(Session::stem).collect::<Vec<_>>().join("-vs-");
    let plots_to_draw = if args.no_plots {
        Vec::new()
    } else if sessions.len() == 1 {
        plots::plots(first)
    } else {
        report::comparison_plots(sessions)
    };
    let mut written = Vec::new();
    for p in &plots_to_draw {
        written.push(plots::write(p, &dir, &stem)?);
    }
    let mut md = if sessions.len() == 1 {
        report::markdown(first, &written)
    } else {
        report::comparison_markdown(sessions, &written)
    };
    if sessions.len() == 1 && first.status == RunStatus::FromCache {
        md.push_str(&recorded_runs(&args.sessions, first));
    }
    let md_path = dir.join(format!("{stem}.md"));
    std::fs::write(&md_path, &md).map_err(|e| CliError::Failed(format!("writing {}: {e}", md_path.display())))?;
    print!("{md}");
    println!();
    println!("report: {}", md_path.display());
    for w in &written {
        let png = w.png.as_ref().map(|p| format!(", {}", p.display())).unwrap_or_default();
        println!("plot: {}{png}", w.svg.display());
        if let Some(n) = &w.note {
            eprintln!("note: {}: {n}", w.plot);
        }
    }
    Ok(())
}

/// The cached state of a pipeline as a session: every instance's metrics from its cache entry's
/// manifest (`missing` when there is none). Runs nothing and touches no entry.
fn from_pipeline(args: &ReportArgs, file: &Path, registry: &Registry, cache_root: &Path) -> Result<Session, CliError> {
    let pargs = PipelineArgs {
        pipeline: file.to_path_buf(),
        profiles: args.profiles.clone(),
        sets: args.sets.clone(),
        device: args.device.clone(),
    };
    let plan = load_plan(&pargs, registry, Some(cache_root))?;
    let cache = open_cache(cache_root)?;
    let path = session_path(&args.sessions, &plan, &args.device);
    let mut s = exec::Session::new(path, &plan, registry, &args.device, cache_root).record;
    for (&i, stage) in plan.order.iter().zip(s.instances.iter_mut()) {
        match cache.manifest(&plan.keys[i])? {
            Some(m) => {
                stage.status = StageStatus::Cached;
                stage.cached = true;
                stage.seconds = m.seconds;
                stage.metrics = m.metrics.as_object().cloned().unwrap_or_default();
            }
            None => stage.status = StageStatus::Missing,
        }
    }
    s.status = RunStatus::FromCache;
    s.started = String::new();
    Ok(s)
}

/// The recorded runs of a pipeline read from the cache: its session files under `dir` (every
/// profile, device and `--set` run has its own), with the status a reader should see.
fn recorded_runs(dir: &Path, s: &Session) -> String {
    let runs = recorded_sessions(dir, &s.pipeline, Path::new(&s.file));
    let mut out = String::from("\n## Recorded runs\n\n");
    if runs.is_empty() {
        out.push_str(&format!("none under {}\n", dir.display()));
    }
    for run in runs {
        let sets =
            if run.overrides.is_empty() { String::new() } else { format!(", --set {}", run.overrides.join(" --set ")) };
        out.push_str(&format!(
            "- `{}`: {}, device {}, started {}{sets}\n",
            run.path.as_deref().unwrap_or(Path::new("?")).display(),
            run.effective_status(),
            if run.device.is_empty() { "cpu" } else { &run.device },
            if run.started.is_empty() { "?" } else { &run.started },
        ));
    }
    out
}

/// Ends a run: stores the report's tables in the session file under `tables` (what the
/// researcher's tables show, e.g. per level: ppl before/after, vs baseline, recovery, text label,
/// so a notebook reading the session needs no rpt-flow) and returns the main one to print
/// (none for kinds the report does not know). `record` is the run's own final record, not the
/// file read back: a second run of the same pipeline at once writes the same file, and a read
/// of its `running` state written back here would outlive both runs' `complete`. The file is
/// rewritten atomically (synced, renamed over), and a failure only loses the tables.
pub fn attach_tables(session_file: &Path, mut record: Session) -> anyhow::Result<Option<report::Table>> {
    let tables = report::tables(&record);
    record.tables = Some(tables.iter().map(|t| t.to_json()).collect());
    record.write(session_file)?;
    Ok(tables.into_iter().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORD: &str = r#"{"pipeline": "p", "seed": 0, "device": "cpu", "started": "2026-12-02T00:00:00Z",
        "status": "complete", "stages": {}}"#;

    #[test]
    fn tables_go_on_this_runs_record_not_on_what_another_run_wrote_since() {
        // Two runs of one pipeline share the session file: when this run ends, the file may hold
        // the other's `running` save. Writing that back (with tables) would outlive both runs'
        // `complete` (seen in CI as a flaky `two_concurrent_runs_compute_each_instance_once`).
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.json");
        let theirs = Session::parse(&RECORD.replace("\"complete\"", "\"running\"")).unwrap();
        theirs.write(&file).unwrap();
        attach_tables(&file, Session::parse(RECORD).unwrap()).unwrap();
        let after = Session::read(&file).unwrap();
        assert_eq!(after.status, RunStatus::Complete);
        assert!(after.tables.is_some(), "the tables are attached");
    }
}
