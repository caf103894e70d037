//! Plots (plotters): perplexity vs sparsity, per-layer correction/branching ratios, perturbation
//! growth δ per layer, fine-tune loss curves, forward speed vs sequence length (log-log). Each is
//! written as SVG and PNG. Text is set in a font built into the binary (or the one `RPT_FONT`
//! names), never one looked up on the machine: the same plot gives the same PNG everywhere.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value as Json;

use super::build::{attention_label, ppl_groups, shape_of, Shape};
use super::lineage::{baseline, finetunes_above, position, sparsity_of};
use super::session::{Role, Session};
use super::table::pct;

pub const WIDTH: u32 = 1000;
pub const HEIGHT: u32 = 640;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// A line through the points, with markers.
    Line,
    /// Markers only.
    Points,
    /// A horizontal reference line at the first point's y across the plot.
    Reference,
}

#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
}

#[derive(Clone, Debug)]
pub struct Plot {
    /// File suffix: `<stem>.<name>.svg`.
    pub name: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Log x axis with ticks at powers of two (sequence lengths).
    pub log_x: bool,
    pub log_y: bool,
    /// Legend in the upper left (else upper right) corner: where the data usually is not.
    pub legend_left: bool,
    pub series: Vec<Series>,
}

/// What was written for one plot.
#[derive(Clone, Debug)]
pub struct Written {
    pub plot: String,
    pub title: String,
    pub svg: PathBuf,
    pub png: Option<PathBuf>,
    /// Something the reader should know about the files (an unusable `RPT_FONT`).
    pub note: Option<String>,
}

/// Ten distinct colours: the progressive chain has eight levels plus its control.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
    RGBColor(0, 0, 128),
];
/// Reference lines (baselines, criticality) in greys, one shade per line.
const REFERENCE: [RGBColor; 4] =
    [RGBColor(110, 110, 110), RGBColor(165, 165, 165), RGBColor(60, 60, 60), RGBColor(195, 195, 195)];

/// The font of plot text, registered once per process (see [`font`]).
#[derive(Clone, Debug)]
pub struct Font {
    /// What is used: `built-in Hack Regular` or the path in `RPT_FONT`.
    pub name: String,
    /// Why `RPT_FONT` was not used, when it was set and could not be.
    pub warning: Option<String>,
}

/// The built-in face: Hack Regular (MIT and Bitstream Vera licences), as the
/// `epaint_default_fonts` crate ships it.
pub const BUILT_IN: &str = "built-in Hack Regular";

/// Registers the font of plot text once: the TrueType/OpenType file named by `RPT_FONT` when it
/// is set and loads, else the font built into the binary. Never the fonts installed on the
/// machine, so a PNG comes out the same everywhere.
pub fn font() -> &'static Font {
    static FONT: OnceLock<Font> = OnceLock::new();
    FONT.get_or_init(|| {
        let mut warning = None;
        if let Some(path) = std::env::var_os("RPT_FONT").filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            match std::fs::read(&path) {
                Ok(bytes) => {
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    match plotters::style::register_font("sans-serif", FontStyle::Normal, bytes) {
                        Ok(()) => return Font { name: path.display().to_string(), warning: None },
                        Err(_) => {
                            warning = Some(format!("RPT_FONT={} is not a TrueType or OpenType font", path.display()))
                        }
                    }
                }
                Err(e) => warning = Some(format!("RPT_FONT={} cannot be read ({e})", path.display())),
            }
        }
        let registered =
            plotters::style::register_font("sans-serif", FontStyle::Normal, epaint_default_fonts::HACK_REGULAR);
        assert!(registered.is_ok(), "the built-in font parses");
        if let Some(w) = &warning {
            tracing::warn!("{w}; plots use the {BUILT_IN} font");
        }
        Font { name: BUILT_IN.to_string(), warning: warning.map(|w| format!("{w}; the {BUILT_IN} font was used")) }
    })
}

