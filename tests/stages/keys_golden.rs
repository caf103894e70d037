//! Every shipped pipeline's cache keys, frozen: a refactor that changes a key silently orphans
//! users' cached results (hours of GPU time), so a changed key must be a deliberate stage-version
//! bump, regenerated with UPDATE_GOLDEN=1 and named in the commit.

use crate::support::{instance_keys, repo, Sandbox};

/// A hub cache holding only `refs/main` for the 2B-4T repo, so the default profiles plan offline
/// against a fixed commit.
fn fake_hub(sb: &Sandbox) -> String {
    let refs = sb.path().join("hub/models--microsoft--bitnet-b1.58-2B-4T-bf16/refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join("main"), "0123456789abcdef0123456789abcdef01234567").unwrap();
    sb.path().join("hub").display().to_string()
}

fn keys_of(sb: &Sandbox, hub: &str, args: &[&str]) -> Vec<(String, String)> {
    let mut a = vec!["plan", "--format", "json"];
    a.extend_from_slice(args);
    let out = sb.cmd(&a).env("HF_HUB_OFFLINE", "1").env("HF_HUB_CACHE", hub).output().unwrap();
    assert!(out.status.success(), "plan {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    instance_keys(&serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn shipped_pipelines_keep_their_keys() {
    let sb = Sandbox::real();
    let hub = fake_hub(&sb);
    let mut files: Vec<String> = Vec::new();
    for dir in ["pipelines", "benches"] {
        let mut names: Vec<_> = std::fs::read_dir(repo().join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".toml"))
            .collect();
        names.sort();
        files.extend(names.into_iter().map(|n| format!("{dir}/{n}")));
    }
    let mut lines = String::new();
    for file in &files {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        let mut variants: Vec<Vec<&str>> = vec![vec![], vec!["--device", "cuda"]];
        if text.contains("[profiles.tiny]") {
            variants.push(vec!["--profile", "tiny"]);
        }
        if text.contains("[profiles.rigorous]") {
            variants.push(vec!["--profile", "rigorous"]);
        }
        let path = repo().join(file).display().to_string();
        for extra in variants {
            let mut args = vec![path.as_str()];
            args.extend_from_slice(&extra);
            for (name, key) in keys_of(&sb, &hub, &args) {
                lines.push_str(&format!("{file} [{}] {name} {key}\n", extra.join(" ")));
            }
        }
    }
    let golden = repo().join("tests/stages/golden/keys.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &lines).unwrap();
    }
    let expected = std::fs::read_to_string(&golden).unwrap();
    let changed: Vec<_> = expected
        .lines()
        .zip(lines.lines())
        .filter(|(a, b)| a != b)
        .take(10)
        .map(|(a, b)| format!("  was: {a}\n  now: {b}"))
        .collect();
    assert!(
        changed.is_empty() && expected.lines().count() == lines.lines().count(),
        "cache keys changed ({} lines were, {} now); bump the stage's version on purpose and regenerate with UPDATE_GOLDEN=1:\n{}",
        expected.lines().count(),
        lines.lines().count(),
        changed.join("\n")
    );
}

/// criticality-regularised.toml's unregularised chain is progressive.toml's: a cached progressive
/// run is reused, and only the regularised and combined chains are new work.
#[test]
fn the_unregularised_chain_shares_the_progressive_keys() {
    let sb = Sandbox::real();
    let hub = fake_hub(&sb);
    let path = |f: &str| repo().join(f).display().to_string();
    let prog: std::collections::BTreeMap<_, _> =
        keys_of(&sb, &hub, &[&path("pipelines/progressive.toml")]).into_iter().collect();
    let crit = keys_of(&sb, &hub, &[&path("pipelines/criticality-regularised.toml")]);
    let mut shared = 0;
    for (name, key) in &crit {
        let in_chain = name.starts_with("level[") && [".pruned", ".tuned", ".after"].iter().any(|s| name.ends_with(s));
        if in_chain || name == "base" || name == "baseline" {
            assert_eq!(prog.get(name), Some(key), "{name}");
            shared += 1;
        } else if name.starts_with("lambda-") && name.ends_with("[sparsity=0.05].pruned") {
            // Every chain's first prune is the same prune of the base.
            assert_eq!(prog.get("level[sparsity=0.05].pruned"), Some(key), "{name}");
        } else {
            assert!(!prog.values().any(|k| k == key), "{name} is not progressive.toml's");
        }
    }
    assert_eq!(shared, 2 + 8 * 3);
}
