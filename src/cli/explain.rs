//! `rpt-flow explain`: what went into an instance's key, and what differs from the nearest
//! cached entry of the same kind.

use clap::Args;
use serde_json::json;

use super::{load_plan, open_cache, CliError, CliResult, PipelineArgs};
use crate::exec::Registry;
use crate::plan::{canonical_json, diff_material, nearest_entry, status_of};
use crate::spec::diag::nearest;

#[derive(Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Instance name, e.g. `level[sparsity=0.1].tuned`.
    pub instance: String,
    /// Output format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub format: String,
}

pub fn run(args: &ExplainArgs, registry: &Registry, cache_root: &std::path::Path) -> CliResult {
    let plan = load_plan(&args.pipeline, registry, Some(cache_root))?;
    let p = &plan.pipeline;
    let Some(i) = p.instance(&args.instance) else {
        let names: Vec<&str> = p.instances.iter().map(|x| x.name.as_str()).collect();
        let hint = match nearest(&args.instance, names.iter().copied()) {
            Some(n) => format!("did you mean `{n}`?"),
            None => format!("instances: {}", names.join(", ")),
        };
        return Err(CliError::Usage(format!("no instance `{}` in pipeline `{}`; {hint}", args.instance, p.name)));
    };
    let cache = open_cache(cache_root)?;
    let entries = cache.entries()?;
    let statuses = status_of(&plan, &cache, &entries);
    let inst = &p.instances[i];
    let m = &plan.material[i];
    if args.format == "json" {
        let cached = cache.contains(&plan.keys[i]);
        let nearest = if cached { None } else { nearest_entry(&plan, i, &entries) };
        let doc = json!({
            "instance": inst.name,
            "kind": inst.kind,
            "version": m["version"],
            "key": plan.keys[i].to_hex(),
            "status": statuses[i].label(),
            "reasons": statuses[i].reasons(),
            "entry": cached.then(|| cache.entry_dir(&plan.keys[i]).display().to_string()),
            "params": serde_json::Value::Object(inst.params.clone()),
            "inputs": inst.inputs.iter().map(|r| json!({
                "slot": r.slot, "instance": p.instances[r.target].name, "key": plan.keys[r.target].to_hex(),
            })).collect::<Vec<_>>(),
            "key_material": m,
            "nearest": nearest.map(|near| json!({
                "key": near.key.to_hex(),
                "pipeline": near.pipeline,
                "instance": near.instance,
                "differences": diff_material(&near.key_material, m),
                "key_material": near.key_material,
            })),
        });
        println!("{}", serde_json::to_string_pretty(&doc).map_err(anyhow::Error::from)?);
        return Ok(());
    }
    println!("instance  {}", inst.name);
    println!("kind      {} (version {})", inst.kind, m["version"]);
    println!("key       {}", plan.keys[i]);
    println!("status    {}", statuses[i].label());
    for r in statuses[i].reasons() {
        println!("          why: {r}");
    }
    println!("\nkey = blake3 of the canonical JSON of:");
    println!("  format    {}", m["format"]);
    println!("  settings  {}", canonical_json(&m["settings"]));
    println!("  identity  {}", canonical_json(&m["identity"]));
    println!("  params");
    for (k, v) in &inst.params {
        println!("    {k} = {}", canonical_json(v));
    }
    println!("  inputs");
    if inst.inputs.is_empty() {
        println!("    (none)");
    }
    for r in &inst.inputs {
        println!("    {} ← {}  {}", r.slot, p.instances[r.target].name, plan.keys[r.target]);
    }
    if cache.contains(&plan.keys[i]) {
        println!("\ncached entry: {}", cache.entry_dir(&plan.keys[i]).display());
        return Ok(());
    }
    match nearest_entry(&plan, i, &entries) {
        None => println!("\nno cached `{}` entry to compare with", inst.kind),
        Some(near) => {
            println!(
                "\nnearest cached entry: {} (pipeline {}, instance {})",
                near.key.short(),
                near.pipeline,
                near.instance
            );
            for d in diff_material(&near.key_material, m) {
                println!("  differs: {d}");
            }
        }
    }
    Ok(())
}
