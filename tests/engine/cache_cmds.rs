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

/// `gc --keep` must not delete GPU results or levels added with `--set`: it keeps every device
/// class and every key a recorded run of the pipeline used (its session files).
#[test]
fn gc_keep_spares_gpu_runs_and_runs_with_overrides() {
    let sb = Sandbox::new();
    let p = chain();
    sb.run(&["run", &p, "-q"]).expect(0);
    // A GPU run's entries (this build has no CUDA): the same cache keyed for the cuda class.
    let cuda_keys = gpu_keys(&sb, &p);
    assert_eq!(cuda_keys.len(), 11);
    if !cfg!(feature = "cuda") {
        let r = sb.run(&["run", &p, "--device", "cuda"]).expect(2);
        assert!(r.stderr().contains("built without CUDA"), "planning for cuda is fine, running is not: {}", r.stderr());
    }
    let more = "sweeps.level.over.factor=[0.5, 0.25, 0.125, 0.0625]";
    sb.run(&["run", &p, "-q", "--set", more]).expect(0);
    let before = sb.run(&["cache", "ls"]).expect(0).stdout();
    // 11 on the CPU, 11 under the cuda device class, 3 for the appended level.
    assert!(before.contains("25 entries"), "{before}");
    let other = sb.write("other.toml", "[stages.x]\nkind = \"toy-load\"\nsize = 3\n");
    sb.run(&["run", other.to_str().unwrap(), "-q"]).expect(0);

    let gc = sb.run(&["cache", "gc", "--keep", &p]).expect(0).stdout();
    assert!(gc.contains("removed 1 entries"), "only the other pipeline's entry goes:\n{gc}");
    assert!(sb.run(&["cache", "ls"]).expect(0).stdout().contains("25 entries"));
    assert!(sb.run(&["run", &p, "-q", "--set", more]).expect(0).stdout().contains("nothing to compute"));
    for k in &cuda_keys {
        assert!(sb.path().join("cache").join(&k[..2]).join(k).is_dir(), "GPU entry {k} kept");
    }
    // Without the session files, the appended level is unknown to --keep and goes.
    std::fs::remove_dir_all(sb.path().join("sessions")).unwrap();
    let gc = sb.run(&["cache", "gc", "--keep", &p]).expect(0).stdout();
    assert!(gc.contains("removed 3 entries"), "{gc}");
}

/// Copies every CPU entry of pipeline `p` to the key it has under the `cuda` device class (what a
/// GPU run would have committed: this build has no CUDA, but any build plans for either class)
/// and returns those keys.
fn gpu_keys(sb: &Sandbox, p: &str) -> Vec<String> {
    let keys = |device: &str| -> Vec<String> {
        let plan = sb.run(&["plan", p, "--format", "json", "--device", device]).expect(0).json();
        plan["instances"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap().to_string()).collect()
    };
    let cache = sb.path().join("cache");
    let (cpu, cuda) = (keys("cpu"), keys("cuda"));
    for (c, g) in cpu.iter().zip(&cuda) {
        assert_ne!(c, g, "the device class is part of the key");
        let (from, to) = (cache.join(&c[..2]).join(c), cache.join(&g[..2]).join(g));
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(&from).unwrap() {
            let e = e.unwrap();
            let text = std::fs::read(e.path()).unwrap();
            // The manifest names its key: rename it, so the copy is a consistent entry.
            let text = if e.file_name() == "manifest.json" {
                String::from_utf8(text).unwrap().replace(c.as_str(), g).into_bytes()
            } else {
                text
            };
            std::fs::write(to.join(e.file_name()), text).unwrap();
        }
    }
    cuda
}

