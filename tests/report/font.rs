//! Plot text never depends on the fonts installed on the machine: the binary carries its own
//! (`RPT_FONT` may name another). Run through the binary, so the font is chosen afresh per run.

use std::path::Path;

use rpt_flow::report::plots;

use super::support::{repo, Sandbox};

/// Decoded RGB pixels of a PNG, with its width.
fn pixels(path: &Path) -> (Vec<u8>, usize) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (buf, info.width as usize)
}

/// Dark pixels in the band of rows `rows` (the title sits above the chart; nothing else is drawn
/// there).
fn dark_pixels(rgb: &[u8], width: usize, rows: std::ops::Range<usize>) -> usize {
    rgb[rows.start * width * 3..rows.end * width * 3].chunks(3).filter(|p| p.iter().all(|&c| c < 100)).count()
}

/// `rpt-flow report` of a committed session into the sandbox, with `RPT_FONT` as given.
fn report(sb: &Sandbox, rpt_font: Option<&str>) -> (String, std::path::PathBuf) {
    let session = repo().join("tests/report/golden/criticality.tiny.json");
    let out = sb.path().join("out");
    let mut cmd = sb.cmd(&["report", session.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    match rpt_font {
        Some(f) => cmd.env("RPT_FONT", f),
        None => cmd.env_remove("RPT_FONT"),
    };
    let run = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "report failed:\n{stderr}");
    (stderr, out)
}

/// The title, the axis names and the legend are in the SVG; the PNG exists and its title band
/// has text in it.
fn assert_plot_has_text(out: &Path) {
    let session = super::golden::session("criticality.tiny");
    let plot = plots::plots(&session).into_iter().find(|p| p.name == "residual-ratios").unwrap();
    let svg_path = out.join("criticality.tiny.residual-ratios.svg");
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let escaped = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    for text in [&plot.title, &plot.x_label, &plot.y_label, &plot.series[0].label] {
        assert!(svg.contains(&escaped(text)), "`{text}` is not in {}", svg_path.display());
    }
    let (rgb, width) = pixels(&out.join("criticality.tiny.residual-ratios.png"));
    assert_eq!(width, plots::WIDTH as usize);
    let title = dark_pixels(&rgb, width, 0..50);
    assert!(title > 200, "the PNG's title band (rows 0..50) has {title} dark pixels: no text drawn");
}

#[test]
fn plots_have_text_with_no_font_named() {
    // No lookup on the machine: without RPT_FONT the font is the one in the binary.
    if std::env::var_os("RPT_FONT").is_none() {
        assert_eq!(plots::font().name, plots::BUILT_IN);
        assert!(plots::font().warning.is_none());
    }
    let sb = Sandbox::real();
    let (stderr, out) = report(&sb, None);
    assert!(!stderr.contains("RPT_FONT"), "{stderr}");
    assert_plot_has_text(&out);
    // An empty RPT_FONT is the same as none.
    let sb = Sandbox::real();
    let (stderr, out) = report(&sb, Some(""));
    assert!(!stderr.contains("note:"), "{stderr}");
    assert_plot_has_text(&out);
}

#[test]
fn an_unusable_rpt_font_falls_back_to_the_built_in_font_and_says_so() {
    let sb = Sandbox::real();
    let not_a_font = sb.write("not-a-font.ttf", "plain text");
    for (font, why) in
        [("/nonexistent/font.ttf", "cannot be read"), (not_a_font.to_str().unwrap(), "is not a TrueType")]
    {
        let (stderr, out) = report(&sb, Some(font));
        assert!(stderr.contains(&format!("RPT_FONT={font} {why}")), "{stderr}");
        assert!(stderr.contains(plots::BUILT_IN), "{stderr}");
        let md = std::fs::read_to_string(out.join("criticality.tiny.md")).unwrap();
        assert!(md.contains(why), "the report names the problem:\n{md}");
        assert_plot_has_text(&out);
    }
}

#[test]
fn rpt_font_names_another_font() {
    // Any TrueType file will do; the built-in one is not on disk, so use one the machine has if
    // it has one (this test is about the override, not about the machine's fonts).
    let Some(system) = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        eprintln!("skipped: no DejaVuSans.ttf to point RPT_FONT at");
        return;
    };
    let png = "criticality.tiny.residual-ratios.png";
    let sb = Sandbox::real();
    let (_, built_in) = report(&sb, None);
    let built_in = std::fs::read(built_in.join(png)).unwrap();
    let sb = Sandbox::real();
    let (stderr, out) = report(&sb, Some(system));
    assert!(!stderr.contains("note:"), "{stderr}");
    assert_plot_has_text(&out);
    assert_ne!(std::fs::read(out.join(png)).unwrap(), built_in, "RPT_FONT={system} changes the text's pixels");
}
