//! `run` then `report` on the shipped sparsity pipeline under its tiny profile.

use super::support::Sandbox;

#[test]
fn tiny_sparsity_run_then_report() {
    let sb = Sandbox::real();
    sb.copy("pipelines/sparsity.toml");
    let run = sb.cmd(&["run", "sparsity.toml", "--profile", "tiny", "--quiet"]).output().unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{out}\n{}", String::from_utf8_lossy(&run.stderr));
    // `run` ends with the pipeline's main table.
    assert!(out.contains("## Pruning sweep"), "{out}");
    assert!(out.contains("| 0% (baseline) |"), "{out}");

    let today = time::OffsetDateTime::now_utc().date().to_string();
    let session = format!("sessions/{today}/sparsity.tiny.json");
    let rep = sb.cmd(&["report", &session]).output().unwrap();
    let text = String::from_utf8_lossy(&rep.stdout);
    assert!(rep.status.success(), "{text}\n{}", String::from_utf8_lossy(&rep.stderr));
    let dir = sb.path().join("sessions").join(&today);
    let md = std::fs::read_to_string(dir.join("sparsity.tiny.md")).unwrap();
    assert!(text.starts_with(&md), "the report prints what it writes");
    for row in ["| 0% (baseline) |", "|           10% |", "|           20% |", "|           30% |"] {
        assert!(md.contains(row), "{row} in\n{md}");
    }
    assert!(md.contains("perplexity: texts, synthetic:facts:test, seq_len 64, each text its own window"), "{md}");
    for f in ["sparsity.tiny.ppl-vs-sparsity.svg", "sparsity.tiny.ppl-vs-sparsity.png"] {
        assert!(std::fs::metadata(dir.join(f)).unwrap().len() > 1000, "{f}");
    }

    // The pipeline form reads the cache and gives the same main table, writing no session.
    let std_md = md.split("## Pruning sweep").nth(1).unwrap().split("\n## ").next().unwrap().to_string();
    std::fs::remove_file(dir.join("sparsity.tiny.md")).unwrap();
    let rep = sb.cmd(&["report", "sparsity.toml", "--profile", "tiny", "--no-plots"]).output().unwrap();
    assert!(rep.status.success(), "{}", String::from_utf8_lossy(&rep.stderr));
    let md2 = std::fs::read_to_string(dir.join("sparsity.tiny.md")).unwrap();
    assert!(md2.contains(&std_md), "cached report differs:\n{md2}");
    assert!(md2.contains("read from the cache"), "{md2}");
    assert!(md2.contains("24 cached"), "{md2}");

    // Not cached under another seed: every instance is missing, nothing runs.
    let rep = sb
        .cmd(&["report", "sparsity.toml", "--profile", "tiny", "--set", "stages.base.dtype=bf16", "--format", "csv"])
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&rep.stdout);
    assert!(rep.status.success(), "{}", String::from_utf8_lossy(&rep.stderr));
    assert_eq!(csv.lines().count(), 25, "{csv}");
    assert!(csv.lines().skip(1).all(|l| l.contains(",missing,")), "{csv}");

    // CSV of the run: one row per instance.
    let rep = sb.cmd(&["report", &session, "--format", "csv"]).output().unwrap();
    let csv = String::from_utf8_lossy(&rep.stdout);
    assert_eq!(csv.lines().count(), 25, "{csv}");
    assert!(csv.lines().next().unwrap().contains("metric.ppl"));
}
