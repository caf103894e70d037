//! `load` from `hf:org/name[@revision]` through a local hub cache in offline mode (no network
//! here): the revision is pinned to the cached commit in the key, and the snapshot is referenced.

use std::path::Path;

use crate::support::{repo, Sandbox};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// `$HF_HOME/hub/models--rpt--tiny/{refs/main, snapshots/<commit>/…}` holding a fixture model.
fn hub_cache(home: &Path) {
    let repo_dir = home.join("hub").join("models--rpt--tiny");
    let snap = repo_dir.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), COMMIT).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(repo().join("tests/fixtures/bitnet_tiny").join(f), snap.join(f)).unwrap();
    }
}

#[test]
fn hub_models_load_offline_from_the_cache_and_pin_the_commit() {
    let sb = Sandbox::real();
    let home = sb.path().join("hf");
    hub_cache(&home);
    let p = sb.write(
        "p.toml",
        "[pipeline]\nname = \"hub\"\n[stages.base]\nkind = \"load\"\nmodel = \"hf:rpt/tiny\"\n\
         [stages.ppl]\nkind = \"eval-ppl\"\ninput = \"base\"\ndata = \"synthetic:facts:test\"\nseq_len = 12\nmax_windows = 3\n",
    );
    let run = |args: &[&str]| {
        let out = sb.cmd(args).env("HF_HOME", &home).env("HF_HUB_OFFLINE", "1").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["run", p.to_str().unwrap(), "-q"]);
    let explain = run(&["explain", p.to_str().unwrap(), "base"]);
    assert!(explain.contains(&format!("\"revision\":\"{COMMIT}\"")), "{explain}");
    assert!(explain.contains("\"pinned\":true"), "{explain}");
    let s = sb.session("hub.json");
    let base = &s["stages"]["base"]["metrics"];
    assert_eq!(base["arch"], "bitnet");
    assert!(base["source"]["snapshot"].as_str().unwrap().ends_with(COMMIT));
    let key = s["stages"]["base"]["key"].as_str().unwrap();
    let entry = sb.path().join("cache").join(&key[..2]).join(key);
    assert!(!entry.join("model.safetensors").exists(), "a hub snapshot is referenced, not copied");
    assert!(s["stages"]["ppl"]["metrics"]["ppl"].as_f64().unwrap().is_finite());

    // Offline and not cached: a clear error, not a hang.
    let q = sb.write("q.toml", "[stages.base]\nkind = \"load\"\nmodel = \"hf:rpt/absent\"\n");
    let out = sb.cmd(&["run", q.to_str().unwrap()]).env("HF_HOME", &home).env("HF_HUB_OFFLINE", "1").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HF_HUB_OFFLINE") && err.contains("rpt/absent"), "{err}");
}
