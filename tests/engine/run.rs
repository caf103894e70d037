//! `run`: session files, caching across runs, failures and --keep-going.

use crate::support::{repo, results, Sandbox};

fn chain() -> String {
    repo().join("tests/pipelines/chain.toml").display().to_string()
}

#[test]
fn run_writes_a_session_and_a_second_run_computes_nothing() {
    let sb = Sandbox::new();
    let p = chain();
    let first = sb.cmd(&["run", &p, "--profile", "tiny"]).env("TOY_LOG", "log").output().unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(String::from_utf8_lossy(&first.stdout).contains("11 instances: 11 computed, 0 cached"));
    assert_eq!(sb.log_lines("log").len(), 11, "each instance computed once");

    let s = sb.session("toy-chain.tiny.json");
    assert_eq!(s["pipeline"], "toy-chain");
    assert_eq!(s["status"], "complete");
    assert_eq!(s["profiles"][0], "tiny");
    let stages = s["stages"].as_object().unwrap();
    assert_eq!(stages.len(), 11);
    let plan = sb.run(&["plan", &p, "--profile", "tiny", "--format", "json"]).expect(0).json();
    for i in plan["instances"].as_array().unwrap() {
        let st = &stages[i["name"].as_str().unwrap()];
        assert_eq!(st["key"], i["key"], "session key = plan key");
        assert_eq!(st["kind"], i["kind"]);
        assert_eq!(st["cached"], false);
        assert_eq!(st["status"], "done");
        assert!(st["seconds"].as_f64().unwrap() >= 0.0);
        assert_eq!(st["params"], i["params"]);
        assert!(st["metrics"].is_object());
    }
    let size = stages["base"]["metrics"]["size"].as_u64().unwrap();
    assert_eq!(size, 4, "the tiny profile's size reached the stage");
    let mean = stages["baseline"]["metrics"]["mean"].as_f64().unwrap();
    let sum = stages["base"]["metrics"]["sum"].as_f64().unwrap();
    assert!((mean - sum / 4.0).abs() < 1e-12, "baseline reads base's weights");
    assert_eq!(stages["level[factor=0.5].tuned"]["sweep"]["values"]["factor"], 0.5);

    let second = sb.cmd(&["run", &p, "--profile", "tiny"]).env("TOY_LOG", "log").output().unwrap();
    assert!(second.status.success());
    assert!(String::from_utf8_lossy(&second.stdout).contains("nothing to compute: all 11 instances were cached"));
    assert_eq!(sb.log_lines("log").len(), 11, "nothing recomputed");
    let s2 = sb.session("toy-chain.tiny.json");
    assert!(s2["stages"].as_object().unwrap().values().all(|v| v["cached"] == true && v["status"] == "cached"));
    assert_eq!(results(&s), results(&s2), "cached results equal computed ones");
}

#[test]
fn results_are_bit_identical_across_fresh_caches() {
    let (a, b) = (Sandbox::new(), Sandbox::new());
    let p = chain();
    a.run(&["run", &p, "-q"]).expect(0);
    b.run(&["run", &p, "-q"]).expect(0);
    assert_eq!(results(&a.session("toy-chain.json")), results(&b.session("toy-chain.json")));
}

#[test]
fn cache_and_session_locations_can_be_overridden() {
    let sb = Sandbox::new();
    let p = chain();
    sb.run(&["run", &p, "-q", "--cache", "c1", "--sessions", "s1"]).expect(0);
    assert!(sb.path().join("c1").is_dir() && sb.path().join("s1").is_dir());
    assert!(!sb.path().join("cache").exists() && !sb.path().join("sessions").exists());
    let out = sb.cmd(&["run", &p]).env("RPT_CACHE", "c1").env("RPT_SESSIONS", "s2").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to compute"), "RPT_CACHE is honoured");
    assert!(sb.path().join("s2").is_dir());
}

const FAILING: &str = r#"
[pipeline]
name = "failing"

[stages.base]
kind = "toy-load"

[stages.broken]
kind = "toy-fail"
input = "base"
message = "the stage broke on purpose"

[stages.after_broken]
kind = "toy-eval"
input = "broken_model"

[stages.broken_model]
kind = "toy-scale"
input = "base"
factor = 2
fail_at_step = 0

[stages.independent]
kind = "toy-eval"
input = "base"
"#;