fn bounds(points: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    points.filter(|v| v.is_finite()).fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

fn x_range(plot: &Plot) -> Range<f64> {
    let data = plot.series.iter().filter(|s| s.style != Style::Reference).flat_map(|s| s.points.iter().map(|p| p.0));
    let (lo, hi) = bounds(data).unwrap_or((0.0, 1.0));
    if plot.log_x {
        // The same 4% margin, as a factor: a log axis cannot pad into zero or below.
        let pad = if hi > lo { (hi / lo).powf(0.04) } else { 1.5 };
        return (lo / pad)..(hi * pad);
    }
    let pad = if hi > lo { (hi - lo) * 0.04 } else { 1.0 };
    (lo - pad)..(hi + pad)
}

fn y_bounds(plot: &Plot) -> (f64, f64) {
    let (lo, hi) = bounds(plot.series.iter().flat_map(|s| s.points.iter().map(|p| p.1))).unwrap_or((0.0, 1.0));
    if plot.log_y {
        // Whole decades: plotters' log axis places its key points cleanly only on those.
        (10f64.powf(lo.log10().floor()) * 0.999, 10f64.powf(hi.log10().ceil()) * 1.001)
    } else {
        let pad = if hi > lo { (hi - lo) * 0.08 } else { lo.abs().max(1.0) * 0.1 };
        (lo - pad, hi + pad)
    }
}

macro_rules! t {
    ($e:expr) => {
        $e.map_err(|e| e.to_string())?
    };
}

fn draw<DB: DrawingBackend, X, Y>(
    root: &DrawingArea<DB, Shift>,
    plot: &Plot,
    text: bool,
    x: X,
    y: Y,
) -> Result<(), String>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    t!(root.fill(&WHITE));
    let xr = x_range(plot);
    let mut builder = ChartBuilder::on(root);
    builder.margin(18);
    if text {
        builder.caption(&plot.title, ("sans-serif", 24)).x_label_area_size(56).y_label_area_size(84);
    }
    let mut chart = t!(builder.build_cartesian_2d(x, y));
    if text {
        let integer_x = plot.series.iter().all(|s| s.points.iter().all(|p| p.0.fract() == 0.0));
        let x_fmt = move |v: &f64| {
            if !integer_x {
                super::table::sig(*v).trim_end_matches('0').trim_end_matches('.').to_string()
            } else if (v - v.round()).abs() < 1e-9 {
                format!("{:.0}", v)
            } else {
                String::new()
            }
        };
        let y_fmt = |v: &f64| {
            let t = super::table::sig(*v);
            if t.contains('.') && !t.contains('e') {
                t.trim_end_matches('0').trim_end_matches('.').to_string()
            } else {
                t
            }
        };
        t!(chart
            .configure_mesh()
            .y_labels(if plot.log_y { 20 } else { 10 })
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .x_desc(&plot.x_label)
            .y_desc(&plot.y_label)
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            // plotters crowds a log axis with light lines near each decade: leave them out there.
            .light_line_style(if plot.log_x || plot.log_y { WHITE } else { RGBColor(235, 235, 235) })
            .draw());
    } else {
        t!(chart.configure_mesh().x_labels(0).y_labels(0).light_line_style(RGBColor(235, 235, 235)).draw());
    }
    let mut colors = COLORS.iter().cycle();
    let mut greys = REFERENCE.iter().cycle();
    for s in &plot.series {
        let (color, points) = match s.style {
            Style::Reference => {
                let y = s.points.first().map(|p| p.1).unwrap_or(f64::NAN);
                (*greys.next().unwrap_or(&REFERENCE[0]), vec![(xr.start, y), (xr.end, y)])
            }
            _ => (*colors.next().unwrap_or(&COLORS[0]), s.points.clone()),
        };
        let stroke = color.stroke_width(if s.style == Style::Reference { 2 } else { 3 });
        let anno = match s.style {
            Style::Points => {
                t!(chart.draw_series(points.iter().map(|&p| Circle::new(p, 7, color.filled()))))
            }
            _ => {
                if s.style == Style::Line {
                    t!(chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled()))));
                }
                t!(chart.draw_series(LineSeries::new(points.clone(), stroke)))
            }
        };
        if text {
            if s.style == Style::Points {
                anno.label(&s.label).legend(move |(x, y)| Circle::new((x + 10, y), 6, color.filled()));
            } else {
                anno.label(&s.label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], stroke));
            }
        }
    }
    if text && !plot.series.is_empty() {
        t!(chart
            .configure_series_labels()
            .position(if plot.legend_left { SeriesLabelPosition::UpperLeft } else { SeriesLabelPosition::UpperRight })
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw());
    }
    t!(root.present());
    Ok(())
}

