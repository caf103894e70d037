//! The exported model's `README.md`: a Hugging Face model card (YAML front matter, then what the
//! model is, where it comes from and what was measured on it), with the recipe that made it.

use serde_json::{Map, Value as Json};

use super::hf::{ModelFacts, LOGITS_FILE};
use super::provenance::{Node, Origin, Provenance};

/// The card's markdown.
pub fn render(p: &Provenance, facts: &ModelFacts, recipe: &str) -> String {
    let t = p.target();
    let lineage = p.lineage();
    let kinds: Vec<&str> = lineage.iter().map(|&i| p.nodes[i].kind.as_str()).collect();
    let mut s = String::new();

    // Front matter.
    s.push_str("---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- rpt-flow\n");
    s.push_str(&format!("- {}\n", facts.arch));
    if facts.arch == "bitnet" {
        s.push_str("- bitnet-b1.58\n");
    }
    for (kind, tag) in [("prune", "pruned"), ("finetune", "fine-tuned")] {
        if kinds.contains(&kind) {
            s.push_str(&format!("- {tag}\n"));
        }
    }
    if let Some(hub) = lineage.iter().find_map(|&i| hub_repo(&p.nodes[i])) {
        s.push_str(&format!("base_model: {hub}\n"));
    }
    s.push_str("---\n\n");

    s.push_str(&format!("# {} — `{}`\n\n", p.pipeline, t.name));
    if !p.description.is_empty() {
        s.push_str(&format!("{}\n\n", p.description));
    }
    s.push_str(&format!(
        "Exported by rpt-flow {} from its cache: the output of the `{}` stage `{}` of the pipeline `{}`.\n\n",
        env!("CARGO_PKG_VERSION"),
        t.kind,
        t.name,
        p.pipeline
    ));
    s.push_str("| | |\n|---|---|\n");
    row(&mut s, "pipeline", &format!("`{}` ({})", p.pipeline, p.file));
    if let Origin::Session(path) = &p.origin {
        row(&mut s, "session", path);
    }
    row(&mut s, "instance", &format!("`{}`", t.name));
    row(&mut s, "stage kind", &format!("`{}` (version {})", t.kind, facts.entry.version));
    row(&mut s, "cache key", &format!("`{}`", t.key));
    row(&mut s, "profiles", &list_or_none(&p.profiles));
    row(&mut s, "overrides", &list_or_none(&p.overrides));
    row(&mut s, "device class", &p.device);
    row(&mut s, "architecture", &format!("{} ({})", facts.arch, architecture(&facts.arch)));
    row(
        &mut s,
        "weights",
        &format!(
            "{} projections, stored as {}; rpt-flow computed in {} with quantization `{}`",
            facts.weight_format, facts.stored_dtype, facts.settings.dtype, facts.settings.quantization
        ),
    );
    row(&mut s, "weights copied from", &facts.weights_from);
    row(&mut s, "entry written by", &format!("rpt-flow {}", facts.entry.rpt_flow_version));
    s.push('\n');

    s.push_str("## Parameters\n\n");
    params_table(&mut s, &t.params);

    s.push_str("\n## Metrics\n\n");
    let metrics_from = match &p.origin {
        Origin::Pipeline => "the cache entries' manifests".to_string(),
        Origin::Session(path) => format!("the session file {path}"),
    };
    s.push_str(&format!(
        "Read from {metrics_from}. Scalar values are shown; `rpt_flow.json` has every metric, lists and tables \
         included. Only what the pipeline measured is here: nothing was evaluated for this card.\n\n"
    ));
    s.push_str(&format!("### Of this stage (`{}`)\n\n", t.kind));
    metrics_table(&mut s, t.metrics.as_ref());
    let (models, readers): (Vec<usize>, Vec<usize>) = p.readers().into_iter().partition(|&i| p.nodes[i].model);
    s.push_str("\n### Measured on this model (stages that read it)\n\n");
    if readers.is_empty() {
        s.push_str("No stage of the pipeline measures this model.\n");
    } else {
        s.push_str("| instance | kind | metric | value |\n|---|---|---|---|\n");
        for &i in &readers {
            let n = &p.nodes[i];
            match &n.metrics {
                None => s.push_str(&format!("| `{}` | {} | (not computed or not cached) | |\n", n.name, n.kind)),
                Some(m) => {
                    let scalars: Vec<(&String, String)> = scalars(m).collect();
                    if scalars.is_empty() {
                        s.push_str(&format!("| `{}` | {} | (no scalar metrics) | |\n", n.name, n.kind));
                    }
                    for (k, v) in scalars {
                        s.push_str(&format!("| `{}` | {} | {k} | {v} |\n", n.name, n.kind));
                    }
                }
            }
        }
    }

    if !models.is_empty() {
        let names: Vec<String> = models.iter().map(|&i| format!("`{}`", p.nodes[i].name)).collect();
        s.push_str(&format!("\nModels computed from this one in the pipeline: {}.\n", names.join(", ")));
    }

    s.push_str(
        "\n## Lineage\n\nThe instances this model was computed from, inputs first (keys are rpt-flow cache keys).\n\n",
    );
    for (step, &i) in lineage.iter().enumerate() {
        let n = &p.nodes[i];
        let inputs: Vec<String> = n.inputs.iter().map(|(slot, from)| format!("{slot} ← `{from}`")).collect();
        s.push_str(&format!(
            "{}. `{}` — {} — key `{}`{}\n",
            step + 1,
            n.name,
            n.kind,
            short(&n.key),
            if inputs.is_empty() { String::new() } else { format!(" — {}", inputs.join(", ")) }
        ));
        let params: Vec<String> = n.params.iter().map(|(k, v)| format!("{k} = {}", compact(v))).collect();
        if !params.is_empty() {
            s.push_str(&format!("   - {}\n", params.join(", ")));
        }
    }

    s.push_str("\n## Recipe\n\nThe stages of the lineage as an rpt-flow pipeline (also `recipe.toml`); ");
    s.push_str("`rpt-flow plan recipe.toml` shows the keys above.\n\n```toml\n");
    s.push_str(recipe);
    s.push_str("```\n");

    s.push_str("\n## Use\n\n```python\nfrom transformers import AutoModelForCausalLM");
    if facts.has_tokenizer {
        s.push_str(", AutoTokenizer");
    }
    s.push_str("\n\nmodel = AutoModelForCausalLM.from_pretrained(\"PATH\")\n");
    if facts.has_tokenizer {
        s.push_str("tokenizer = AutoTokenizer.from_pretrained(\"PATH\")\n");
    }
    s.push_str("```\n\n");
    if facts.with_logits {
        s.push_str(&format!(
            "`{LOGITS_FILE}` holds rpt-flow's own logits for a few prompts: `scripts/check_export.py PATH` (in the \
             rpt-flow repository) loads this folder with transformers and compares.\n\n"
        ));
    }
    s.push_str("## Notes\n\n");
    for n in &facts.notes {
        s.push_str(&format!("- {n}\n"));
    }
    if kinds.contains(&"prune") {
        s.push_str(
            "- Pruned weights are zeros in `model.safetensors`; rpt-flow's pruning mask (`mask.safetensors` in the \
             cache) is not exported, so a further fine-tune outside rpt-flow may regrow them.\n",
        );
    }
    s.push_str("- `rpt_flow.json` holds this provenance in machine-readable form.\n");
    s
}