#[test]
fn a_failure_stops_the_run_records_the_error_and_commits_nothing() {
    let sb = Sandbox::new();
    let p = sb.write("failing.toml", FAILING);
    let run = sb.run(&["run", p.to_str().unwrap()]).expect(1);
    assert!(run.stderr().contains("broken: the stage broke on purpose"), "{}", run.stderr());
    let s = sb.session("failing.json");
    assert_eq!(s["status"], "failed");
    assert_eq!(s["stages"]["broken"]["status"], "failed");
    assert_eq!(s["stages"]["broken"]["error"], "the stage broke on purpose");
    assert_eq!(s["stages"]["independent"]["status"], "pending", "fail-fast stops at the first failure");
    let key = s["stages"]["broken"]["key"].as_str().unwrap();
    assert!(!sb.path().join("cache").join(&key[..2]).join(key).exists(), "a failed stage leaves no entry");
    let tmp = sb.path().join("cache/tmp");
    assert!(!tmp.exists() || std::fs::read_dir(&tmp).unwrap().next().is_none(), "no half-written leftovers");
}

#[test]
fn keep_going_runs_independent_branches_and_skips_dependents() {
    let sb = Sandbox::new();
    let p = sb.write("failing.toml", FAILING);
    let run = sb.run(&["run", p.to_str().unwrap(), "--keep-going"]).expect(1);
    let err = run.stderr();
    assert!(err.contains("2 instance(s) failed"), "{err}");
    assert!(err.contains("broken_model: toy failure at step 0"), "{err}");
    assert!(err.contains("not run because an input failed: after_broken"), "{err}");
    let s = sb.session("failing.json");
    assert_eq!(s["stages"]["independent"]["status"], "done");
    assert_eq!(s["stages"]["after_broken"]["status"], "skipped");
    assert_eq!(s["stages"]["after_broken"]["error"], "not run: input `broken_model` failed");
}

/// The session file is versioned: this version writes `format` 2, reads its own and older files
/// (the report goldens are format 1; this one also carries a field it does not know), and
/// refuses a newer format with a clear message instead of misreading it.
#[test]
fn session_files_carry_their_format_and_newer_ones_are_refused() {
    let sb = Sandbox::new();
    let p = chain();
    sb.run(&["run", &p, "--profile", "tiny"]).expect(0);
    let s = sb.session("toy-chain.tiny.json");
    assert_eq!(s["format"], 2);
    let today = time::OffsetDateTime::now_utc().date().to_string();
    let path = sb.path().join("sessions").join(&today).join("toy-chain.tiny.json");

    let mut older = s.clone();
    older.as_object_mut().unwrap().remove("format");
    older["from_a_later_tool"] = serde_json::json!({"kept": true});
    let old_path = sb.write("old.json", &serde_json::to_string_pretty(&older).unwrap());
    let out = sb.run(&["report", old_path.to_str().unwrap(), "--no-plots"]).expect(0).stdout();
    assert!(out.contains("toy-chain"), "{out}");

    let mut newer = s.clone();
    newer["format"] = serde_json::json!(3);
    std::fs::write(&path, serde_json::to_string(&newer).unwrap()).unwrap();
    let err = sb.run(&["report", path.to_str().unwrap(), "--no-plots"]).expect(2).stderr();
    assert!(err.contains("session format 3 is newer than this rpt-flow reads"), "{err}");
}