fn draw_any<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, plot: &Plot, text: bool) -> Result<(), String> {
    let (lo, hi) = y_bounds(plot);
    let x = x_range(plot);
    match (plot.log_x, plot.log_y) {
        (false, false) => draw(root, plot, text, x, lo..hi),
        (false, true) => draw(root, plot, text, x, (lo..hi).log_scale()),
        (true, false) => draw(root, plot, text, x.log_scale().base(2.0), lo..hi),
        (true, true) => draw(root, plot, text, x.log_scale().base(2.0), (lo..hi).log_scale()),
    }
}

/// The SVG document of a plot (`text: false` draws lines and markers only).
pub fn svg(plot: &Plot, text: bool) -> Result<String, String> {
    if text {
        font();
    }
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, HEIGHT)).into_drawing_area();
        draw_any(&root, plot, text)?;
    }
    Ok(out)
}

/// PNG bytes of a plot.
pub fn png(plot: &Plot) -> Result<Vec<u8>, String> {
    font();
    let mut rgb = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        draw_any(&root, plot, true)?;
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, WIDTH, HEIGHT);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| e.to_string())?;
        w.write_image_data(&rgb).map_err(|e| e.to_string())?;
    }
    Ok(bytes)
}

/// Writes `<dir>/<stem>.<plot>.svg` and `.png`.
pub fn write(plot: &Plot, dir: &Path, stem: &str) -> anyhow::Result<Written> {
    let svg_path = dir.join(format!("{stem}.{}.svg", plot.name));
    let png_path = dir.join(format!("{stem}.{}.png", plot.name));
    std::fs::write(&svg_path, svg(plot, true).map_err(anyhow::Error::msg)?)?;
    std::fs::write(&png_path, png(plot).map_err(anyhow::Error::msg)?)?;
    Ok(Written {
        plot: plot.name.clone(),
        title: plot.title.clone(),
        svg: svg_path,
        png: Some(png_path),
        note: font().warning.clone(),
    })
}

fn spread_is_wide(points: &[(f64, f64)]) -> bool {
    match bounds(points.iter().map(|p| p.1)) {
        Some((lo, hi)) => lo > 0.0 && hi / lo > 20.0,
        None => false,
    }
}

/// The plots a session supports, in a fixed order.
pub fn plots(s: &Session) -> Vec<Plot> {
    let mut out = Vec::new();
    out.extend(ppl_plot(s));
    out.extend(residual_plot(s));
    out.extend(delta_plot(s));
    out.extend(loss_plot(s));
    out.extend(speed_plot(s));
    out.extend(super::equilibrium::loss_plot(s));
    out
}