fn row(s: &mut String, k: &str, v: &str) {
    s.push_str(&format!("| {k} | {} |\n", v.replace('|', "\\|")));
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.iter().map(|x| format!("`{x}`")).collect::<Vec<_>>().join(", ")
    }
}

fn architecture(arch: &str) -> &'static str {
    match arch {
        "bitnet" => "BitNetForCausalLM",
        _ => "LlamaForCausalLM",
    }
}

fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

/// `hf:org/name[@rev]` of a load stage: the card's `base_model`.
fn hub_repo(n: &Node) -> Option<String> {
    let m = n.params.get("model")?.as_str()?.strip_prefix("hf:")?;
    Some(m.split('@').next().unwrap_or(m).to_string()).filter(|_| n.kind == "load")
}

fn compact(v: &Json) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

fn params_table(s: &mut String, params: &Map<String, Json>) {
    if params.is_empty() {
        s.push_str("None.\n");
        return;
    }
    s.push_str("| parameter | value |\n|---|---|\n");
    for (k, v) in params {
        s.push_str(&format!("| {k} | `{}` |\n", compact(v).replace('|', "\\|")));
    }
}

/// Top-level metrics that are numbers, strings or booleans, formatted.
fn scalars(m: &Map<String, Json>) -> impl Iterator<Item = (&String, String)> {
    m.iter().filter_map(|(k, v)| match v {
        Json::Number(n) => Some((k, n.to_string())),
        Json::String(x) => Some((k, x.replace('|', "\\|"))),
        Json::Bool(b) => Some((k, b.to_string())),
        _ => None,
    })
}

fn metrics_table(s: &mut String, m: Option<&Map<String, Json>>) {
    let Some(m) = m else {
        s.push_str("Not available.\n");
        return;
    };
    let shown: Vec<(&String, String)> = scalars(m).collect();
    if shown.is_empty() {
        s.push_str("No scalar metrics.\n");
    } else {
        s.push_str("| metric | value |\n|---|---|\n");
        for (k, v) in &shown {
            s.push_str(&format!("| {k} | {v} |\n"));
        }
    }
    let more = m.len() - shown.len();
    if more > 0 {
        s.push_str(&format!("\n({more} more, not scalar, in `rpt_flow.json`.)\n"));
    }
}