/// `--jobs 2` runs independent instances at the same time, a consumer only after its input, and
/// gives exactly the session of a one-at-a-time run.
#[test]
fn jobs_run_independent_instances_at_once_with_the_same_results() {
    const PAR: &str = "[pipeline]\nname = \"par\"\nseed = 3\n\
        [stages.base]\nkind = \"toy-load\"\nsize = 4\n\
        [stages.a]\nkind = \"toy-scale\"\ninput = \"base\"\nfactor = 2\nsteps = 4\nsleep_ms = 150\n\
        [stages.b]\nkind = \"toy-scale\"\ninput = \"base\"\nfactor = 3\nsteps = 4\nsleep_ms = 150\n\
        [stages.c]\nkind = \"toy-scale\"\ninput = \"a\"\nfactor = 0.5\nsteps = 2\nsleep_ms = 20\n\
        [stages.eval]\nkind = \"toy-eval\"\ninput = \"c\"\n";
    let parallel = Sandbox::new();
    let p = parallel.write("par.toml", PAR);
    let out = parallel.cmd(&["run", p.to_str().unwrap(), "--jobs", "2"]).env("TOY_SPANS", "spans").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut spans: std::collections::HashMap<String, (u128, u128)> = Default::default();
    for line in parallel.log_lines("spans") {
        let f: Vec<&str> = line.split(' ').collect();
        let e = spans.entry(f[0].to_string()).or_default();
        let t: u128 = f[2].parse().unwrap();
        if f[1] == "start" {
            e.0 = t;
        } else {
            e.1 = t;
        }
    }
    let (a, b, c) = (spans["a"], spans["b"], spans["c"]);
    assert!(a.0 < b.1 && b.0 < a.1, "a and b are independent and ran at once: {spans:?}");
    assert!(c.0 >= a.1, "c reads a: it starts after a ends: {spans:?}");

    let serial = Sandbox::new();
    let q = serial.write("par.toml", PAR);
    serial.run(&["run", q.to_str().unwrap()]).expect(0);
    let (sp, ss) = (parallel.session("par.json"), serial.session("par.json"));
    assert_eq!(sp["status"], "complete");
    for name in ["base", "a", "b", "c", "eval"] {
        let (x, y) = (&sp["stages"][name], &ss["stages"][name]);
        assert_eq!(x["key"], y["key"], "{name}");
        assert_eq!(x["status"], y["status"], "{name}");
        assert_eq!(x["metrics"], y["metrics"], "{name}: the same numbers in parallel");
    }
    let names: Vec<&String> = sp["stages"].as_object().unwrap().keys().collect();
    let serial_names: Vec<&String> = ss["stages"].as_object().unwrap().keys().collect();
    assert_eq!(names, serial_names, "the session lists instances in plan order either way");
}

/// With `--jobs`, a failure still stops what has not started (the running ones finish), and
/// `--keep-going` still skips exactly the dependents.
#[test]
fn jobs_keep_the_failure_rules() {
    let sb = Sandbox::new();
    let p = sb.write("failing.toml", FAILING);
    let run = sb.run(&["run", p.to_str().unwrap(), "--keep-going", "--jobs", "3"]).expect(1);
    let err = run.stderr();
    assert!(err.contains("2 instance(s) failed"), "{err}");
    assert!(err.contains("not run because an input failed: after_broken"), "{err}");
    let s = sb.session("failing.json");
    assert_eq!(s["status"], "failed");
    assert_eq!(s["stages"]["independent"]["status"], "done");
    assert_eq!(s["stages"]["after_broken"]["status"], "skipped");

    let sb = Sandbox::new();
    let p = sb.write("failing.toml", FAILING);
    sb.run(&["run", p.to_str().unwrap(), "--jobs", "2"]).expect(1);
    let s = sb.session("failing.json");
    let statuses: Vec<&str> =
        s["stages"].as_object().unwrap().values().map(|v| v["status"].as_str().unwrap()).collect();
    assert!(statuses.contains(&"failed") && statuses.contains(&"pending"), "fail-fast: {statuses:?}");
    assert!(!statuses.contains(&"skipped"), "without --keep-going nothing is marked skipped: {statuses:?}");
    assert!(sb.run(&["run", p.to_str().unwrap(), "--jobs", "0"]).code() == 2, "--jobs 0 is a usage error");
}

/// A stage that panics fails like one that returns an error — recorded, its dependents not run,
/// the other branches kept with --keep-going — instead of taking the run down with it.
#[test]
fn a_panicking_stage_is_a_failed_instance() {
    let sb = Sandbox::new();
    let p = sb.write("panics.toml", &FAILING.replace("the stage broke on purpose", "panic:a bug in the stage"));
    for jobs in ["1", "2"] {
        let run = sb.run(&["run", p.to_str().unwrap(), "--keep-going", "--jobs", jobs]).expect(1);
        assert!(run.stderr().contains("broken: the stage panicked: a bug in the stage"), "{}", run.stderr());
        let s = sb.session("failing.json");
        assert_eq!(s["status"], "failed");
        assert_eq!(s["stages"]["broken"]["status"], "failed");
        assert_eq!(s["stages"]["independent"]["status"], if jobs == "1" { "done" } else { "cached" });
    }
}
