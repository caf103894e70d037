//! The equilibrium-propagation pipeline's report: one table row per trained network (final loss,
//! held-out perplexity, wall time, EP's mean cosine to the true gradient) and the loss curves of
//! every method. The session is a real `run pipelines/equilibrium.toml --profile tiny`.

use rpt_flow::report::{self, Session, Table};

use super::golden::{check, session};

fn eq() -> Session {
    session("equilibrium.tiny")
}

fn row<'a>(t: &'a Table, stage: &str) -> &'a [String] {
    t.rows.iter().find(|r| r[0] == stage).unwrap_or_else(|| panic!("no row {stage} in {:#?}", t.rows))
}

#[test]
fn report_of_the_tiny_run() {
    check("equilibrium.tiny.md", &report::markdown(&eq(), &[]));
}

#[test]
fn the_equilibrium_table_has_a_row_per_trained_network() {
    let s = eq();
    let ids: Vec<String> = report::tables(&s).into_iter().map(|t| t.id).collect();
    assert_eq!(ids, ["equilibrium"], "no other table: nothing here is a model artifact");
    let t = report::main_table(&s).unwrap();
    assert_eq!(
        t.columns,
        [
            "stage",
            "method",
            "data (train → held out)",
            "steps",
            "final loss",
            "held-out ppl",
            "unigram ppl",
            "wall time (s)",
            "mean cosine"
        ]
    );
    assert_eq!(t.rows.len(), 6);
    let ep = row(&t, "facts[method=ep].train");
    assert_eq!(ep[1..7], ["ep", "synthetic:facts:train → synthetic:facts:test", "200", "3.1091", "21.31", "22.32"]);
    assert_eq!(ep[8], "1.00000", "β = 0.01: EP is the gradient to five decimals");
    assert_eq!(row(&t, "wiki[method=backprop].train")[8], "— (exact)");
    // Every run trained the same network on the same batches: the notes list one value each.
    assert_eq!(
        t.notes,
        ["output readout, hidden [16,16], context 2, batch 8, optimizer adam, lr 0.01, beta 0.01, eta 0.5, tolerance 1e-6, free_steps 200, nudged_steps 100"]
    );
    assert!(t.footnotes.iter().any(|f| f.starts_with("mean cosine: between EP's update")), "{:?}", t.footnotes);
}

#[test]
fn a_run_without_results_shows_its_status_and_differing_settings_are_listed() {
    let mut s = eq();
    let i = s.index_of("wiki[method=ep].train").unwrap();
    s.instances[i].metrics.clear();
    s.instances[i].params.insert("beta".into(), 0.1.into());
    let t = report::main_table(&s).unwrap();
    let r = row(&t, "wiki[method=ep].train");
    let status = s.instances[i].absent();
    assert_eq!(r[4..], [status.clone(), status.clone(), status.clone(), status.clone(), status]);
    assert!(t.notes[0].contains("beta 0.01 / 0.1"), "{:?}", t.notes);
}

#[test]
fn the_loss_plot_has_a_curve_per_run() {
    let s = eq();
    let ps = report::plots::plots(&s);
    let names: Vec<&str> = ps.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["equilibrium-loss"]);
    let p = &ps[0];
    // Both tiny corpora are synthetic facts (another seed stands in for WikiText), so the curves
    // are told apart by stage.
    let labels: Vec<&str> = p.series.iter().map(|x| x.label.as_str()).collect();
    assert_eq!(labels[0], "ep — facts[method=ep].train");
    assert_eq!(labels[5], "backprop — wiki[method=backprop].train");
    for x in &p.series {
        assert_eq!(x.points.len(), 50, "200 steps in blocks of 4");
        assert_eq!(x.points.last().unwrap().0, 199.0);
        assert!(x.points[0].1 > x.points.last().unwrap().1 + 1.0, "{}: the loss falls", x.label);
    }
    assert!(p.y_label.contains("blocks of 4 steps"), "{}", p.y_label);

    // One corpus: the method alone names a curve.
    let mut one = eq();
    one.instances.retain(|i| i.name.starts_with("facts"));
    let ps = report::plots::plots(&one);
    let labels: Vec<&str> = ps[0].series.iter().map(|x| x.label.as_str()).collect();
    assert_eq!(labels, ["ep", "ep-symmetric", "backprop"]);
}
