//! Reports: the researcher's tables and plots from session files, and flat rows for notebooks.
//! Reads sessions (or sessions synthesised from the cache by `cli`); knows nothing of models.
//! The rules (table shapes, the baseline, rows, flattening) are in docs/report.md.

pub mod build;
pub mod equilibrium;
pub mod flat;
pub mod lineage;
pub mod plots;
pub mod session;
pub mod table;

use std::path::Path;

pub use plots::{Plot, Written};
pub use session::{Instance, RunStatus, Session, StageStatus};
pub use table::Table;

/// Every table of one session, the main one first.
pub fn tables(s: &Session) -> Vec<Table> {
    build::tables(s)
}

/// The pipeline's main table: the most specific shape present (attention swaps, progressive,
/// pruning sweep, interventions, residuals, perturbation, perplexity list, fine-tune, text,
/// models).
pub fn main_table(s: &Session) -> Option<Table> {
    tables(s).into_iter().next()
}

/// Session labels in a comparison: A, B, C, …
pub fn label(i: usize) -> String {
    char::from(b'A' + (i % 26) as u8).to_string()
}

fn header(s: &Session) -> String {
    let mut out = String::new();
    if !s.description.is_empty() {
        out.push_str(&format!("{}\n\n", s.description));
    }
    let none = |v: &[String]| if v.is_empty() { "none".to_string() } else { v.join(", ") };
    out.push_str(&format!(
        "- pipeline `{}` (`{}`), profiles: {}, overrides: {}, seed {}\n",
        s.pipeline,
        s.file,
        none(&s.profiles),
        none(&s.overrides),
        s.seed
    ));
    let file = s.path.as_ref().and_then(|p| p.file_name()).map(|f| f.to_string_lossy().into_owned());
    let when = match s.finished.as_deref() {
        None | Some("") => s.started.clone(),
        Some(end) => format!("{} → {end}", s.started),
    };
    match (s.status.as_str(), file) {
        (status, _) if status == RunStatus::FromCache.as_str() => {
            out.push_str("- read from the cache without running anything (missing = not computed yet)\n")
        }
        (status, Some(f)) => out.push_str(&format!("- session `{f}`: {status}, {when}\n")),
        (status, None) => out.push_str(&format!("- status {status}, {when}\n")),
    }
    let mut counts: Vec<(StageStatus, usize)> = Vec::new();
    for i in &s.instances {
        match counts.iter_mut().find(|(k, _)| *k == i.status) {
            Some(c) => c.1 += 1,
            None => counts.push((i.status, 1)),
        }
    }
    let counts: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
    out.push_str(&format!(
        "- device {}, {} instances ({})\n",
        if s.device.is_empty() { "?" } else { &s.device },
        s.instances.len(),
        counts.join(", ")
    ));
    out
}

fn plot_section(dir_relative: &[Written]) -> String {
    if dir_relative.is_empty() {
        return String::new();
    }
    let mut out = "## Plots\n\n".to_string();
    for w in dir_relative {
        let name = |p: &Path| p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        out.push_str(&format!("![{}]({})", w.title, name(&w.svg)));
        if let Some(png) = &w.png {
            out.push_str(&format!(" ([PNG]({}))", name(png)));
        }
        if let Some(n) = &w.note {
            out.push_str(&format!(" — {n}"));
        }
        out.push_str("\n\n");
    }
    out
}

/// The markdown report of one session; `plots` are linked by file name (they sit beside it).
pub fn markdown(s: &Session, plots: &[Written]) -> String {
    let mut out = format!("# Report: {}\n\n{}\n", s.stem(), header(s));
    for t in tables(s) {
        out.push_str(&t.markdown());
        out.push('\n');
    }
    out.push_str(&plot_section(plots));
    out.trim_end().to_string() + "\n"
}

