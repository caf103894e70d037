//! Equilibrium propagation against the true gradient (`Role::Equilibrium`): a table of the
//! methods (final loss, held-out perplexity, wall time, EP's mean cosine to the true gradient)
//! and their loss curves in one plot.

use serde_json::Value as Json;

use super::plots::{Plot, Series, Style};
use super::session::{Instance, Role, Session};
use super::table::{cell, ppl, sig, Table};

/// The hyperparameters the notes list (one value, or each value when the rows differ).
const SETTINGS: [&str; 11] = [
    "output",
    "hidden",
    "context",
    "batch",
    "optimizer",
    "lr",
    "beta",
    "eta",
    "tolerance",
    "free_steps",
    "nudged_steps",
];

/// A parameter as written in the pipeline: numbers and lists as JSON, strings bare.
fn setting(v: Option<&Json>) -> String {
    match v {
        Some(Json::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "—".into(),
    }
}

/// `train → eval` of an instance (its parameters until it has run).
fn data_label(inst: &Instance) -> String {
    match (inst.metric_str("data"), inst.metric_str("eval_data")) {
        (Some(d), Some(e)) => format!("{d} → {e}"),
        _ => cell(inst.params.get("data")),
    }
}

fn method(inst: &Instance) -> String {
    inst.metric_str("method").map(str::to_string).unwrap_or_else(|| cell(inst.params.get("method")))
}

/// One row per trained network, in pipeline order.
pub fn table(s: &Session) -> Option<Table> {
    let mut t = Table::new(
        "equilibrium",
        "Equilibrium propagation vs the true gradient",
        &[
            ("stage", false),
            ("method", false),
            ("data (train → held out)", false),
            ("steps", true),
            ("final loss", true),
            ("held-out ppl", true),
            ("unigram ppl", true),
            ("wall time (s)", true),
            ("mean cosine", true),
        ],
    );
    let mut settings: Vec<(&str, Vec<String>)> = SETTINGS.iter().map(|k| (*k, Vec::new())).collect();
    for (_, inst) in s.of_role(Role::Equilibrium) {
        for (k, values) in settings.iter_mut() {
            let v = setting(inst.params.get(*k));
            if !values.contains(&v) {
                values.push(v);
            }
        }
        let num = |k: &str, f: fn(f64) -> String| {
            inst.metric_f64(k).map(f).unwrap_or_else(|| if inst.has_metrics() { "—".into() } else { inst.absent() })
        };
        let cosine = match inst.metric("cosine_mean") {
            Some(Json::Number(n)) => format!("{:.5}", n.as_f64().unwrap_or(f64::NAN)),
            _ if inst.has_metrics() => "— (exact)".into(),
            _ => inst.absent(),
        };
        t.push(vec![
            inst.name.clone(),
            method(inst),
            data_label(inst),
            cell(inst.metric("steps").or_else(|| inst.params.get("steps"))),
            num("final_loss", |x| format!("{x:.4}")),
            num("ppl", ppl),
            num("unigram_ppl", ppl),
            num("seconds", sig),
            cosine,
        ]);
    }
    if t.rows.is_empty() {
        return None;
    }
    let shown: Vec<String> = settings.iter().map(|(k, v)| format!("{k} {}", v.join(" / "))).collect();
    t.notes.push(shown.join(", "));
    t.footnotes = vec![
        "final loss: mean cross-entropy (nats/byte) at the free equilibria of the training batches, over the last 10% of steps; held-out ppl: exp of the mean cross-entropy over the held-out bytes; unigram ppl: those bytes under the training text's smoothed byte frequencies (a model that ignores its context).".into(),
        "mean cosine: between EP's update and the true gradient of the loss at the free equilibrium (implicit differentiation) on the same batch, averaged over the logged steps; backprop is that true gradient (— exact).".into(),
        "wall time: training only, without the cosine checks' extra true gradients; every method trains the same initial network on the same batches with the same optimiser.".into(),
    ];
    Some(t)
}

/// The loss curves of every method, each averaged over blocks of steps (a batch's loss is
/// noisy). Labelled by method, with the data when runs differ in it, or with the stage name when
/// that still leaves two curves alike.
pub fn loss_plot(s: &Session) -> Option<Plot> {
    let mut curves: Vec<(&Instance, Vec<(f64, f64)>)> = Vec::new();
    let mut blocks = Vec::new();
    for (_, inst) in s.of_role(Role::Equilibrium) {
        let Some(curve) = inst.metric("loss").and_then(Json::as_array) else { continue };
        let pairs: Vec<(f64, f64)> =
            curve.iter().filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?))).collect();
        if pairs.is_empty() {
            continue;
        }
        let block = pairs.len().div_ceil(50);
        if !blocks.contains(&block) {
            blocks.push(block);
        }
        let points = pairs
            .chunks(block)
            .map(|c| (c[c.len() - 1].0, c.iter().map(|p| p.1).sum::<f64>() / c.len() as f64))
            .collect();
        curves.push((inst, points));
    }
    let first = data_label(curves.first()?.0);
    let several_data = curves.iter().any(|(i, _)| data_label(i) != first);
    let label = |i: &Instance| if several_data { format!("{} — {}", method(i), data_label(i)) } else { method(i) };
    let labels: Vec<String> = curves.iter().map(|(i, _)| label(i)).collect();
    let alike = labels.iter().enumerate().any(|(j, l)| labels[..j].contains(l));
    let series = curves
        .into_iter()
        .zip(labels)
        .map(|((inst, points), l)| {
            let label = if alike { format!("{} — {}", method(inst), inst.name) } else { l };
            Series { label, points, style: Style::Line }
        })
        .collect();
    let blocks: Vec<String> = blocks.iter().map(usize::to_string).collect();
    Some(Plot {
        name: "equilibrium-loss".into(),
        title: format!("Training loss: equilibrium propagation vs the true gradient ({})", s.device),
        x_label: "step".into(),
        y_label: format!("training loss (nats/byte, mean over blocks of {} steps)", blocks.join(" / ")),
        log_x: false,
        log_y: false,
        legend_left: false,
        series,
    })
}
