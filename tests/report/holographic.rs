//! The holographic-attention pipeline's report: the attention table (full against each swap,
//! before and after adaptation), the speed table and its log-log plot. The session is a real
//! `run pipelines/holographic.toml --profile tiny` (generated token ids left out).

use rpt_flow::report::{self, flat, lineage, Session, Table};

use super::golden::{check, session};

fn holo() -> Session {
    session("holographic.tiny")
}

fn table(s: &Session, id: &str) -> Table {
    report::tables(s).into_iter().find(|t| t.id == id).unwrap_or_else(|| panic!("no table {id}"))
}

fn row<'a>(t: &'a Table, key: &[&str]) -> &'a [String] {
    t.rows.iter().find(|r| r[..key.len()] == *key).unwrap_or_else(|| panic!("no row {key:?} in {:#?}", t.rows))
}

#[test]
fn report_of_the_tiny_run() {
    check("holographic.tiny.md", &report::markdown(&holo(), &[]));
}

#[test]
fn attention_table_is_the_main_table_with_a_row_per_swap() {
    let s = holo();
    let ids: Vec<String> = report::tables(&s).into_iter().map(|t| t.id).collect();
    assert_eq!(ids, ["attention#1", "speed", "finetune", "text", "models"], "no flat perplexity list");
    let t = report::main_table(&s).unwrap();
    assert_eq!(t.id, "attention#1");
    let first: Vec<&str> = t.rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        first,
        ["full", "holographic w=4 R=2", "holographic w=8 R=2", "holographic w=4 R=4", "holographic w=8 R=4"]
    );
    assert_eq!(t.rows[0], ["full", "all", "—", "—", "all", "2.546", "—", "—", "correct (3/3)"]);
    // ppl before: the swap's own eval; after: the eval of its fine-tune; vs full from after.
    assert_eq!(
        row(&t, &["holographic w=4 R=2"]),
        ["holographic w=4 R=2", "all", "4", "2", "12", "3.146", "3.121", "+22.6", "correct (2/3)"]
    );
    assert_eq!(row(&t, &["holographic w=8 R=4"])[4..8], ["40", "3.225", "3.209", "+26.1"]);
    assert!(t.notes.iter().any(|n| n == "boundary_dim 32"), "{:?}", t.notes);
    assert!(t.footnotes.iter().any(|f| f.starts_with("full: `full`, the eval-ppl")), "{:?}", t.footnotes);
}

#[test]
fn a_swapped_model_is_never_the_baseline() {
    let mut s = holo();
    let before = s.index_of("holo[regions=2,window=4].before").unwrap();
    let after = s.index_of("holo[regions=2,window=4].after").unwrap();
    let swapped = s.index_of("holo[regions=2,window=4].swapped").unwrap();
    let p = lineage::position(&s, before);
    assert_eq!(p.swap, Some(swapped));
    assert_eq!((p.prune, p.tuned), (None, None));
    assert!(!p.is_base(), "swapped, though neither pruned nor fine-tuned");
    let pa = lineage::position(&s, after);
    assert_eq!(pa.swap, Some(swapped), "the nearest swap, above the fine-tune");
    assert!(pa.tuned.is_some());
    assert!(lineage::position(&s, s.index_of("full").unwrap()).is_base());
    let proto = lineage::Protocol::of(&s.instances[before]).unwrap();
    assert_eq!(lineage::baseline(&s, &p, &proto), s.index_of("full"));

    // Without the full model's eval there is no baseline: the swapped evals do not stand in.
    s.instances.retain(|i| i.name != "full");
    let p = lineage::position(&s, s.index_of("holo[regions=2,window=4].before").unwrap());
    assert_eq!(lineage::baseline(&s, &p, &proto), None);
    let t = report::main_table(&s).unwrap();
    assert_eq!(t.rows[0][5..8], ["—", "—", "—"]);
    assert!(t.rows.iter().all(|r| r[7] == "—"), "no change without the full ppl: {:#?}", t.rows);
    assert!(t.footnotes.iter().any(|f| f.starts_with("no full-attention perplexity")), "{:?}", t.footnotes);
}