/// A cache whose last-use records cannot be written (a shared read-only cache; simulated with a
/// directory where the record's file goes, which even root cannot replace) still serves its
/// entries: the run succeeds, computes nothing and warns.
#[test]
fn a_cache_that_cannot_record_use_still_serves_its_entries() {
    let sb = Sandbox::new();
    let p = chain();
    sb.run(&["run", &p, "-q"]).expect(0);
    let cache = sb.path().join("cache");
    for shard in std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()) {
        for entry in std::fs::read_dir(&shard).into_iter().flatten().map(|e| e.unwrap().path()) {
            let record = entry.join("last_used.json");
            if record.is_file() {
                std::fs::remove_file(&record).unwrap();
                std::fs::create_dir(&record).unwrap();
                std::fs::write(record.join("blocker"), "x").unwrap();
            }
        }
    }
    let again = sb.run(&["run", &p]).expect(0);
    assert!(again.stdout().contains("nothing to compute"), "{}", again.stdout());
    assert!(again.stderr().contains("could not record the use of entry"), "{}", again.stderr());
}

#[test]
fn a_cache_root_that_is_a_file_is_a_usage_error() {
    let sb = Sandbox::new();
    let file = sb.write("not-a-dir", "x");
    for args in [vec!["run", &chain()[..]], vec!["cache", "ls"], vec!["plan", &chain()[..]]] {
        let mut args: Vec<&str> = args;
        args.extend(["--cache", file.to_str().unwrap()]);
        let run = sb.run(&args).expect(2);
        assert!(run.stderr().contains("is not a directory"), "{args:?}: {}", run.stderr());
    }
}

/// `rpt-flow plan … | head -1`: the listing ends quietly when the reader goes away.
#[test]
fn a_closed_pipe_ends_a_listing_quietly() {
    use std::process::Stdio;
    let sb = Sandbox::new();
    let p = chain();
    let mut child = sb.cmd(&["plan", &p]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take()); // the reader goes away before anything is printed
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "no panic exit: {stderr}");
}

/// Runs with `--set` or a profile get their own session files (none overwrites the plain run's),
/// and the pipeline's report lists every recorded run.
#[test]
fn set_runs_keep_their_own_sessions_and_the_report_lists_them() {
    let sb = Sandbox::new();
    let p = chain();
    sb.run(&["run", &p, "-q"]).expect(0);
    sb.run(&["run", &p, "-q", "--set", "stages.base.size=8"]).expect(0);
    sb.run(&["run", &p, "-q", "--profile", "tiny"]).expect(0);
    let today = time::OffsetDateTime::now_utc().date().to_string();
    let mut files: Vec<String> = std::fs::read_dir(sb.path().join("sessions").join(&today))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(files.iter().any(|f| f.starts_with("toy-chain.set-")), "{files:?}");
    assert_eq!(sb.session("toy-chain.json")["overrides"], serde_json::json!([]), "the plain run's file is its own");
    let report = sb.run(&["report", &p, "--no-plots"]).expect(0).stdout();
    let runs = report.split("## Recorded runs").nth(1).unwrap_or_else(|| panic!("no recorded runs:\n{report}"));
    for f in &files {
        assert!(runs.contains(f.as_str()), "{f} listed:\n{runs}");
    }
    assert!(runs.contains("--set stages.base.size=8") && runs.contains("complete"), "{runs}");
}

/// A session file that cannot be written (the disk is full; here a file-size limit, with
/// SIGXFSZ ignored so the write fails instead of killing the process) is an error naming the
/// file, and no temporary file is left behind.
#[test]
fn a_failed_session_write_names_the_file_and_leaves_no_temporary() {
    use std::os::unix::process::CommandExt as _;
    let sb = Sandbox::new();
    let mut cmd = sb.cmd(&["run", &chain(), "-q"]);
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit { rlim_cur: 600, rlim_max: 600 };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("writing the session file") && stderr.contains("toy-chain.json"), "{stderr}");
    let today = time::OffsetDateTime::now_utc().date().to_string();
    let left: Vec<_> = std::fs::read_dir(sb.path().join("sessions").join(today))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.iter().all(|n| !n.to_string_lossy().ends_with(".tmp")), "temporary files left: {left:?}");
}