/// The markdown of a comparison: the same table shapes with one column per session.
pub fn comparison_markdown(sessions: &[Session], plots: &[Written]) -> String {
    let stems: Vec<String> = sessions.iter().map(Session::stem).collect();
    let mut out = format!("# Comparison: {}\n\n", stems.join(" vs "));
    for (i, s) in sessions.iter().enumerate() {
        out.push_str(&format!("### {} = {}\n\n{}\n", label(i), s.stem(), header(s)));
    }
    let diffs = protocol_differences(sessions);
    if !diffs.is_empty() {
        out.push_str(
            "## Protocol differences\n\nParameters that differ between the sessions (stages of the same name):\n\n",
        );
        for d in diffs {
            out.push_str(&format!("- {d}\n"));
        }
        out.push('\n');
    }
    for t in compare(sessions) {
        out.push_str(&t.markdown());
        out.push('\n');
    }
    out.push_str(&plot_section(plots));
    out.trim_end().to_string() + "\n"
}

/// The parameters that differ between sessions, over the instances of the same name in all of
/// them, one line per (kind, parameter, values) with how many instances it concerns; then the
/// instances that only some sessions have.
pub fn protocol_differences(sessions: &[Session]) -> Vec<String> {
    let shown = |v: Option<&serde_json::Value>| match v {
        None => "(default)".to_string(),
        Some(serde_json::Value::String(s)) => format!("`{s}`"),
        Some(other) => format!("`{other}`"),
    };
    // (kind, param, values per session) → instance names, in first-seen order.
    let mut diffs: Vec<(String, String, Vec<String>, Vec<String>)> = Vec::new();
    let Some(first) = sessions.first() else { return Vec::new() };
    for inst in &first.instances {
        let others: Option<Vec<&session::Instance>> =
            sessions[1..].iter().map(|s| s.instances.iter().find(|j| j.name == inst.name)).collect();
        let Some(others) = others else { continue };
        let all: Vec<&session::Instance> = std::iter::once(inst).chain(others).collect();
        let mut keys: Vec<&String> = all.iter().flat_map(|j| j.params.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            let values: Vec<String> = all.iter().map(|j| shown(j.params.get(k))).collect();
            if values.iter().all(|v| *v == values[0]) {
                continue;
            }
            match diffs.iter_mut().find(|d| d.0 == inst.kind && d.1 == *k && d.2 == values) {
                Some(d) => d.3.push(inst.name.clone()),
                None => diffs.push((inst.kind.clone(), k.clone(), values, vec![inst.name.clone()])),
            }
        }
    }
    let mut out: Vec<String> = diffs
        .into_iter()
        .map(|(kind, param, values, names)| {
            let vals: Vec<String> = values.iter().enumerate().map(|(i, v)| format!("{} {v}", label(i))).collect();
            let which = if names.len() == 1 { format!("`{}`", names[0]) } else { format!("{} stages", names.len()) };
            format!("{kind} `{param}`: {} ({which})", vals.join(" · "))
        })
        .collect();
    for (i, s) in sessions.iter().enumerate() {
        let only: Vec<&str> = s
            .instances
            .iter()
            .filter(|j| sessions.iter().any(|o| !o.instances.iter().any(|x| x.name == j.name)))
            .map(|j| j.name.as_str())
            .collect();
        if !only.is_empty() {
            let shown: Vec<String> = only.iter().take(4).map(|n| format!("`{n}`")).collect();
            let more = if only.len() > 4 { format!(" and {} more", only.len() - 4) } else { String::new() };
            out.push(format!("not in every session, only in {}: {}{more}", label(i), shown.join(", ")));
        }
    }
    out
}

