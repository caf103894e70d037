//! Exact markdown of the committed sessions (no plots: those are tested in plots.rs).

use std::path::PathBuf;

use rpt_flow::report::{self, flat, Session};

fn dir() -> PathBuf {
    super::support::repo().join("tests/report/golden")
}

pub fn session(name: &str) -> Session {
    Session::read(&dir().join(format!("{name}.json"))).unwrap()
}

pub fn check(expected_file: &str, actual: &str) {
    let path = dir().join(expected_file);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if expected != actual {
        let first = expected.lines().zip(actual.lines()).position(|(a, b)| a != b);
        panic!(
            "{expected_file} differs (first differing line {:?}); UPDATE_GOLDEN=1 regenerates it\n--- actual ---\n{actual}",
            first.map(|l| l + 1)
        );
    }
}

#[test]
fn pruning_sweep_of_a_real_tiny_run() {
    check("sparsity.tiny.md", &report::markdown(&session("sparsity.tiny"), &[]));
}

#[test]
fn perplexity_list_and_prompts_of_inference() {
    check("inference.tiny.md", &report::markdown(&session("inference.tiny"), &[]));
}

#[test]
fn progressive_chain_with_control_row() {
    let s = session("progressive.tiny");
    let md = report::markdown(&s, &[]);
    check("progressive.tiny.md", &md);
    let t = report::main_table(&s).unwrap();
    assert_eq!(t.id, "progressive#1");
    let first: Vec<&str> = t.rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(first, ["0% (baseline)", "10%", "20%", "30%"]);
    // The single control has had one fine-tune: it is the 10% level's control, and only its.
    let control = t.columns.iter().position(|c| c == "0% control").unwrap();
    let cells: Vec<&str> = t.rows.iter().map(|r| r[control].as_str()).collect();
    assert_ne!(cells[1], "—");
    assert_eq!(&cells[2..], ["—", "—"]);
}

#[test]
fn notebook_and_rigorous_side_by_side_with_their_protocol_differences() {
    // Sessions of `run pipelines/progressive.toml --profile tiny` and `… --profile tiny --profile rigorous`.
    let sessions = [session("progressive-sparsity.tiny"), session("progressive-sparsity.rigorous.tiny")];
    let md = report::comparison_markdown(&sessions, &[]);
    check("progressive.notebook-vs-rigorous.md", &md);
    let diffs = report::protocol_differences(&sessions);
    for want in [
        "eval-ppl `protocol`: A `rpt-notebook` · B `chunks`",
        "eval-ppl `encode`: A `per-row` · B `joined`",
        "prune `rule`: A `notebook` · B `exact`",
        "finetune `masks`: A `ignore` · B `keep`",
        "finetune `optimizer_precision`: A `model` · B `f32`",
    ] {
        assert!(diffs.iter().any(|d| d.starts_with(want)), "no line `{want}…` in {diffs:#?}");
    }
    assert!(!diffs.iter().any(|d| d.contains("`model`:")), "both ran the same model: {diffs:#?}");
    let above = md.find("## Protocol differences").expect("the differences are listed");
    assert!(above < md.find("## Progressive pruning").unwrap(), "above the tables");
    let t = &report::compare(&sessions)[0];
    assert_eq!(&t.columns[..3], ["sparsity", "achieved (%) [A]", "achieved (%) [B]"]);
}

#[test]
fn residuals_perturbation_and_interventions() {
    let s = session("criticality.tiny");
    check("criticality.tiny.md", &report::markdown(&s, &[]));
    let ids: Vec<String> = report::tables(&s).into_iter().map(|t| t.id).collect();
    assert_eq!(
        ids,
        [
            "interventions#1",
            "residuals:hooks",
            "criticality",
            "perturbation:perturb",
            "perturbation:pruned-perturb",
            "perplexity",
            "text",
            "models"
        ]
    );
}

#[test]
fn comparison_puts_sessions_side_by_side() {
    let sessions = [session("progressive.tiny"), session("progressive")];
    let md = report::comparison_markdown(&sessions, &[]);
    check("progressive.tiny-vs-progressive.md", &md);
    let t = &report::compare(&sessions)[0];
    assert_eq!(
        &t.columns[..5],
        ["sparsity", "achieved (%) [A]", "achieved (%) [B]", "ppl before [A]", "ppl before [B]"]
    );
    // The level the full run has not reached yet shows its status.
    let last = t.rows.last().unwrap();
    assert_eq!(last[0], "30%");
    assert_eq!(last[4], "pending", "ppl before [B]");
}

#[test]
fn flat_rows_for_notebooks() {
    let s = session("sparsity.tiny");
    let rows = flat::rows(&s, None);
    assert_eq!(rows.len(), s.instances.len());
    let csv = flat::csv(&rows);
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    for col in ["instance", "kind", "key", "model.sparsity", "param.sparsity", "metric.ppl", "metric.protocol.seq_len"]
    {
        assert!(header.contains(&col), "missing column {col} in {header:?}");
    }
    assert!(header.contains(&"metric.outputs.count"), "arrays are summarised by their length");
    assert!(
        !header.iter().any(|h| h.starts_with("metric.per_tensor.model")),
        "per-tensor tables are not spread into columns"
    );
    assert_eq!(lines.count(), s.instances.len());
    let ppl = rows.iter().find(|r| r["instance"] == "level[sparsity=0.2].ppl").unwrap();
    assert_eq!(ppl["model.sparsity"], 0.2);
    assert_eq!(ppl["model.prune"], "level[sparsity=0.2].pruned");
    assert_eq!(ppl["metric.protocol.name"], "chunks");
    let back: serde_json::Value = serde_json::from_str(&flat::json(&rows)).unwrap();
    assert_eq!(back.as_array().unwrap().len(), rows.len());
}

#[test]
fn baseline_is_the_unmodified_eval_with_the_same_protocol() {
    let s = session("inference.tiny");
    // Two protocols on the base model: each is its own baseline; neither is a sweep.
    let t = report::main_table(&s).unwrap();
    assert_eq!(t.id, "perplexity");
    assert_eq!(t.rows.len(), 2);
    let protocols: Vec<&str> = t.rows.iter().map(|r| r[2].as_str()).collect();
    assert_eq!(protocols, ["chunks", "llama-cpp"]);
}
