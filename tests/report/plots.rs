//! Plots: SVG and PNG files are written, decode, and hold the expected number of series.

use std::collections::BTreeSet;

use rpt_flow::report::{self, plots};

use super::golden::session;

/// Series in a plotters SVG: each line series is a coloured polyline (plus its legend glyph),
/// each marker-only series a set of circles in a colour no line uses. Axes are black.
fn series_in_svg(svg: &str) -> usize {
    let attr = |el: &str, name: &str| -> Option<String> {
        let start = el.find(&format!("{name}=\""))? + name.len() + 2;
        Some(el[start..].split('"').next()?.to_string())
    };
    let mut lines = BTreeSet::new();
    let mut dots = BTreeSet::new();
    for el in svg.split('<').skip(1) {
        if el.starts_with("polyline") {
            let c = attr(el, "stroke").unwrap_or_default();
            if c != "#000000" {
                lines.insert(c);
            }
        } else if el.starts_with("circle") {
            dots.insert(attr(el, "fill").unwrap_or_default());
        }
    }
    lines.len() + dots.difference(&lines).count()
}

fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

fn check_written(name: &str, expected: &[(&str, usize)]) {
    let s = session(name);
    let ps = plots::plots(&s);
    let names: Vec<&str> = ps.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, expected.iter().map(|e| e.0).collect::<Vec<_>>());
    let dir = tempfile::tempdir().unwrap();
    for (p, (_, n)) in ps.iter().zip(expected) {
        assert_eq!(p.series.len(), *n, "{}", p.name);
        let w = plots::write(p, dir.path(), name).unwrap();
        assert!(w.note.is_none(), "{:?}", w.note);
        let svg = std::fs::read_to_string(&w.svg).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{}", w.svg.display());
        assert_eq!(series_in_svg(&svg), *n, "series in {}", w.svg.display());
        for s in &p.series {
            assert!(svg.contains(&s.label.replace('&', "&amp;")), "legend `{}` in {}", s.label, w.svg.display());
        }
        let bytes = std::fs::read(w.png.as_ref().unwrap()).unwrap();
        assert_eq!(png_size(&bytes), (plots::WIDTH, plots::HEIGHT));
        let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        let pixels = &buf[..info.buffer_size()];
        // Not a blank canvas: some pixels are neither white nor grey.
        assert!(pixels.chunks(3).any(|p| !(p[0] == p[1] && p[1] == p[2])), "{} has colour", p.name);
    }
}

#[test]
fn progressive_plots() {
    // before, after, control (markers), baseline line; one loss curve per level and the control.
    check_written("progressive.tiny", &[("ppl-vs-sparsity", 4), ("finetune-loss", 4)]);
}

#[test]
fn criticality_plots() {
    // correction and branching ratio plus the critical line; δ of two models.
    check_written("criticality.tiny", &[("residual-ratios", 3), ("perturbation-delta", 2)]);
}

#[test]
fn sweep_plot_has_the_pruned_curve_and_the_baseline() {
    check_written("sparsity.tiny", &[("ppl-vs-sparsity", 2)]);
}

#[test]
fn comparison_plots_carry_both_sessions() {
    let ps = report::comparison_plots(&[session("progressive.tiny"), session("progressive")]);
    let ppl = ps.iter().find(|p| p.name == "ppl-vs-sparsity").unwrap();
    assert_eq!(ppl.series.len(), 8);
    assert!(ppl.series.iter().any(|s| s.label == "B: after fine-tune"));
    assert!(ppl.log_y, "9.65 next to 611.9: a log axis");
    let svg = plots::svg(ppl, true).unwrap();
    assert_eq!(series_in_svg(&svg), 8);
}

#[test]
fn without_text_the_svg_still_has_the_series() {
    let ps = plots::plots(&session("criticality.tiny"));
    let svg = plots::svg(&ps[1], false).unwrap();
    assert!(!svg.contains("<text"));
    assert_eq!(series_in_svg(&svg), 2);
}

#[test]
fn holographic_plots() {
    // One loss curve per adaptation; one speed curve per timed model, on log-log axes.
    check_written("holographic.tiny", &[("finetune-loss", 4), ("speed-vs-length", 5)]);
}

#[test]
fn equilibrium_plots() {
    // One loss curve per trained network.
    check_written("equilibrium.tiny", &[("equilibrium-loss", 6)]);
}