/// Tables of several sessions merged by id: key columns once, every other column per session.
pub fn compare(sessions: &[Session]) -> Vec<Table> {
    let per: Vec<Vec<Table>> = sessions.iter().map(tables).collect();
    let mut ids: Vec<String> = Vec::new();
    for ts in &per {
        for t in ts {
            if !ids.contains(&t.id) {
                ids.push(t.id.clone());
            }
        }
    }
    let mut out = Vec::new();
    for id in ids {
        let found: Vec<(usize, &Table)> =
            per.iter().enumerate().filter_map(|(i, ts)| ts.iter().find(|t| t.id == id).map(|t| (i, t))).collect();
        let (_, first) = found[0];
        if found.len() == 1 {
            let mut t = first.clone();
            t.title = format!("{} (only in {})", t.title, label(found[0].0));
            out.push(t);
            continue;
        }
        let k = first.key_columns;
        let mut columns: Vec<(String, bool)> =
            first.columns[..k].iter().cloned().zip(first.numeric[..k].iter().copied()).collect();
        for (c, col) in first.columns.iter().enumerate().skip(k) {
            for (i, _) in &found {
                columns.push((format!("{col} [{}]", label(*i)), first.numeric[c]));
            }
        }
        let cols: Vec<(&str, bool)> = columns.iter().map(|(c, n)| (c.as_str(), *n)).collect();
        let mut t = Table::new(id.clone(), first.title.clone(), &cols);
        t.key_columns = k;
        let mut keys: Vec<Vec<String>> = Vec::new();
        for (_, tb) in &found {
            for r in &tb.rows {
                if !keys.contains(&r[..k].to_vec()) {
                    keys.push(r[..k].to_vec());
                }
            }
        }
        for key in keys {
            let mut row = key.clone();
            for c in k..first.columns.len() {
                for (_, tb) in &found {
                    let v = tb.rows.iter().find(|r| r[..k] == key[..]).and_then(|r| r.get(c)).cloned();
                    row.push(v.unwrap_or_else(|| "—".into()));
                }
            }
            t.rows.push(row); // cells already escaped
        }
        for (i, tb) in &found {
            for n in &tb.notes {
                t.notes.push(format!("{}: {n}", label(*i)));
            }
        }
        for (_, tb) in &found {
            for f in &tb.footnotes {
                if !t.footnotes.contains(f) {
                    t.footnotes.push(f.clone());
                }
            }
        }
        out.push(t);
    }
    out
}

/// `A: perplexity (x); B: perplexity (y)` → `perplexity (A: x; B: y)` when the parts before the
/// parentheses agree.
fn shorten(text: String, n: usize) -> String {
    let parts: Vec<&str> = text.split("; ").collect();
    if parts.len() != n || n < 2 {
        return text;
    }
    let mut head = None;
    let mut inner = Vec::new();
    for p in &parts {
        let Some((lab, rest)) = p.split_once(": ") else { return text };
        let Some((h, paren)) = rest.split_once(" (") else { return text };
        if head.is_some_and(|x| x != h) {
            return text;
        }
        head = Some(h);
        inner.push(format!("{lab}: {}", paren.trim_end_matches(')')));
    }
    format!("{} ({})", head.unwrap_or_default(), inner.join("; "))
}

/// Plots of several sessions: series of the same plot together, labelled `A: …`, `B: …`; axis
/// labels and titles that differ between sessions are given per session.
pub fn comparison_plots(sessions: &[Session]) -> Vec<Plot> {
    let mut out: Vec<Plot> = Vec::new();
    let mut texts: Vec<Vec<(String, String, String)>> = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        for mut p in plots::plots(s) {
            for se in &mut p.series {
                se.label = format!("{}: {}", label(i), se.label);
            }
            let text = (label(i), p.title.clone(), p.y_label.clone());
            match out.iter().position(|q| q.name == p.name) {
                Some(k) => {
                    out[k].series.extend(p.series);
                    texts[k].push(text);
                }
                None => {
                    out.push(p);
                    texts.push(vec![text]);
                }
            }
        }
    }
    for (q, t) in out.iter_mut().zip(&texts) {
        let join = |f: fn(&(String, String, String)) -> &String| {
            if t.iter().all(|x| f(x) == f(&t[0])) {
                f(&t[0]).clone()
            } else {
                t.iter().map(|x| format!("{}: {}", x.0, f(x))).collect::<Vec<_>>().join("; ")
            }
        };
        q.title = shorten(join(|x| &x.1), t.len());
        q.y_label = shorten(join(|x| &x.2), t.len());
        // Sessions of different sizes: a log axis once the values span more than 20×.
        let ys: Vec<f64> = q.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).collect();
        let (lo, hi) = ys.iter().fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
        if q.name != "residual-ratios" && lo > 0.0 && hi / lo > 20.0 {
            q.log_y = true;
        }
    }
    out
}
