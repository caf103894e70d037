//! `rpt-flow plan`: instances in execution order with key, inputs, status and why.

use clap::Args;
use serde_json::json;

use super::slurm_args::{slurm_options, Executor, ExecutorArgs};
use super::{load_plan, open_cache, CliResult, PipelineArgs};
use crate::exec::Registry;
use crate::plan::{status_of, Status};

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Output format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub format: String,
    /// With `--executor slurm`: print the sbatch commands `run --executor slurm` would submit.
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

pub fn run(args: &PlanArgs, registry: &Registry, cache_root: &std::path::Path) -> CliResult {
    let plan = load_plan(&args.pipeline, registry, Some(cache_root))?;
    let cache = open_cache(cache_root)?;
    if args.executor.executor == Executor::Slurm {
        let slurm = slurm_options(&args.executor, &args.pipeline, &plan, registry, cache_root)?;
        let jobs = crate::exec::slurm::dry_run(&plan, &cache, &slurm);
        let p = &plan.pipeline;
        println!(
            "# {}: {} of {} instances are not cached; `rpt-flow run ... --executor slurm` would submit:",
            p.file.display(),
            jobs.len(),
            p.instances.len()
        );
        for (comment, command) in &jobs {
            println!("{comment}\n{command}");
        }
        return Ok(());
    }
    args.executor.check_local()?;
    let entries = cache.entries()?;
    let statuses = status_of(&plan, &cache, &entries);
    let p = &plan.pipeline;
    if args.format == "json" {
        let instances: Vec<_> = plan
            .order
            .iter()
            .map(|&i| {
                let inst = &p.instances[i];
                json!({
                    "name": inst.name,
                    "kind": inst.kind,
                    "key": plan.keys[i].to_hex(),
                    "inputs": inst.inputs.iter().map(|r| p.instances[r.target].name.clone()).collect::<Vec<_>>(),
                    "status": statuses[i].label(),
                    "entry": (statuses[i] == Status::Cached).then(|| cache.entry_dir(&plan.keys[i]).display().to_string()),
                    "reasons": statuses[i].reasons(),
                    "params": serde_json::Value::Object(inst.params.clone()),
                })
            })
            .collect();
        let doc = json!({
            "pipeline": p.name,
            "file": p.file.display().to_string(),
            "profiles": p.options.profiles,
            "overrides": p.options.sets,
            "instances": instances,
        });
        println!("{}", serde_json::to_string_pretty(&doc).map_err(anyhow::Error::from)?);
        return Ok(());
    }
    let count = |f: fn(&Status) -> bool| statuses.iter().filter(|s| f(s)).count();
    let profiles = if p.options.profiles.is_empty() {
        String::new()
    } else {
        format!(", profile {}", p.options.profiles.join("+"))
    };
    let damaged = count(|s| matches!(s, Status::Damaged(_)));
    println!(
        "pipeline {} ({}{profiles}): {} instances — {} cached, {} partial, {} to run{}",
        p.name,
        p.file.display(),
        p.instances.len(),
        count(|s| *s == Status::Cached),
        count(|s| *s == Status::Partial),
        count(|s| matches!(s, Status::ToRun(_))),
        if damaged > 0 { format!(", {damaged} damaged (recomputed by `run`)") } else { String::new() },
    );
    let width = plan.order.iter().map(|&i| p.instances[i].name.len()).max().unwrap_or(0);
    for &i in &plan.order {
        let inst = &p.instances[i];
        let inputs: Vec<&str> = inst.inputs.iter().map(|r| p.instances[r.target].name.as_str()).collect();
        let arrow = if inputs.is_empty() { String::new() } else { format!("  ← {}", inputs.join(", ")) };
        println!(
            "{:<20} {}  {:<width$}  {:<10}{}",
            statuses[i].label(),
            plan.keys[i].short(),
            inst.name,
            inst.kind,
            arrow
        );
        for r in statuses[i].reasons() {
            println!("{:<20} why: {r}", "");
        }
    }
    Ok(())
}
