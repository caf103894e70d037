//! Killed and interrupted runs: the next run continues from the last checkpoint and ends with the
//! results of an uninterrupted run.

use std::time::Duration;

use crate::support::{has_checkpoint, results, wait_until, Sandbox};

const PIPELINE: &str = r#"
[pipeline]
name = "resumable"
seed = 3

[stages.base]
kind = "toy-load"
size = 32

[stages.long]
kind = "toy-scale"
input = "base"
factor = 0.999
steps = 60
sleep_ms = 25
checkpoint_every = 5

[stages.score]
kind = "toy-eval"
input = "long"
"#;

fn uninterrupted() -> serde_json::Value {
    let sb = Sandbox::new();
    let p = sb.write("resumable.toml", PIPELINE);
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    results(&sb.session("resumable.json"))
}

fn no_leftovers(sb: &Sandbox) {
    let tmp = sb.path().join("cache/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "half-written entries left behind: {left:?}");
}

#[test]
fn a_killed_run_resumes_from_its_checkpoint_with_identical_results() {
    let sb = Sandbox::new();
    let p = sb.write("resumable.toml", PIPELINE);
    let mut child = sb.spawn(&["run", p.to_str().unwrap()], &[]);
    assert!(wait_until(Duration::from_secs(60), || has_checkpoint(&sb.path().join("cache"))), "a checkpoint appeared");
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let mid = sb.session("resumable.json");
    assert_eq!(mid["stages"]["base"]["status"], "done", "the session was saved after each instance");
    assert_eq!(mid["stages"]["long"]["status"], "pending");
    assert_eq!(mid["status"], "running", "a killed run never wrote its final status");
    let today = time::OffsetDateTime::now_utc().date().to_string();
    let file = sb.path().join("sessions").join(today).join("resumable.json");
    let report = sb.run(&["report", file.to_str().unwrap(), "--format", "markdown", "--no-plots"]).expect(0).stdout();
    assert!(report.contains("`resumable.json`: interrupted"), "readers see the killed run as interrupted:\n{report}");

    let plan = sb.run(&["plan", p.to_str().unwrap()]).expect(0).stdout();
    assert!(plan.contains("partial (resumable)"), "{plan}");
    let again = sb.run(&["run", p.to_str().unwrap()]).expect(0);
    assert!(again.stderr().contains("resuming from partial state"), "{}", again.stderr());
    assert!(again.stderr().contains("toy-scale: resumed at step"), "{}", again.stderr());
    let after = sb.session("resumable.json");
    assert_eq!(after["status"], "complete");
    assert_eq!(results(&after), uninterrupted(), "resumed results equal uninterrupted ones");
    assert!(
        !sb.path().join("cache/partial").read_dir().map(|mut r| r.next().is_some()).unwrap_or(false),
        "partial state removed once finished"
    );
    // What the killed process left in cache/tmp is not an entry; gc clears it.
    sb.run(&["cache", "gc"]).expect(0);
    no_leftovers(&sb);
}

#[test]
fn ctrl_c_stops_cleanly_and_the_next_run_continues() {
    let sb = Sandbox::new();
    let p = sb.write("resumable.toml", PIPELINE);
    let child = sb.spawn(&["run", p.to_str().unwrap()], &[]);
    assert!(wait_until(Duration::from_secs(60), || has_checkpoint(&sb.path().join("cache"))), "a checkpoint appeared");
    let status = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let s = sb.session("resumable.json");
    assert_eq!(s["status"], "interrupted");
    assert_eq!(s["stages"]["long"]["status"], "interrupted");
    no_leftovers(&sb);

    let again = sb.run(&["run", p.to_str().unwrap()]).expect(0);
    assert!(again.stderr().contains("resumed at step"), "{}", again.stderr());
    assert_eq!(results(&sb.session("resumable.json")), uninterrupted());
}