#[test]
fn speed_table_has_a_row_per_model_and_length() {
    let mut s = holo();
    let t = table(&s, "speed");
    assert_eq!(t.key_columns, 2);
    assert_eq!(t.rows.len(), 5 * 3);
    assert_eq!(row(&t, &["full", "64"]), ["full", "64", "5327", "—", "0.01201", "0.0", "32.1"]);
    // vs full: 10619 / 7027 tokens/s at 128 tokens.
    assert_eq!(
        row(&t, &["holographic w=8 R=2", "128"]),
        ["holographic w=8 R=2", "128", "10619", "1.51×", "0.01205", "0.0", "82.9"]
    );
    assert!(t.notes.iter().any(|n| n == "timed on cpu (1 threads), batch 1"), "{:?}", t.notes);
    assert!(!t.footnotes.iter().any(|f| f.starts_with('†')), "every length is within the context");

    // A length past the trained context is marked; memory not measured (CUDA) is a dash.
    let i = s.index_of("holo[regions=4,window=8].speed").unwrap();
    let last = &mut s.instances[i].metrics["lengths"][2];
    last["beyond_context"] = true.into();
    last["peak_memory_mb"] = serde_json::Value::Null;
    last["forward_memory_mb"] = serde_json::Value::Null;
    let t = table(&s, "speed");
    assert_eq!(row(&t, &["holographic w=8 R=4", "256 †"])[2..], ["9759", "1.41×", "0.02623", "—", "—"]);
    let dagger = "†: beyond the model's trained context (max_position_embeddings = 256)";
    assert!(t.footnotes.iter().any(|f| f.starts_with(dagger)), "{:?}", t.footnotes);
}

#[test]
fn speed_plot_is_log_log_with_a_series_per_timed_model() {
    let s = holo();
    let ps = report::plots::plots(&s);
    let p = ps.iter().find(|p| p.name == "speed-vs-length").expect("a speed plot");
    assert!(p.log_x && p.log_y);
    let labels: Vec<&str> = p.series.iter().map(|x| x.label.as_str()).collect();
    assert_eq!(
        labels,
        ["full", "holographic w=4 R=2", "holographic w=8 R=2", "holographic w=4 R=4", "holographic w=8 R=4"]
    );
    let xs: Vec<f64> = p.series[0].points.iter().map(|q| q.0).collect();
    assert_eq!(xs, [64.0, 128.0, 256.0]);
    assert!((p.series[0].points[2].1 - 6908.03).abs() < 0.01);
    // The x axis is ticked at the lengths themselves (powers of two).
    let svg = report::plots::svg(p, true).unwrap();
    for tick in ["64", "128", "256"] {
        assert!(svg.contains(&format!(">\n{tick}\n</text>")), "tick {tick}");
    }
}

#[test]
fn adaptations_are_not_merged_into_a_control_loss_curve() {
    let ps = report::plots::plots(&holo());
    let loss = ps.iter().find(|p| p.name == "finetune-loss").unwrap();
    let labels: Vec<&str> = loss.series.iter().map(|x| x.label.as_str()).collect();
    assert_eq!(labels, ["holographic w=4 R=2", "holographic w=8 R=2", "holographic w=4 R=4", "holographic w=8 R=4"]);
    assert!(loss.series.iter().all(|x| x.points.len() == 6));
    assert!(!ps.iter().any(|p| p.name == "ppl-vs-sparsity"), "nothing is pruned");
}

#[test]
fn flat_rows_name_the_swap() {
    let s = holo();
    let rows = flat::rows(&s, None);
    let r = rows.iter().find(|r| r["instance"] == "holo[regions=4,window=4].after").unwrap();
    assert_eq!(r["model.swap"], "holo[regions=4,window=4].swapped");
    assert_eq!(r["model.finetune"], "holo[regions=4,window=4].adapted");
    let full = rows.iter().find(|r| r["instance"] == "full").unwrap();
    assert!(full["model.swap"].is_null());
}
