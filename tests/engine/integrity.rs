//! Damaged cache entries are never computed from: a run moves them to `cache/quarantine/` with a
//! warning and recomputes them (and whatever was computed from other bytes than they now hold);
//! `cache verify --fix` does the same explicitly. Every kind of damage ends with the results of
//! a clean run and a clean `cache verify`.

use std::path::PathBuf;

use crate::support::{repo, results, Sandbox};

fn chain() -> String {
    repo().join("tests/pipelines/chain.toml").display().to_string()
}

/// The middle of the chain: level 0.5's tuned model, read by its `after` eval and by level 0.25.
const TARGET: &str = "level[factor=0.5].tuned";
const CONSUMER: &str = "level[factor=0.5].after";

fn entry(sb: &Sandbox, stage: &str) -> PathBuf {
    let s = sb.session("toy-chain.json");
    let key = s["stages"][stage]["key"].as_str().unwrap().to_string();
    sb.path().join("cache").join(&key[..2]).join(key)
}

fn damage(dir: &std::path::Path, kind: &str) {
    let weights = dir.join("weights.json");
    let manifest = dir.join("manifest.json");
    match kind {
        "bit flip in weights" => {
            let mut b = std::fs::read(&weights).unwrap();
            let mid = b.len() / 2;
            b[mid] ^= 0x01;
            std::fs::write(&weights, b).unwrap();
        }
        "edited metric" => {
            let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
            let metrics = m["metrics"].as_object_mut().unwrap();
            let (k, _) = metrics.iter().find(|(_, v)| v.is_number()).map(|(k, v)| (k.clone(), v.clone())).unwrap();
            metrics.insert(k, serde_json::json!(12345.0));
            std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        }
        "truncated weights" => {
            let b = std::fs::read(&weights).unwrap();
            std::fs::write(&weights, &b[..b.len() / 2]).unwrap();
        }
        "deleted weights" => std::fs::remove_file(&weights).unwrap(),
        "deleted entry" => std::fs::remove_dir_all(dir).unwrap(),
        "garbage manifest" => std::fs::write(&manifest, b"\x00\xffnot json").unwrap(),
        other => panic!("unknown damage {other}"),
    }
}

const DAMAGES: [&str; 6] = [
    "bit flip in weights",
    "edited metric",
    "truncated weights",
    "deleted weights",
    "deleted entry",
    "garbage manifest",
];

#[test]
fn every_kind_of_damage_ends_with_correct_results_and_a_clean_verify() {
    let clean = Sandbox::new();
    clean.run(&["run", &chain(), "-q"]).expect(0);
    let want = results(&clean.session("toy-chain.json"));
    for kind in DAMAGES {
        let sb = Sandbox::new();
        sb.run(&["run", &chain(), "-q"]).expect(0);
        // The consumer must be recomputed, so the damaged entry's bytes would be read.
        std::fs::remove_dir_all(entry(&sb, CONSUMER)).unwrap();
        damage(&entry(&sb, TARGET), kind);
        if kind != "deleted entry" {
            let plan = sb.run(&["plan", &chain()]).expect(0).stdout();
            let line = plan.lines().find(|l| l.contains(TARGET) && !l.contains("why:")).unwrap();
            if kind == "edited metric" || kind == "garbage manifest" {
                assert!(line.starts_with("damaged"), "{kind}: plan must not say cached:\n{plan}");
            }
        }
        let run = sb.run(&["run", &chain()]).expect(0);
        if kind != "deleted entry" {
            assert!(
                run.stderr().contains("is damaged") && run.stderr().contains("quarantine"),
                "{kind}: a warning naming the damage\n{}",
                run.stderr()
            );
            let q: Vec<_> = std::fs::read_dir(sb.path().join("cache/quarantine")).unwrap().collect();
            assert_eq!(q.len(), 1, "{kind}: the damaged entry is kept aside");
        }
        assert_eq!(results(&sb.session("toy-chain.json")), want, "{kind}: results of a clean run");
        let verify = sb.run(&["cache", "verify"]).expect(0);
        assert!(verify.stdout().contains("all intact"), "{kind}: {}", verify.stdout());
        sb.run(&["cache", "gc"]).expect(0);
        assert!(
            std::fs::read_dir(sb.path().join("cache/quarantine")).map(|mut d| d.next().is_none()).unwrap_or(true),
            "{kind}: gc empties the quarantine"
        );
    }
}

/// Damage under entries that are all cached is not seen by a run that reads nothing (its
/// results came from the intact bytes); `verify` finds it and `verify --fix` moves the entry
/// and everything computed from it aside, so the next run recomputes exactly those.
#[test]
fn verify_fix_moves_the_damaged_entry_and_its_descendants_aside() {
    let clean = Sandbox::new();
    clean.run(&["run", &chain(), "-q"]).expect(0);
    let want = results(&clean.session("toy-chain.json"));
    let sb = Sandbox::new();
    sb.run(&["run", &chain(), "-q"]).expect(0);
    damage(&entry(&sb, TARGET), "bit flip in weights");
    let bad = sb.run(&["cache", "verify"]).expect(1);
    assert!(bad.stderr().contains("verify --fix"), "{}", bad.stderr());
    let fixed = sb.run(&["cache", "verify", "--fix"]).expect(0).stdout();
    // level 0.5 tuned, its `after`, and level 0.25 and 0.125 (pruned, tuned, after each).
    assert!(fixed.contains("8 entries moved to quarantine (1 damaged, 7 computed from them)"), "{fixed}");
    assert!(sb.run(&["cache", "verify"]).expect(0).stdout().contains("all intact"));
    let log = sb.path().join("toy.log");
    sb.cmd(&["run", &chain(), "-q"]).env("TOY_LOG", &log).output().unwrap();
    let recomputed = std::fs::read_to_string(&log).unwrap().lines().count();
    assert_eq!(recomputed, 8, "exactly the moved entries are recomputed");
    assert_eq!(results(&sb.session("toy-chain.json")), want);
}

/// A descendant whose input now holds other content than it was computed from is recomputed.
#[test]
fn an_entry_computed_from_other_input_bytes_is_recomputed() {
    let sb = Sandbox::new();
    sb.run(&["run", &chain(), "-q"]).expect(0);
    // Replace the target with a consistent entry of different content: its manifest and seal are
    // intact, but the consumer recorded other content.
    let target = entry(&sb, TARGET);
    let weights = target.join("weights.json");
    let mut b = std::fs::read(&weights).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x01;
    std::fs::write(&weights, &b).unwrap();
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(target.join("manifest.json")).unwrap()).unwrap();
    let file = m["files"].as_array_mut().unwrap().iter_mut().find(|f| f["path"] == "weights.json").unwrap();
    file["blake3"] = serde_json::json!(blake3::hash(&b).to_hex().to_string());
    m["seal"] = serde_json::json!("");
    std::fs::write(target.join("manifest.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let plan = sb.run(&["plan", &chain()]).expect(0).stdout();
    let line = plan.lines().find(|l| l.contains(CONSUMER) && !l.contains("why:")).unwrap();
    assert!(line.starts_with("damaged"), "{plan}");
    assert!(plan.contains("computed from other content of input"), "{plan}");
}