fn ppl_plot(s: &Session) -> Option<Plot> {
    let groups = ppl_groups(s);
    let g = groups.iter().find(|g| matches!(shape_of(s, g), Shape::Sweep | Shape::Progressive))?;
    let progressive = shape_of(s, g) == Shape::Progressive;
    let base = baseline(s, &position(s, g.evals[0]), &g.protocol).filter(|b| g.evals.contains(b));
    let base_ppl = base.and_then(|b| s.instances[b].metric_f64("ppl"));
    let mut before = Vec::new();
    let mut after = Vec::new();
    let mut control: Vec<(usize, f64)> = Vec::new();
    if let Some(b) = base_ppl {
        before.push((0.0, b));
    }
    // Levels after their fine-tune, by how many fine-tunes they have had: a control point is drawn
    // at the sparsity of the level that has had as many (at 0 when none has).
    let mut level_x: Vec<(usize, f64)> = Vec::new();
    for &i in &g.evals {
        let p = position(s, i);
        let (Some(v), Some(sp)) = (s.instances[i].metric_f64("ppl"), sparsity_of(s, &p)) else { continue };
        match (p.prune.is_some(), p.tuned.is_some()) {
            (true, false) => before.push((sp * 100.0, v)),
            (true, true) => {
                after.push((sp * 100.0, v));
                level_x.push((finetunes_above(s, p.model), sp * 100.0));
            }
            (false, true) => control.push((finetunes_above(s, p.model), v)),
            _ => {}
        }
    }
    let mut control: Vec<(f64, f64)> =
        control.into_iter().map(|(k, v)| (level_x.iter().find(|(n, _)| *n == k).map_or(0.0, |(_, x)| *x), v)).collect();
    let by_x = |v: &mut Vec<(f64, f64)>| v.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    by_x(&mut before);
    by_x(&mut after);
    by_x(&mut control);
    let mut series = Vec::new();
    let label = if progressive { "pruned, before fine-tune" } else { "pruned" };
    if !before.is_empty() {
        series.push(Series { label: label.into(), points: before, style: Style::Line });
    }
    if !after.is_empty() {
        series.push(Series { label: "after fine-tune".into(), points: after, style: Style::Line });
    }
    if !control.is_empty() {
        let label =
            if control.len() > 1 { "0% control (as many fine-tunes as the level)" } else { "0% fine-tune control" };
        series.push(Series { label: label.into(), points: control, style: Style::Points });
    }
    if let Some(b) = base_ppl {
        series.push(Series { label: "baseline (unpruned)".into(), points: vec![(0.0, b)], style: Style::Reference });
    }
    if series.iter().all(|s| s.style == Style::Reference) {
        return None;
    }
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.clone()).collect();
    let p = &g.protocol;
    Some(Plot {
        name: "ppl-vs-sparsity".into(),
        title: format!("Perplexity vs sparsity ({}, {})", p.data, s.device),
        x_label: "sparsity (% of weights pruned)".into(),
        y_label: format!("perplexity ({}, seq_len {})", p.name, p.seq_len),
        log_x: false,
        log_y: spread_is_wide(&all),
        legend_left: true,
        series,
    })
}

fn layer_values(inst: &super::session::Instance, key: &str) -> Vec<(f64, f64)> {
    let layers = inst.metric("layers").and_then(Json::as_array).cloned().unwrap_or_default();
    layers
        .iter()
        .enumerate()
        .filter_map(|(n, l)| {
            let x = l.get("layer").and_then(Json::as_f64).unwrap_or(n as f64);
            l.get(key).and_then(Json::as_f64).map(|y| (x, y))
        })
        .collect()
}

fn residual_plot(s: &Session) -> Option<Plot> {
    let insts: Vec<_> = s
        .of_role(Role::Residuals)
        .filter(|(_, i)| !i.metrics.contains_key("intervention") && i.metric("layers").is_some())
        .map(|(_, i)| i)
        .collect();
    if insts.is_empty() {
        return None;
    }
    let mut series = Vec::new();
    for inst in &insts {
        let suffix = if insts.len() > 1 { format!(" — {}", inst.name) } else { String::new() };
        series.push(Series {
            label: format!("correction ratio ‖c‖/‖h_in‖{suffix}"),
            points: layer_values(inst, "correction_ratio"),
            style: Style::Line,
        });
        series.push(Series {
            label: format!("branching ratio ‖h_out‖/‖h_in‖{suffix}"),
            points: layer_values(inst, "branching_ratio"),
            style: Style::Line,
        });
    }
    series.push(Series { label: "critical (1)".into(), points: vec![(0.0, 1.0)], style: Style::Reference });
    Some(Plot {
        name: "residual-ratios".into(),
        title: format!("Residual stream per layer ({})", s.device),
        x_label: "layer".into(),
        y_label: "ratio (dimensionless)".into(),
        log_x: false,
        log_y: false,
        legend_left: false,
        series,
    })
}

fn delta_plot(s: &Session) -> Option<Plot> {
    let mut series = Vec::new();
    for (_, inst) in s.of_role(Role::Perturbation) {
        let Some(d) = inst.metric("delta").and_then(Json::as_array) else { continue };
        // delta[0] is the embedding output (x = −1), delta[l + 1] layer l's output (x = l).
        let points: Vec<(f64, f64)> =
            d.iter().enumerate().filter_map(|(l, v)| v.as_f64().map(|v| (l as f64 - 1.0, v))).collect();
        let lambda = inst.metric_f64("lyapunov").map(|l| format!(" (λ = {l:.3})")).unwrap_or_default();
        series.push(Series { label: format!("{}{lambda}", inst.name), points, style: Style::Line });
    }
    if series.is_empty() {
        return None;
    }
    let positive = series.iter().all(|s| s.points.iter().all(|p| p.1 > 0.0));
    Some(Plot {
        name: "perturbation-delta".into(),
        title: format!("Perturbation growth through the layers ({})", s.device),
        x_label: "layer output (−1 = embedding output)".into(),
        y_label: "relative deviation δ (log scale)".replace(" (log scale)", if positive { " (log scale)" } else { "" }),
        log_x: false,
        log_y: positive,
        legend_left: true,
        series,
    })
}

