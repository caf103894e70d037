//! `rpt-flow stages`: every stage kind with its inputs and parameters, from the same definitions
//! the validator uses.

use clap::Args;
use serde_json::json;

use super::{CliError, CliResult};
use crate::exec::{ParamDefault, Registry, Stage};
use crate::spec::diag::nearest;

#[derive(Args)]
pub struct StagesArgs {
    /// Only this kind.
    pub kind: Option<String>,
    #[arg(long, default_value = "text", value_parser = ["text", "markdown", "json"])]
    pub format: String,
}

pub fn run(args: &StagesArgs, registry: &Registry) -> CliResult {
    let mut kinds: Vec<&dyn Stage> = registry.iter().collect();
    if let Some(k) = &args.kind {
        let names: Vec<&str> = kinds.iter().map(|s| s.schema().kind).collect();
        kinds.retain(|s| s.schema().kind == k);
        if kinds.is_empty() {
            let hint = nearest(k, names.iter().copied()).map(|n| format!("; did you mean `{n}`?")).unwrap_or_default();
            return Err(CliError::Usage(format!("no stage kind `{k}`{hint}")));
        }
    }
    match args.format.as_str() {
        "json" => {
            let doc: Vec<_> = kinds
                .iter()
                .map(|stage| {
                    let (s, r) = (stage.schema(), stage.report());
                    json!({
                        "kind": s.kind, "version": s.version, "help": s.help, "output": s.output.name(),
                        "inputs": s.inputs.iter().map(|i| json!({"name": i.name, "type": i.ty.name(), "required": i.required, "help": i.help})).collect::<Vec<_>>(),
                        "params": s.params.iter().map(|p| json!({"name": p.name, "type": p.ty.short(), "default": default_text(&p.default), "help": p.help})).collect::<Vec<_>>(),
                        "roles": r.roles.iter().map(|x| x.name()).collect::<Vec<_>>(),
                        "metrics": r.metrics.iter().map(|m| json!({"name": m.name, "always": m.always, "help": m.help})).collect::<Vec<_>>(),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&doc).map_err(anyhow::Error::from)?);
        }
        "markdown" => print!("{}", markdown(&kinds)),
        _ => print!("{}", text(&kinds)),
    }
    Ok(())
}

fn default_text(d: &ParamDefault) -> String {
    d.describe()
}

/// ` (report: perplexity)` after the kind's line, when it has roles.
fn roles_text(stage: &dyn Stage) -> String {
    let roles: Vec<&str> = stage.report().roles.iter().map(|r| r.name()).collect();
    if roles.is_empty() {
        String::new()
    } else {
        format!(" (report: {})", roles.join(", "))
    }
}

fn text(kinds: &[&dyn Stage]) -> String {
    let mut out = String::new();
    if kinds.is_empty() {
        out.push_str("no stage kinds are registered in this binary\n");
    }
    for stage in kinds {
        let s = stage.schema();
        out.push_str(&format!(
            "{} (v{}) → {}{}\n    {}\n",
            s.kind,
            s.version,
            s.output.name(),
            roles_text(*stage),
            s.help
        ));
        for i in s.inputs {
            out.push_str(&format!(
                "    input  {:<16} {:<22} {}{}\n",
                i.name,
                i.ty.name(),
                i.help,
                if i.required { "" } else { " (optional)" }
            ));
        }
        for p in s.params {
            out.push_str(&format!(
                "    param  {:<16} {:<22} {} [default: {}]\n",
                p.name,
                p.ty.short(),
                p.help,
                p.default.describe()
            ));
        }
        for m in stage.report().metrics {
            out.push_str(&format!(
                "    metric {:<16} {}{}\n",
                m.name,
                m.help,
                if m.always { "" } else { " (sometimes)" }
            ));
        }
        out.push('\n');
    }
    out
}

fn markdown(kinds: &[&dyn Stage]) -> String {
    let mut out = String::new();
    for stage in kinds {
        let s = stage.schema();
        out.push_str(&format!(
            "## `{}` (version {})\n\n{}\n\nOutput: {}{}.\n\n",
            s.kind,
            s.version,
            s.help.replace('|', "\\|"),
            s.output.name(),
            roles_text(*stage)
        ));
        out.push_str("| name | input/param | type | default | meaning |\n|---|---|---|---|---|\n");
        for i in s.inputs {
            out.push_str(&format!(
                "| `{}` | input | {} | {} | {} |\n",
                i.name,
                i.ty.name(),
                if i.required { "required" } else { "optional" },
                i.help.replace('|', "\\|")
            ));
        }
        for p in s.params {
            out.push_str(&format!(
                "| `{}` | param | `{}` | `{}` | {} |\n",
                p.name,
                p.ty.short().replace('|', "\\|"),
                p.default.describe(),
                p.help.replace('|', "\\|")
            ));
        }
        let metrics = stage.report().metrics;
        if !metrics.is_empty() {
            out.push_str(
                "\nMetrics (top level of the session's `metrics`):\n\n| metric | written | meaning |\n|---|---|---|\n",
            );
            for m in metrics {
                out.push_str(&format!(
                    "| `{}` | {} | {} |\n",
                    m.name,
                    if m.always { "always" } else { "sometimes" },
                    m.help.replace('|', "\\|")
                ));
            }
        }
        out.push('\n');
    }
    out
}
