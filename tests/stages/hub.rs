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
    assert!(explain.contains(&format!("\"commit\":\"{COMMIT}\"")), "{explain}");
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
    assert_eq!(out.status.code(), Some(2), "an unresolvable revision is bad input, found before anything runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HF_HUB_OFFLINE") && err.contains("rpt/absent") && err.contains("Pin a commit"), "{err}");
}

/// The tiny BitNet fixture's files, as the mock hub publishes them.
fn fixture_files() -> std::collections::BTreeMap<String, Vec<u8>> {
    ["config.json", "model.safetensors", "tokenizer.json"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(repo().join("tests/fixtures/bitnet_tiny").join(f)).unwrap()))
        .collect()
}

const COMMIT_B: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// The real download path against a loopback mock of the hub: an unpinned `hf:org/name` is keyed
/// by the commit the hub names before anything is downloaded, so the key is the same before and
/// after the first run (a killed first run resumes, a finished one shows as cached), offline mode
/// agrees with it from the local refs, and a moved `main` is a new key.
#[test]
fn an_unpinned_hub_model_is_keyed_by_its_commit_before_and_after_download() {
    let hub = crate::mock_hub::MockHub::start();
    let files = fixture_files();
    hub.publish("rpt/tiny", "main", COMMIT, files);
    let sb = Sandbox::real();
    let home = sb.path().join("hf");
    let p = sb.write(
        "p.toml",
        "[pipeline]\nname = \"hub\"\n[stages.base]\nkind = \"load\"\nmodel = \"hf:rpt/tiny\"\ndtype = \"f32\"\n",
    );
    let p = p.to_str().unwrap();
    let cli = |args: &[&str], offline: bool| {
        let mut c = sb.cmd(args);
        c.env("HF_HOME", &home).env("HF_ENDPOINT", &hub.endpoint).env_remove("HF_TOKEN");
        if offline {
            c.env("HF_HUB_OFFLINE", "True");
        } else {
            c.env_remove("HF_HUB_OFFLINE");
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let base = |plan: &str| -> (String, String) {
        let v: serde_json::Value = serde_json::from_str(plan).unwrap();
        let i = v["instances"].as_array().unwrap().iter().find(|i| i["name"] == "base").unwrap().clone();
        (i["key"].as_str().unwrap().to_string(), i["status"].as_str().unwrap().to_string())
    };
    let (key, status) = base(&cli(&["plan", p, "--format", "json"], false));
    assert_eq!(status, "to run");
    assert!(!home.join("hub/models--rpt--tiny/refs/main").exists(), "planning downloads nothing");
    cli(&["run", p, "-q"], false);
    let s = sb.session("hub.json");
    assert_eq!(s["stages"]["base"]["key"], key.as_str(), "the key did not move with the download");
    assert_eq!(s["stages"]["base"]["metrics"]["source"]["commit"], COMMIT);
    let snapshot = home.join("hub/models--rpt--tiny/snapshots").join(COMMIT);
    assert!(snapshot.join("model.safetensors").exists(), "downloaded into the hub cache");
    assert_eq!(base(&cli(&["plan", p, "--format", "json"], false)), (key.clone(), "cached".into()));

    // Offline: the local refs give the same commit, and nothing asks the hub.
    let asked = hub.requests();
    assert_eq!(base(&cli(&["plan", p, "--format", "json"], true)), (key.clone(), "cached".into()));
    assert!(cli(&["run", p], true).contains("nothing to compute"));
    assert_eq!(hub.requests(), asked, "offline mode sent requests");

    // `main` moves: a new commit is a new key.
    let files = fixture_files();
    hub.publish("rpt/tiny", "main", COMMIT_B, files);
    let (moved, status) = base(&cli(&["plan", p, "--format", "json"], false));
    assert_ne!(moved, key);
    assert_eq!(status, "to run");
    // Pinned to the old commit, it is keyed without asking the hub which commit `main` is now.
    let pinned = std::fs::read_to_string(p).unwrap().replace("hf:rpt/tiny", &format!("hf:rpt/tiny@{COMMIT}"));
    let pinned = sb.write("pinned.toml", &pinned);
    let asked = hub.requests();
    cli(&["plan", pinned.to_str().unwrap()], false);
    assert_eq!(hub.requests(), asked, "a pinned commit needs no hub request to be keyed");
}

/// Models read the hub environment as datasets do (one reader, `rpt_flow::hub`): `HF_HUB_CACHE`
/// wins over `HF_HOME`, and `HF_HUB_OFFLINE` takes huggingface_hub's values in any case.
#[test]
fn models_honour_hf_hub_cache_and_offline_values_like_datasets() {
    let sb = Sandbox::real();
    let elsewhere = sb.path().join("elsewhere");
    hub_cache(&elsewhere); // elsewhere/hub/models--rpt--tiny/…
    let p = sb.write("p.toml", "[pipeline]\nname = \"hub\"\n[stages.base]\nkind = \"load\"\nmodel = \"hf:rpt/tiny\"\n");
    for value in ["yes", "On", "TRUE", "1"] {
        let out = sb
            .cmd(&["plan", p.to_str().unwrap()])
            .env("HF_HUB_CACHE", elsewhere.join("hub"))
            .env("HF_HOME", sb.path().join("empty-home"))
            .env("HF_HUB_OFFLINE", value)
            .env("HF_ENDPOINT", "http://127.0.0.1:9") // nothing listens: offline must not ask
            .output()
            .unwrap();
        assert!(out.status.success(), "HF_HUB_OFFLINE={value}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = sb
        .cmd(&["run", p.to_str().unwrap(), "-q"])
        .env("HF_HUB_CACHE", elsewhere.join("hub"))
        .env("HF_HOME", sb.path().join("empty-home"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let snap = sb.session("hub.json")["stages"]["base"]["metrics"]["source"]["snapshot"].as_str().unwrap().to_string();
    assert!(snap.starts_with(elsewhere.to_str().unwrap()), "read from HF_HUB_CACHE: {snap}");
}

/// The real download code end to end against the mock hub: the model and the WikiText parquet
/// file arrive through hf-hub into the hub cache, and a download cut off half-way resumes from
/// its `.part` file on the next run instead of starting over.
#[test]
fn a_model_and_wikitext_download_and_an_interrupted_download_resumes() {
    let hub = crate::mock_hub::MockHub::start();
    let files = fixture_files();
    hub.publish("rpt/tiny", "main", COMMIT, files);
    // A WikiText test split of our own text, as the hub's parquet conversion stores it.
    let sb = Sandbox::real();
    let rows: Vec<String> =
        (0..200)
            .map(|i| {
                if i % 5 == 0 {
                    String::new()
                } else {
                    format!(" The quiet river number {i} turned silver at dusk .\n")
                }
            })
            .collect();
    let parquet = sb.path().join("test.parquet");
    rpt_flow::data::write_text_column(&parquet, "text", &rows).unwrap();
    let rev = rpt_flow::data::WIKITEXT_REVISION;
    let name = "wikitext-2-raw-v1/test-00000-of-00001.parquet";
    let mut data = std::collections::BTreeMap::new();
    data.insert(name.to_string(), std::fs::read(&parquet).unwrap());
    hub.publish(&format!("datasets/{}", rpt_flow::data::WIKITEXT_REPO), rev, rev, data);
    hub.cut_next_download("model.safetensors");

    let home = sb.path().join("hf");
    let p = sb.write(
        "p.toml",
        "[pipeline]\nname = \"dl\"\n[stages.base]\nkind = \"load\"\nmodel = \"hf:rpt/tiny\"\ndtype = \"f32\"\n\
         [stages.ppl]\nkind = \"eval-ppl\"\ninput = \"base\"\ndata = \"wikitext-2-raw-v1:test\"\nseq_len = 16\nmax_windows = 4\n",
    );
    let run = || {
        sb.cmd(&["run", p.to_str().unwrap(), "-q"])
            .env("HF_HOME", &home)
            .env("HF_ENDPOINT", &hub.endpoint)
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_TOKEN")
            .output()
            .unwrap()
    };
    let first = run();
    assert!(!first.status.success(), "the cut-off download fails the first run");
    let blobs = home.join("hub/models--rpt--tiny/blobs");
    let part = std::fs::read_dir(&blobs).unwrap().flatten().any(|e| e.path().extension().is_some_and(|x| x == "part"));
    assert!(part, "the partial download is kept in {}", blobs.display());
    let second = run();
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    let size = std::fs::metadata(repo().join("tests/fixtures/bitnet_tiny/model.safetensors")).unwrap().len() as usize;
    assert_eq!(hub.resumed_from(), vec![size / 2], "resumed where the cut left it");
    let s = sb.session("dl.json");
    assert!(s["stages"]["ppl"]["metrics"]["ppl"].as_f64().unwrap().is_finite());
    assert_eq!(s["stages"]["ppl"]["metrics"]["windows"], 4);
    let snapshot = home.join("hub/datasets--Salesforce--wikitext/snapshots").join(rev).join(name);
    assert!(snapshot.is_file(), "WikiText came through the hub cache");
}
