//! Every shipped pipeline runs under its `tiny` profile, and a second run is fully cached.

use crate::support::{repo, Sandbox};

fn run_tiny(file: &str, session: &str) -> (Sandbox, serde_json::Value) {
    let sb = Sandbox::real();
    let p = repo().join(file);
    let first = sb.run(&["run", p.to_str().unwrap(), "--profile", "tiny"]).expect(0);
    assert!(first.stdout().contains("computed"), "{}", first.stdout());
    let s = sb.session(session);
    assert_eq!(s["status"], "complete");
    let again = sb.run(&["run", p.to_str().unwrap(), "--profile", "tiny"]).expect(0);
    assert!(again.stdout().contains("nothing to compute"), "second run: {}", again.stdout());
    (sb, s)
}

#[test]
fn sparsity_tiny_has_every_level_with_ppl_and_labels() {
    let (_sb, s) = run_tiny("pipelines/sparsity.toml", "sparsity.tiny.json");
    let st = &s["stages"];
    let base_ppl = st["baseline"]["metrics"]["ppl"].as_f64().unwrap();
    assert!(base_ppl.is_finite() && base_ppl > 1.0);
    assert_eq!(st["baseline"]["metrics"]["protocol"]["name"], "chunks");
    for level in ["0.1", "0.2", "0.3"] {
        let pruned = &st[format!("level[sparsity={level}].pruned")]["metrics"];
        let want: f64 = level.parse().unwrap();
        let got = pruned["sparsity"].as_f64().unwrap();
        let n = pruned["weights"].as_f64().unwrap();
        assert!((got - want).abs() <= 0.5 / n + 1e-12, "level {level}: sparsity {got}");
        let ppl = &st[format!("level[sparsity={level}].ppl")]["metrics"];
        assert!(ppl["ppl"].as_f64().unwrap().is_finite());
        assert_eq!(ppl["tokens"], st["baseline"]["metrics"]["tokens"], "same windows at every level");
        let text = &st[format!("level[sparsity={level}].text")]["metrics"];
        let label = text["label"].as_str().unwrap();
        assert!(["correct", "wrong", "repetitive"].contains(&label), "{label}");
        let outputs = text["outputs"].as_array().unwrap();
        assert!(outputs.len() >= 10, "the facts prompt set");
        for o in outputs {
            assert!(o["expected"].is_string() && o["label"].is_string() && o["token_ids"].is_array());
        }
    }
}

#[test]
fn inference_tiny_runs_every_protocol() {
    let (_sb, s) = run_tiny("pipelines/inference.toml", "inference.tiny.json");
    let chunks = &s["stages"]["ppl"]["metrics"];
    let lcpp = &s["stages"]["ppl-llama-cpp"]["metrics"];
    assert_eq!(chunks["protocol"]["name"], "chunks");
    assert_eq!(lcpp["protocol"]["name"], "llama-cpp");
    // chunks scores seq_len-1 tokens per window, llama-cpp seq_len-1-seq_len/2.
    assert_eq!(chunks["tokens"].as_u64().unwrap(), chunks["windows"].as_u64().unwrap() * 63);
    assert_eq!(lcpp["tokens"].as_u64().unwrap(), lcpp["windows"].as_u64().unwrap() * (63 - 32));
    assert!(chunks["bits_per_byte"].as_f64().unwrap() > 0.0);
    assert_eq!(s["stages"]["base"]["metrics"]["quantization"], "ternary");
}

#[test]
fn shipped_pipelines_validate_in_full_and_tiny_form() {
    let sb = Sandbox::real();
    for entry in std::fs::read_dir(repo().join("pipelines")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            let path = p.to_str().unwrap();
            sb.run(&["validate", path]).expect(0);
            sb.run(&["validate", path, "--profile", "tiny"]).expect(0);
        }
    }
    let stages = sb.run(&["stages"]).expect(0).stdout();
    for kind in ["load", "prune", "eval-ppl", "generate"] {
        assert!(stages.contains(&format!("{kind} (v")), "{kind} missing from `rpt-flow stages`");
    }
    assert!(!stages.contains("toy-"), "the shipped binary lists only real stages");
}
