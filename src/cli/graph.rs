//! `rpt-flow graph`: the DAG as Graphviz dot or Mermaid.

use clap::Args;
use petgraph::visit::EdgeRef;

use super::{load_plan, CliResult, PipelineArgs};
use crate::exec::Registry;

#[derive(Args)]
pub struct GraphArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[arg(long, default_value = "dot", value_parser = ["dot", "mermaid"])]
    pub format: String,
}

fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

pub fn run(args: &GraphArgs, registry: &Registry) -> CliResult {
    let plan = load_plan(&args.pipeline, registry, None)?;
    let p = &plan.pipeline;
    let mut out = String::new();
    if args.format == "dot" {
        out.push_str(&format!(
            "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n",
            quote(&p.name)
        ));
        for &i in &plan.order {
            let inst = &p.instances[i];
            out.push_str(&format!("  n{i} [label=\"{}\\n{}\"];\n", quote(&inst.name), quote(&inst.kind)));
        }
        for e in plan.graph.edge_references() {
            let (a, b) = (plan.graph[e.source()], plan.graph[e.target()]);
            out.push_str(&format!("  n{a} -> n{b} [label=\"{}\"];\n", quote(e.weight())));
        }
        out.push_str("}\n");
    } else {
        out.push_str("flowchart LR\n");
        for &i in &plan.order {
            let inst = &p.instances[i];
            out.push_str(&format!("  n{i}[\"{}<br/><i>{}</i>\"]\n", inst.name.replace('"', "#quot;"), inst.kind));
        }
        for e in plan.graph.edge_references() {
            let (a, b) = (plan.graph[e.source()], plan.graph[e.target()]);
            out.push_str(&format!("  n{a} -->|{}| n{b}\n", e.weight()));
        }
    }
    print!("{out}");
    Ok(())
}
