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

#[test]
fn progressive_tiny_has_before_after_and_the_control_for_every_level() {
    let (_sb, s) = run_tiny("pipelines/progressive.toml", "progressive-sparsity.tiny.json");
    let st = &s["stages"];
    assert_eq!(st["base"]["metrics"]["source"]["builtin"], "tiny-bitnet");
    assert!(st["control"]["metrics"]["final_loss"].as_f64().unwrap().is_finite());
    assert!(st["control-after"]["metrics"]["ppl"].as_f64().unwrap().is_finite());
    let mut previous_zeros = 0;
    for level in ["0.05", "0.1", "0.15", "0.2", "0.25", "0.3", "0.4", "0.5"] {
        let get = |stage: &str| st[format!("level[sparsity={level}].{stage}")]["metrics"].clone();
        let (before, after) = (get("before")["ppl"].as_f64().unwrap(), get("after")["ppl"].as_f64().unwrap());
        assert!(before.is_finite() && after.is_finite(), "level {level}");
        let pruned = get("pruned");
        let zeros = pruned["zeros"].as_u64().unwrap();
        assert!(zeros > previous_zeros, "levels nest and grow");
        assert_eq!(
            pruned["already_pruned"].as_u64().unwrap(),
            previous_zeros,
            "level {level} starts from the previous one"
        );
        previous_zeros = zeros;
        assert_eq!(get("tuned")["loss"].as_array().unwrap().len(), 8);
        assert!(get("text")["label"].is_string());
    }
    // The session carries the researcher's table: baseline, control and one row per level.
    let table = &s["tables"][0];
    let columns: Vec<&str> = table["columns"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(
        columns,
        ["sparsity", "ppl before", "ppl after", "vs baseline (%)", "recovery (before/after)", "text label"]
    );
    let rows = table["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2 + 8);
    assert_eq!(rows[1][0], "0% (fine-tune control)");
    assert_eq!(rows[9][0], "50%");
}

#[test]
fn tiny_pretrain_tiny_learns_something_and_is_bit_reproducible() {
    let (sb, s) = run_tiny("pipelines/tiny-pretrain.toml", "tiny-pretrain.tiny.json");
    let (sb2, s2) = run_tiny("pipelines/tiny-pretrain.toml", "tiny-pretrain.tiny.json");
    let weights = |sb: &Sandbox, s: &serde_json::Value| {
        let key = s["stages"]["trained"]["key"].as_str().unwrap().to_string();
        let dir = sb.path().join("cache").join(&key[..2]).join(key);
        (std::fs::read(dir.join("model.safetensors")).unwrap(), std::fs::read(dir.join("tokenizer.json")).unwrap())
    };
    assert!(weights(&sb, &s) == weights(&sb2, &s2), "two fresh runs give different bytes");
    let loss = s["stages"]["trained"]["metrics"]["loss"].as_array().unwrap();
    assert_eq!(loss.len(), 8);
    let ppl = |n: &str| s["stages"][n]["metrics"]["ppl"].as_f64().unwrap();
    assert!(ppl("ppl-trained") < ppl("ppl-untrained"), "eight steps already lower the perplexity");
}

#[test]
fn progressive_criticality_reuses_every_cached_level() {
    let sb = Sandbox::real();
    let prog = repo().join("pipelines/progressive.toml");
    let crit = repo().join("pipelines/progressive-criticality.toml");
    sb.run(&["run", prog.to_str().unwrap(), "--profile", "tiny", "-q"]).expect(0);
    let plan = sb.run(&["plan", crit.to_str().unwrap(), "--profile", "tiny", "--format", "json"]).expect(0).json();
    for i in plan["instances"].as_array().unwrap() {
        let name = i["name"].as_str().unwrap();
        let shared = name == "base" || name.ends_with(".pruned") || name.ends_with(".tuned");
        let expected = if shared { "cached" } else { "to run" };
        assert_eq!(i["status"], expected, "{name}");
    }
    sb.run(&["run", crit.to_str().unwrap(), "--profile", "tiny", "-q"]).expect(0);
    let s = sb.session("progressive-criticality.tiny.json");
    let g = &s["stages"]["level[sparsity=0.5].growth"]["metrics"];
    assert!(g["lyapunov"].as_f64().unwrap().is_finite());
    assert_eq!(s["stages"]["level[sparsity=0.5].tuned"]["cached"], true);
}

#[test]
fn the_stage_reference_in_docs_is_generated_from_the_definitions() {
    let sb = Sandbox::real();
    let generated = sb.run(&["stages", "--format", "markdown"]).expect(0).stdout();
    let doc = std::fs::read_to_string(repo().join("docs/stage-reference.md")).unwrap();
    let body = doc.split_once("\n\n## ").map(|(_, rest)| format!("## {rest}")).unwrap_or_default();
    assert!(body == generated, "docs/stage-reference.md is stale: run scripts/stage-reference.sh");
}
