//! From a resolved pipeline to a DAG of stage instances, each with its cache key, in a
//! deterministic topological order; cache status and the reasons something must run.

mod key;
mod status;

use std::collections::BTreeSet;

use petgraph::graph::{DiGraph, NodeIndex};
use serde_json::{json, Map, Value as Json};

pub use key::{canonical_json, key_of, KEY_FORMAT};
pub use status::{diff_material, nearest_entry, status_of, Status};

use crate::cache::Key;
use crate::spec::schema::Catalog;
use crate::spec::{Diagnostic, Pipeline, SpecErrors};

/// Settings outside the pipeline file that change results.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `cpu` or `cuda`: the device class, not the ordinal (results do not depend on which GPU).
    pub device_class: String,
}

/// Extra key material a stage kind derives from its parameters before anything runs: the content
/// hash of a local file, a hub revision. Implemented by the stage registry.
pub trait Identity {
    fn identity(&self, kind: &str, params: &Map<String, Json>) -> Result<Option<Json>, String>;
}

/// The expanded pipeline as a graph with keys.
pub struct Plan {
    pub pipeline: Pipeline,
    /// Node weights are instance indices; edge weights are input slot names (input → consumer).
    pub graph: DiGraph<usize, String>,
    /// Instance indices in execution order.
    pub order: Vec<usize>,
    pub keys: Vec<Key>,
    pub material: Vec<Json>,
}

impl Plan {
    /// Instances that `i` reads, as (slot, instance index).
    pub fn inputs_of(&self, i: usize) -> impl Iterator<Item = (&str, usize)> + '_ {
        self.pipeline.instances[i].inputs.iter().map(|r| (r.slot.as_str(), r.target))
    }
}

/// Builds the DAG, rejects cycles (naming every instance on them), orders it and computes keys.
pub fn build(
    pipeline: Pipeline,
    catalog: &Catalog,
    settings: &Settings,
    identity: &dyn Identity,
) -> Result<Plan, SpecErrors> {
    let n = pipeline.instances.len();
    let mut graph = DiGraph::<usize, String>::with_capacity(n, n);
    let nodes: Vec<NodeIndex> = (0..n).map(|i| graph.add_node(i)).collect();
    for (i, inst) in pipeline.instances.iter().enumerate() {
        for r in &inst.inputs {
            graph.add_edge(nodes[r.target], nodes[i], r.slot.clone());
        }
    }

    let mut diags = cycles(&pipeline, &graph);
    if !diags.is_empty() {
        return Err(pipeline.errors(diags));
    }
    let order = topological_order(&graph);

    let mut keys = vec![Key([0; 32]); n];
    let mut material = vec![Json::Null; n];
    for &i in &order {
        let inst = &pipeline.instances[i];
        let schema = catalog.get(&inst.kind).expect("validated kinds are in the catalog");
        let id = match identity.identity(&inst.kind, &inst.params) {
            Ok(id) => id,
            Err(e) => {
                diags.push(Diagnostic::at(inst.span_of_error(&e), format!("stage `{}`: {e}", inst.name)));
                continue;
            }
        };
        let mut inputs: Vec<(&str, Key)> = inst.inputs.iter().map(|r| (r.slot.as_str(), keys[r.target])).collect();
        inputs.sort_by(|a, b| a.0.cmp(b.0));
        let m = json!({
            "format": KEY_FORMAT,
            "kind": inst.kind,
            "version": schema.version,
            "params": Json::Object(inst.params.clone()),
            "settings": { "device": settings.device_class },
            "identity": id.unwrap_or(Json::Null),
            "inputs": inputs.iter().map(|(slot, k)| json!({"slot": slot, "key": k.to_hex()})).collect::<Vec<_>>(),
        });
        keys[i] = key_of(&m);
        material[i] = m;
    }
    if !diags.is_empty() {
        return Err(pipeline.errors(diags));
    }
    Ok(Plan { pipeline, graph, order, keys, material })
}

fn cycles(pipeline: &Pipeline, graph: &DiGraph<usize, String>) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for scc in petgraph::algo::tarjan_scc(graph) {
        let self_loop = scc.len() == 1 && graph.contains_edge(scc[0], scc[0]);
        if scc.len() < 2 && !self_loop {
            continue;
        }
        let mut members: Vec<usize> = scc.iter().map(|&n| graph[n]).collect();
        members.sort();
        // Walk the cycle from its first member so the message reads a → b → c → a.
        let mut path = vec![members[0]];
        let mut cur = members[0];
        loop {
            let next = pipeline.instances[cur]
                .inputs
                .iter()
                .map(|r| r.target)
                .find(|t| members.contains(t) && (!path.contains(t) || *t == members[0]));
            match next {
                Some(t) if t == members[0] => break,
                Some(t) => {
                    path.push(t);
                    cur = t;
                }
                None => break,
            }
        }
        let names: Vec<&str> =
            path.iter().chain(std::iter::once(&path[0])).map(|&i| pipeline.instances[i].name.as_str()).collect();
        let first = &pipeline.instances[path[0]];
        let span = first.inputs.iter().find(|r| members.contains(&r.target)).map(|r| r.span.clone());
        out.push(
            Diagnostic::new(format!("cycle between stages: {}", names.join(" ← ")), span)
                .help("each name reads the next one as its input; break the loop by pointing one input elsewhere"),
        );
    }
    out
}

/// Kahn's algorithm taking the lowest instance index first: deterministic and close to file order.
fn topological_order(graph: &DiGraph<usize, String>) -> Vec<usize> {
    let mut indegree: Vec<usize> =
        graph.node_indices().map(|n| graph.neighbors_directed(n, petgraph::Incoming).count()).collect();
    let mut ready: BTreeSet<usize> = (0..indegree.len()).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(indegree.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for m in graph.neighbors_directed(NodeIndex::new(i), petgraph::Outgoing) {
            indegree[m.index()] -= 1;
            if indegree[m.index()] == 0 {
                ready.insert(m.index());
            }
        }
    }
    order
}
