//! `plan`, `graph` and `explain`: what will run, in which order, and why.

use crate::support::{repo, Sandbox};

fn chain() -> String {
    repo().join("tests/pipelines/chain.toml").display().to_string()
}

#[test]
fn plan_json_lists_instances_in_topological_order_with_full_keys() {
    let sb = Sandbox::new();
    let doc = sb.run(&["plan", &chain(), "--format", "json"]).expect(0).json();
    let inst = doc["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 11);
    let names: Vec<&str> = inst.iter().map(|i| i["name"].as_str().unwrap()).collect();
    for (pos, i) in inst.iter().enumerate() {
        let key = i["key"].as_str().unwrap();
        assert_eq!(key.len(), 64, "full hex key");
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(i["status"], "to run");
        for input in i["inputs"].as_array().unwrap() {
            let at = names.iter().position(|n| *n == input.as_str().unwrap()).unwrap();
            assert!(at < pos, "{} runs before its input {}", names[pos], input);
        }
    }
    let l2 = inst.iter().find(|i| i["name"] == "level[factor=0.25].pruned").unwrap();
    assert_eq!(l2["inputs"][0], "level[factor=0.5].tuned", "a chain level starts from the previous level's carry");
    let l1 = inst.iter().find(|i| i["name"] == "level[factor=0.5].pruned").unwrap();
    assert_eq!(l1["inputs"][0], "base", "the first level starts from `from`");
    assert_eq!(l1["params"]["factor"], 0.5);
    assert_eq!(l1["params"]["steps"], 1, "the stage's own value beats [defaults]");
    let t1 = inst.iter().find(|i| i["name"] == "level[factor=0.5].tuned").unwrap();
    assert_eq!(t1["params"]["steps"], 4, "[defaults.toy-scale] applies");
    assert_eq!(t1["params"]["checkpoint_every"], 1, "schema defaults are filled in");
}

#[test]
fn plan_says_why_something_will_run() {
    let sb = Sandbox::new();
    let p = chain();
    sb.run(&["run", &p, "-q"]).expect(0);
    let all = sb.run(&["plan", &p]).expect(0).stdout();
    assert!(all.contains("11 cached, 0 partial, 0 to run"), "{all}");

    let changed = sb.run(&["plan", &p, "--set", "sweeps.level.stages.tuned.factor=2"]).expect(0).stdout();
    assert!(changed.contains("new params: params.factor: 1.5 → 2.0"), "{changed}");
    assert!(changed.contains("new input: `level[factor=0.5].tuned` is not cached yet"), "{changed}");
    assert!(changed.contains("3 cached, 0 partial, 8 to run"), "{changed}");

    let mut cmd = sb.cmd(&["plan", &p]);
    cmd.env("TOY_EVAL_VERSION", "2");
    let bumped = String::from_utf8(cmd.output().unwrap().stdout).unwrap();
    assert!(bumped.contains("version bump: version: 1 → 2"), "{bumped}");
    assert!(bumped.contains("7 cached, 0 partial, 4 to run"), "{bumped}");
}

#[test]
fn graph_draws_every_instance_and_edge() {
    let sb = Sandbox::new();
    let dot = sb.run(&["graph", &chain(), "--format", "dot"]).expect(0).stdout();
    assert!(dot.starts_with("digraph \"toy-chain\""));
    assert_eq!(dot.matches(" -> ").count(), 10);
    assert_eq!(dot.matches("[label=").count(), 21);
    assert!(dot.contains("level[factor=0.25].tuned\\ntoy-scale"));
    let mermaid = sb.run(&["graph", &chain(), "--format", "mermaid"]).expect(0).stdout();
    assert!(mermaid.starts_with("flowchart LR"));
    assert_eq!(mermaid.matches("-->|input|").count(), 10);
}

#[test]
fn explain_shows_key_material_and_the_nearest_cached_difference() {
    let sb = Sandbox::new();
    let p = chain();
    let first = sb.run(&["explain", &p, "level[factor=0.5].tuned"]).expect(0).stdout();
    assert!(first.contains("kind      toy-scale (version 1)"), "{first}");
    assert!(first.contains("factor = 1.5"), "{first}");
    assert!(first.contains("input ← level[factor=0.5].pruned"), "{first}");
    assert!(first.contains("no cached `toy-scale` entry to compare with"), "{first}");
    sb.run(&["run", &p, "-q"]).expect(0);
    let cached = sb.run(&["explain", &p, "level[factor=0.5].tuned"]).expect(0).stdout();
    assert!(cached.contains("status    cached"), "{cached}");
    let changed = sb
        .run(&["explain", &p, "level[factor=0.5].tuned", "--set", "sweeps.level.stages.tuned.steps=9"])
        .expect(0)
        .stdout();
    assert!(changed.contains("nearest cached entry:"), "{changed}");
    assert!(changed.contains("(pipeline toy-chain, instance level[factor=0.5].tuned)"), "{changed}");
    assert!(changed.contains("differs: params.steps: 4 → 9"), "{changed}");
    let bad = sb.run(&["explain", &p, "level[factor=0.5].tunde"]).expect(2);
    assert!(bad.stderr().contains("did you mean `level[factor=0.5].tuned`?"), "{}", bad.stderr());
}