fn loss_plot(s: &Session) -> Option<Plot> {
    // Steps on the chain's batch stream (`first_batch` + step), so a chain reads as one timeline:
    // each level is a segment, and the control chain is one curve across all of them.
    let mut series: Vec<Series> = Vec::new();
    for (i, inst) in s.of_role(Role::Train) {
        let Some(l) = inst.metric("loss").and_then(Json::as_array) else { continue };
        let offset = inst.metric_f64("first_batch").unwrap_or(0.0);
        let points: Vec<(f64, f64)> = l
            .iter()
            .filter_map(|pair| {
                // [step, loss] pairs, or {step, loss} objects.
                let step = pair.get(0).or_else(|| pair.get("step"))?.as_f64()?;
                Some((offset + step, pair.get(1).or_else(|| pair.get("loss"))?.as_f64()?))
            })
            .collect();
        let p = position(s, i);
        // An adaptation of a swapped model is its own curve, not part of the 0% control chain.
        let control = p.prune.is_none() && p.swap.is_none();
        let label = match (p.prune, p.swap) {
            (Some(_), _) => format!("{} sparsity", sparsity_of(s, &p).map(pct).unwrap_or_else(|| inst.name.clone())),
            (None, Some(w)) => attention_label(s, w),
            (None, None) => "0% (control)".into(),
        };
        match series.iter_mut().find(|x| x.label == label && control) {
            Some(control) => {
                control.points.extend(points);
                control.points.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
            }
            None => series.push(Series { label, points, style: Style::Line }),
        }
    }
    if series.is_empty() {
        return None;
    }
    Some(Plot {
        name: "finetune-loss".into(),
        title: format!("Fine-tune loss per level ({})", s.device),
        x_label: "step (of the chain's batch stream)".into(),
        y_label: "training loss (cross-entropy, nats/token)".into(),
        log_x: false,
        log_y: false,
        legend_left: false,
        series,
    })
}

fn speed_plot(s: &Session) -> Option<Plot> {
    let mut timed = Vec::new();
    let mut devices: Vec<&str> = Vec::new();
    for (_, inst) in s.of_role(Role::Speed) {
        let Some(l) = inst.metric("lengths").and_then(Json::as_array) else { continue };
        let points: Vec<(f64, f64)> = l
            .iter()
            .filter_map(|r| Some((r.get("length")?.as_f64()?, r.get("tokens_per_second")?.as_f64()?)))
            .filter(|p| p.0 > 0.0 && p.1 > 0.0)
            .collect();
        if points.is_empty() {
            continue;
        }
        if let Some(d) = inst.metric_str("device").filter(|d| !devices.contains(d)) {
            devices.push(d);
        }
        timed.push((inst.metric_str("attention").unwrap_or(&inst.name), inst.name.as_str(), points));
    }
    if timed.is_empty() {
        return None;
    }
    // Two timings of the same attention (e.g. on two loads) are told apart by instance name.
    let series = timed
        .iter()
        .map(|(attention, name, points)| {
            let twice = timed.iter().filter(|t| t.0 == *attention).count() > 1;
            let label = if twice { format!("{attention} — {name}") } else { attention.to_string() };
            Series { label, points: points.clone(), style: Style::Line }
        })
        .collect();
    Some(Plot {
        name: "speed-vs-length".into(),
        title: format!("Forward speed vs sequence length ({})", devices.join("; ")),
        x_label: "sequence length (tokens, log scale)".into(),
        y_label: "tokens/s (log scale)".into(),
        log_x: true,
        log_y: true,
        legend_left: false,
        series,
    })
}
