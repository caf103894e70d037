//! The cache-key consequences users rely on: a chain's prefix keeps its keys when the chain grows,
//! a change reaches exactly the instances downstream of it, and pipelines share entries.

use crate::support::{plan_keys, repo, Sandbox};

fn chain() -> String {
    repo().join("tests/pipelines/chain.toml").display().to_string()
}

#[test]
fn appending_a_level_keeps_every_earlier_key() {
    let sb = Sandbox::new();
    let p = chain();
    let before = plan_keys(&sb, &[&p]);
    let after = plan_keys(&sb, &[&p, "--set", "sweeps.level.over.factor=[0.5, 0.25, 0.125, 0.0625]"]);
    assert_eq!(after.len(), before.len() + 3);
    for (name, key) in &before {
        let (_, k) = after.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} disappeared"));
        assert_eq!(k, key, "{name} changed its key when a level was appended");
    }
}

#[test]
fn changing_one_level_changes_it_and_every_later_level_only() {
    let sb = Sandbox::new();
    let p = chain();
    let before = plan_keys(&sb, &[&p]);
    let after = plan_keys(&sb, &[&p, "--set", "sweeps.level.over.factor=[0.5, 0.3, 0.125]"]);
    let key = |list: &[(String, String)], name: &str| list.iter().find(|(n, _)| n == name).unwrap().1.clone();
    for unchanged in
        ["base", "baseline", "level[factor=0.5].pruned", "level[factor=0.5].tuned", "level[factor=0.5].after"]
    {
        assert_eq!(key(&before, unchanged), key(&after, unchanged), "{unchanged} should keep its key");
    }
    assert_ne!(key(&before, "level[factor=0.25].pruned"), key(&after, "level[factor=0.3].pruned"));
    // Level 3 has the same name and parameters but starts from a different level 2.
    for later in ["level[factor=0.125].pruned", "level[factor=0.125].tuned", "level[factor=0.125].after"] {
        assert_ne!(key(&before, later), key(&after, later), "{later} must change with its chain parent");
    }
}

#[test]
fn pipelines_sharing_a_prefix_share_its_entries() {
    let sb = Sandbox::new();
    let a = sb.write(
        "a.toml",
        "[pipeline]\nname = \"a\"\nseed = 7\n[stages.base]\nkind = \"toy-load\"\nsize = 16\n[stages.scaled]\nkind = \"toy-scale\"\ninput = \"base\"\nfactor = 2\n",
    );
    // Same stages written differently (order, explicit default, 2 vs 2.0), plus more.
    let b = sb.write(
        "b.toml",
        "[pipeline]\nname = \"b\"\nseed = 7\n[stages.scaled]\nfactor = 2.0\nsteps = 1\ninput = \"base\"\nkind = \"toy-scale\"\n[stages.base]\nsize = 16\nkind = \"toy-load\"\n[stages.more]\nkind = \"toy-eval\"\ninput = \"scaled\"\n",
    );
    let ka = plan_keys(&sb, &[a.to_str().unwrap()]);
    let kb = plan_keys(&sb, &[b.to_str().unwrap()]);
    for name in ["base", "scaled"] {
        let x = &ka.iter().find(|(n, _)| n == name).unwrap().1;
        let y = &kb.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(x, y, "{name}");
    }
    sb.run(&["run", a.to_str().unwrap(), "-q"]).expect(0);
    let plan = sb.run(&["plan", b.to_str().unwrap()]).expect(0).stdout();
    assert!(plan.contains("1 instances") || plan.contains("2 cached"), "{plan}");
    let doc = sb.run(&["plan", b.to_str().unwrap(), "--format", "json"]).expect(0).json();
    let status: Vec<&str> =
        doc["instances"].as_array().unwrap().iter().map(|i| i["status"].as_str().unwrap()).collect();
    assert_eq!(status, ["cached", "cached", "to run"]);
}

#[test]
fn equal_numbers_spelled_differently_give_one_key_and_the_seed_reaches_only_seeded_stages() {
    let sb = Sandbox::new();
    let body = |factor: &str, seed: u32| {
        format!("[pipeline]\nseed = {seed}\n[stages.base]\nkind = \"toy-load\"\n[stages.s]\nkind = \"toy-scale\"\ninput = \"base\"\nfactor = {factor}\n[stages.t]\nkind = \"toy-text\"\ninput = \"base\"\n")
    };
    let k1 = plan_keys(&sb, &[sb.write("x1.toml", &body("0.1", 0)).to_str().unwrap()]);
    let k2 = plan_keys(&sb, &[sb.write("x2.toml", &body("0.10", 0)).to_str().unwrap()]);
    let k3 = plan_keys(&sb, &[sb.write("x3.toml", &body("0.100000000000000001", 0)).to_str().unwrap()]);
    assert_eq!(k1, k2);
    assert_eq!(k1, k3);
    let k4 = plan_keys(&sb, &[sb.write("x4.toml", &body("0.15", 0)).to_str().unwrap()]);
    assert_eq!(k1[0], k4[0]);
    assert_ne!(k1[1], k4[1]);
    // toy-load takes the pipeline seed as its default: a new seed changes everything downstream.
    let k5 = plan_keys(&sb, &[sb.write("x5.toml", &body("0.1", 1)).to_str().unwrap()]);
    assert_ne!(k1[0], k5[0]);
}

#[test]
fn profiles_are_applied_before_hashing() {
    let sb = Sandbox::new();
    let p = chain();
    let full = plan_keys(&sb, &[&p]);
    let tiny = plan_keys(&sb, &[&p, "--profile", "tiny"]);
    let by_hand = plan_keys(&sb, &[&p, "--set", "stages.base.size=4", "--set", "defaults.toy-scale.steps=2"]);
    assert_eq!(tiny, by_hand, "a profile is only a set of overrides");
    assert_ne!(full[0].1, tiny[0].1, "the profile's base has its own key");
}

#[test]
fn the_device_class_is_part_of_the_key() {
    let sb = Sandbox::new();
    let p = chain();
    let cpu = plan_keys(&sb, &[&p, "--device", "cpu"]);
    assert_eq!(cpu, plan_keys(&sb, &[&p]));
    let bad = sb.run(&["plan", &p, "--device", "tpu"]).expect(2);
    assert!(bad.stderr().contains("--device `tpu` is not cpu, cuda or cuda:N"), "{}", bad.stderr());
}
