//! `cache ls | verify | gc` as a user runs them.

use std::time::Duration;

use crate::support::{has_checkpoint, repo, wait_until, Sandbox};

fn chain() -> String {
    repo().join("tests/pipelines/chain.toml").display().to_string()
}

#[test]
fn ls_lists_entries_and_verify_finds_damage() {
    let sb = Sandbox::new();
    let p = chain();
    assert!(sb.run(&["cache", "ls"]).expect(0).stdout().contains("is empty"));
    sb.run(&["run", &p, "-q"]).expect(0);
    let ls = sb.run(&["cache", "ls"]).expect(0).stdout();
    assert!(ls.contains("11 entries"), "{ls}");
    assert!(ls.contains("toy-scale") && ls.contains("toy-chain") && ls.contains("level[factor=0.25].tuned"), "{ls}");
    assert!(sb.run(&["cache", "verify"]).expect(0).stdout().contains("11 entries verified"));

    let s = sb.session("toy-chain.json");
    let key = s["stages"]["level[factor=0.25].tuned"]["key"].as_str().unwrap().to_string();
    let file = sb.path().join("cache").join(&key[..2]).join(&key).join("weights.json");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[3] ^= 0x01;
    std::fs::write(&file, bytes).unwrap();
    let bad = sb.run(&["cache", "verify"]).expect(1);
    assert!(bad.stdout().contains(&format!("DAMAGED {}", &key[..12])), "{}", bad.stdout());
    assert!(bad.stdout().contains("weights.json"), "{}", bad.stdout());
}

#[test]
fn gc_keeps_what_the_given_pipelines_use() {
    let sb = Sandbox::new();
    let p = chain();
    sb.run(&["run", &p, "-q"]).expect(0);
    sb.run(&["run", &p, "-q", "--profile", "tiny"]).expect(0);
    let other = sb.write("other.toml", "[stages.x]\nkind = \"toy-load\"\nsize = 3\n");
    sb.run(&["run", other.to_str().unwrap(), "-q"]).expect(0);

    let dry = sb.run(&["cache", "gc", "--keep", &p, "--dry-run"]).expect(0).stdout();
    assert!(dry.contains("would remove 1 entries"), "{dry}");
    assert!(sb.run(&["cache", "ls"]).expect(0).stdout().contains("23 entries"), "dry run removes nothing");

    let gc = sb.run(&["cache", "gc", "--keep", &p]).expect(0).stdout();
    assert!(gc.contains("removed 1 entries"), "{gc}");
    let ls = sb.run(&["cache", "ls"]).expect(0).stdout();
    assert!(ls.contains("22 entries"), "both profiles of the kept pipeline stay:\n{ls}");
    assert!(sb.run(&["run", &p]).expect(0).stdout().contains("nothing to compute"));

    let all = sb.run(&["cache", "gc", "--older-than", "0s"]).expect(0).stdout();
    assert!(all.contains("removed 22 entries"), "{all}");
    assert!(sb.run(&["cache", "ls"]).expect(0).stdout().contains("is empty"));
    let bad = sb.run(&["cache", "gc", "--older-than", "soon"]).expect(2);
    assert!(bad.stderr().contains("e.g. 30d"), "{}", bad.stderr());
}

#[test]
fn gc_never_removes_an_entry_a_running_process_reads() {
    let sb = Sandbox::new();
    let p = sb.write(
        "slow.toml",
        "[stages.base]\nkind = \"toy-load\"\n[stages.slow]\nkind = \"toy-scale\"\ninput = \"base\"\nfactor = 1.0\nsteps = 200\nsleep_ms = 20\n",
    );
    let mut child = sb.spawn(&["run", p.to_str().unwrap(), "-q"], &[]);
    assert!(wait_until(Duration::from_secs(60), || has_checkpoint(&sb.path().join("cache"))), "the slow stage started");
    let gc = sb.run(&["cache", "gc", "--older-than", "0s"]).expect(0).stdout();
    assert!(gc.contains("(in use by a running process)"), "{gc}");
    assert!(gc.contains("removed 0 entries"), "{gc}");
    child.kill().unwrap();
    child.wait().unwrap();
}
