//! `rpt-flow validate`: every problem, or a one-line summary. Writes nothing.

use clap::Args;
use serde_json::{json, Value as Json};

use super::{load_plan, CliError, CliResult, PipelineArgs, EXIT_BAD_INPUT};
use crate::exec::Registry;
use crate::spec::SpecErrors;

#[derive(Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Output format: text (problems on stderr) or json (one object on stdout, whatever the
    /// outcome; the exit code is the same).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub format: String,
}

pub fn run(args: &ValidateArgs, registry: &Registry) -> CliResult {
    let json = args.format == "json";
    let plan = match load_plan(&args.pipeline, registry, None) {
        Ok(plan) => plan,
        Err(CliError::Spec(errors)) if json => {
            let doc = json!({
                "ok": false,
                "file": args.pipeline.pipeline.display().to_string(),
                "problems": problems(&errors, &args.pipeline.pipeline.display().to_string()),
            });
            print_json(&doc)?;
            return Err(CliError::Exit(EXIT_BAD_INPUT));
        }
        Err(e) => return Err(e),
    };
    let p = &plan.pipeline;
    let sweeps: std::collections::BTreeSet<&str> =
        p.instances.iter().filter_map(|i| i.sweep.as_ref().map(|s| s.sweep.as_str())).collect();
    if json {
        return print_json(&json!({
            "ok": true,
            "file": args.pipeline.pipeline.display().to_string(),
            "pipeline": p.name,
            "profiles": p.options.profiles,
            "overrides": p.options.sets,
            "instances": p.instances.len(),
            "sweeps": sweeps.len(),
            "problems": [],
        }));
    }
    println!(
        "ok: pipeline `{}` ({}): {} instances, {} sweep{}",
        p.name,
        args.pipeline.pipeline.display(),
        p.instances.len(),
        sweeps.len(),
        if sweeps.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

/// Every diagnostic as `{file, line, col, end_line, end_col, message, help}`: 1-based lines and
/// columns (in characters) into the file, or into a `--set` argument (file `--set`); a problem
/// without a place (an unreadable file) has the pipeline's path and null positions.
fn problems(errors: &SpecErrors, pipeline: &str) -> Vec<Json> {
    errors
        .diagnostics
        .iter()
        .map(|d| {
            let place = d.span.as_ref().and_then(|span| {
                let src = errors.sources.get(span.source)?;
                let (line, col) = src.line_col(span.range.start);
                let (end_line, end_col) = src.line_col(span.range.end.max(span.range.start));
                Some((src.name.clone(), line, col, end_line, end_col))
            });
            match place {
                Some((file, line, col, end_line, end_col)) => json!({
                    "file": file, "line": line, "col": col, "end_line": end_line, "end_col": end_col,
                    "message": d.message, "help": d.help,
                }),
                None => json!({
                    "file": pipeline, "line": null, "col": null, "end_line": null, "end_col": null,
                    "message": d.message, "help": d.help,
                }),
            }
        })
        .collect()
}

fn print_json(doc: &Json) -> CliResult {
    println!("{}", serde_json::to_string_pretty(doc).map_err(anyhow::Error::from)?);
    Ok(())
}
