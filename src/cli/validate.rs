//! `rpt-flow validate`: every problem, or a one-line summary. Writes nothing.

use super::{load_plan, CliResult, PipelineArgs};
use crate::exec::Registry;

pub fn run(args: &PipelineArgs, registry: &Registry) -> CliResult {
    let plan = load_plan(args, registry, None)?;
    let p = &plan.pipeline;
    let sweeps: std::collections::BTreeSet<&str> =
        p.instances.iter().filter_map(|i| i.sweep.as_ref().map(|s| s.sweep.as_str())).collect();
    println!(
        "ok: pipeline `{}` ({}): {} instances, {} sweep{}",
        p.name,
        args.pipeline.display(),
        p.instances.len(),
        sweeps.len(),
        if sweeps.len() == 1 { "" } else { "s" }
    );
    Ok(())
}
