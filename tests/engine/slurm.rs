//! `--executor slurm` against a real single-node Slurm (scripts/slurm-local/start.sh): one sbatch
//! job per instance, the session a local run writes, failures, Ctrl-C, a killed orchestrator,
//! and `plan --executor slurm`. The dry-run and `--only` tests need no cluster.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::{queued_jobs, repo, results, slurm_cluster, wait_until, Sandbox};

fn chain() -> String {
    repo().join("tests/pipelines/chain.toml").display().to_string()
}

const FAST: [&str; 4] = ["--executor", "slurm", "--poll-seconds", "0.2"];

fn args<'a>(first: &[&'a str], rest: &[&'a str]) -> Vec<&'a str> {
    first.iter().chain(rest).copied().collect()
}

/// Each computation's instance, from the TOY_LOG lines (`<instance> <key>`).
fn computed(sb: &Sandbox) -> Vec<String> {
    sb.log_lines("log").iter().map(|l| l.split(' ').next().unwrap().to_string()).collect()
}

/// Every one of `n` instances was computed exactly once (across all runs in the sandbox).
fn assert_each_computed_once(sb: &Sandbox, n: usize) {
    let mut names = computed(sb);
    let all = names.len();
    names.sort();
    names.dedup();
    assert_eq!((all, names.len()), (n, n), "every instance computed exactly once: {:?}", computed(sb));
}

/// The one session file a sandbox has (its name carries a hash of the `--set` overrides).
fn the_session(sb: &Sandbox) -> serde_json::Value {
    let day = std::fs::read_dir(sb.path().join("sessions")).unwrap().next().unwrap().unwrap().path();
    let files: Vec<_> = std::fs::read_dir(day).unwrap().map(|f| f.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap()
}

#[test]
fn a_slurm_run_gives_the_session_of_a_local_run() {
    let Some(_cluster) = slurm_cluster() else { return };
    let (slurm, local) = (Sandbox::new(), Sandbox::new());
    let p = chain();
    let out = slurm.cmd(&args(&["run", &p, "--profile", "tiny"], &FAST)).env("TOY_LOG", "log").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("11 instances: 11 computed, 0 cached"));
    local.run(&["run", &p, "--profile", "tiny", "-q"]).expect(0);
    let (s, l) = (slurm.session("toy-chain.tiny.json"), local.session("toy-chain.tiny.json"));
    assert_eq!(s["status"], "complete");
    let mut rs = results(&s);
    for (name, st) in rs.as_object_mut().unwrap() {
        let job = st.as_object_mut().unwrap().remove("job").unwrap_or_else(|| panic!("{name} records its job"));
        let log = job["log"].as_str().unwrap();
        assert!(log.starts_with(slurm.path().to_str().unwrap()), "logs live in the cache's jobs/ folder: {log}");
        let text = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{log}: {e}"));
        assert!(text.contains(&format!("{name}: computed in")), "the job ran `--only {name}`: {text}");
    }
    assert_eq!(rs, results(&l), "same keys, metrics and parameters as the local executor");
    assert_each_computed_once(&slurm, 11);

    // Everything is cached now: no job is submitted, and the dry run has nothing to print.
    let again = slurm.run(&args(&["run", &p, "--profile", "tiny"], &FAST)).expect(0);
    assert!(again.stdout().contains("nothing to compute: all 11 instances were cached"), "{}", again.stdout());
    let dry = slurm.run(&["plan", &p, "--profile", "tiny", "--executor", "slurm"]).expect(0).stdout();
    assert!(dry.contains("0 of 11 instances are not cached") && !dry.contains("sbatch --parsable"), "{dry}");
}

const FAILING: &str = r#"
[pipeline]
name = "slurm-failing"

[stages.base]
kind = "toy-load"

[stages.broken]
kind = "toy-scale"
input = "base"
factor = 2
fail_at_step = 0

[stages.after_broken]
kind = "toy-eval"
input = "broken"

[stages.independent]
kind = "toy-eval"
input = "base"
"#;

#[test]
fn a_failed_job_fails_its_dependents_and_names_its_log() {
    let Some(_cluster) = slurm_cluster() else { return };
    let sb = Sandbox::new();
    let p = sb.write("failing.toml", FAILING);
    let run = sb.run(&args(&["run", p.to_str().unwrap(), "--keep-going"], &FAST)).expect(1);
    let err = run.stderr();
    assert!(err.contains("1 instance(s) failed") && err.contains("broken: job "), "{err}");
    assert!(err.contains("toy failure at step 0"), "the job's own error is quoted: {err}");
    assert!(err.contains("not run because an input failed: after_broken"), "{err}");
    let s = sb.session("slurm-failing.json");
    assert_eq!(s["status"], "failed");
    assert_eq!(s["stages"]["independent"]["status"], "done", "--keep-going: the other branch ran");
    assert_eq!(s["stages"]["after_broken"]["status"], "skipped");
    assert_eq!(s["stages"]["after_broken"]["error"], "not run: input `broken` failed");
    let error = s["stages"]["broken"]["error"].as_str().unwrap();
    let log = error.rsplit("(log: ").next().unwrap().trim_end_matches(')');
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("the log named in `{error}`: {e}"));
    assert!(text.contains("toy failure at step 0"), "{text}");
    let job = s["stages"]["after_broken"]["job"]["id"].as_str().unwrap();
    let killed = queued_jobs("rpt-flow:slurm-failing:after_broken");
    assert!(killed.contains(&(job.to_string(), "CANCELLED".to_string())), "Slurm cancelled the dependent: {killed:?}");

    // Without --keep-going the run stops: what has not run stays pending, as locally.
    let sb = Sandbox::new();
    let p = sb.write("failing.toml", FAILING);
    sb.run(&args(&["run", p.to_str().unwrap()], &FAST)).expect(1);
    let s = sb.session("slurm-failing.json");
    assert_eq!(s["stages"]["broken"]["status"], "failed");
    assert_eq!(s["stages"]["after_broken"]["status"], "pending");
}

/// Two independent instances run at the same time on the cluster: seen in the queue.
#[test]
fn independent_jobs_run_at_once() {
    let Some(_cluster) = slurm_cluster() else { return };
    const PAR: &str = "[pipeline]\nname = \"slurm-par\"\nseed = 3\n\
        [stages.base]\nkind = \"toy-load\"\nsize = 4\n\
        [stages.a]\nkind = \"toy-scale\"\ninput = \"base\"\nfactor = 2\nsteps = 4\nsleep_ms = 700\n\
        [stages.b]\nkind = \"toy-scale\"\ninput = \"base\"\nfactor = 3\nsteps = 4\nsleep_ms = 700\n";
    let sb = Sandbox::new();
    let p = sb.write("par.toml", PAR);
    let mut child = sb.spawn(&args(&["run", p.to_str().unwrap()], &FAST), &[]);
    let mut most = 0;
    let mut seen: HashSet<String> = HashSet::new();
    wait_until(Duration::from_secs(120), || {
        let running: Vec<String> = queued_jobs("rpt-flow:slurm-par:")
            .into_iter()
            .filter(|(_, state)| state == "RUNNING")
            .map(|(id, _)| id)
            .collect();
        most = most.max(running.len());
        seen.extend(running);
        child.try_wait().unwrap().is_some()
    });
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(most >= 2, "a and b were RUNNING together in squeue (most at once: {most}, jobs seen running: {seen:?})");
}

/// The orchestrator killed with SIGKILL mid-run: the jobs go on; the same command re-attaches
/// to those still queued or running, and nothing is computed twice.
#[test]
fn a_killed_orchestrator_is_rerun_without_recomputing() {
    let Some(_cluster) = slurm_cluster() else { return };
    let sb = Sandbox::new();
    let p = chain();
    let slow = ["--set", "defaults.toy-scale.sleep_ms=300"];
    let run = args(&args(&["run", &p], &slow), &FAST);
    let mut child = sb.spawn(&run, &[("TOY_LOG", "log")]);
    // Killed once a job has committed, with others still in the queue.
    assert!(wait_until(Duration::from_secs(60), || !sb.log_lines("log").is_empty()), "a job computed");
    child.kill().unwrap();
    child.wait().unwrap();
    let rerun = sb.cmd(&run).env("TOY_LOG", "log").output().unwrap();
    let err = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success(), "{err}");
    assert!(err.contains("re-attached to job"), "the rerun adopts the queued jobs: {err}");
    assert_each_computed_once(&sb, 11);
    let s = the_session(&sb);
    assert_eq!(s["status"], "complete");
    // One job (one log) per key: nothing was submitted twice.
    for entry in std::fs::read_dir(sb.path().join("cache/jobs")).unwrap() {
        let logs = std::fs::read_dir(entry.unwrap().path())
            .unwrap()
            .filter(|f| f.as_ref().unwrap().file_name().to_string_lossy().ends_with(".log"));
        assert_eq!(logs.count(), 1);
    }
}

/// Starts `run` in the sandbox, waits until a job has computed, and sends the orchestrator `signal`.
fn signal_mid_run(sb: &Sandbox, run: &[&str], signal: &str) -> std::process::Output {
    let child = sb.spawn(run, &[("TOY_LOG", "log")]);
    assert!(wait_until(Duration::from_secs(60), || !sb.log_lines("log").is_empty()), "a job computed");
    let sent = std::process::Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
    child.wait_with_output().unwrap()
}

/// A hang-up (a lost ssh session) detaches the orchestrator: its jobs stay in the queue and the
/// same command re-attaches to them.
#[test]
fn a_hangup_detaches_and_leaves_the_jobs_running() {
    let Some(_cluster) = slurm_cluster() else { return };
    let sb = Sandbox::new();
    let p = chain();
    let run = args(&["run", &p, "--set", "defaults.toy-scale.sleep_ms=300"], &FAST);
    let out = signal_mid_run(&sb, &run, "-HUP");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("run the same command to re-attach"), "{err}");
    let s = the_session(&sb);
    assert_eq!(s["status"], "interrupted");
    let left: Vec<String> = s["stages"]
        .as_object()
        .unwrap()
        .values()
        .filter(|v| v["status"] == "pending")
        .map(|v| v["job"]["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!left.is_empty(), "jobs were left in the queue: {s}");
    let q = queued_jobs("rpt-flow:toy-chain:");
    assert!(
        left.iter().all(|id| q.iter().any(|(j, state)| j == id && state != "CANCELLED")),
        "none of the detached jobs {left:?} was cancelled: {q:?}"
    );
    let rerun = sb.cmd(&run).env("TOY_LOG", "log").output().unwrap();
    assert!(rerun.status.success(), "{}", String::from_utf8_lossy(&rerun.stderr));
    assert_eq!(the_session(&sb)["status"], "complete");
    assert_each_computed_once(&sb, 11);
}

/// Ctrl-C cancels the run's jobs by id; the session says interrupted; the same command finishes.
#[test]
fn ctrl_c_cancels_the_jobs_and_a_rerun_finishes() {
    let Some(_cluster) = slurm_cluster() else { return };
    let sb = Sandbox::new();
    let p = chain();
    let run = args(&["run", &p, "--set", "defaults.toy-scale.sleep_ms=300"], &FAST);
    let out = signal_mid_run(&sb, &run, "-INT");
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    let s = the_session(&sb);
    assert_eq!(s["status"], "interrupted");
    let stages = s["stages"].as_object().unwrap();
    let cancelled: Vec<&str> =
        stages.values().filter(|v| v["status"] == "interrupted").map(|v| v["job"]["id"].as_str().unwrap()).collect();
    assert!(!cancelled.is_empty(), "some jobs were still queued");
    // Each job the run left ends without computing: CANCELLED, or FAILED for one that Slurm
    // started in the instant of the Ctrl-C (seen once in CI: started and exited 1 within 40 ms,
    // before the scancel reached it). Never COMPLETED, never still queued or running.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let q = queued_jobs("rpt-flow:toy-chain:");
            cancelled.iter().all(|id| q.iter().any(|(j, state)| j == id && (state == "CANCELLED" || state == "FAILED")))
        }),
        "every job of the run left ({cancelled:?}) is cancelled: {:?}",
        queued_jobs("rpt-flow:toy-chain:")
    );
    let q = queued_jobs("rpt-flow:toy-chain:");
    assert!(
        cancelled.iter().any(|id| q.iter().any(|(j, state)| j == id && state == "CANCELLED")),
        "the queued jobs were cancelled: {q:?}"
    );
    let rerun = sb.cmd(&run).output().unwrap();
    assert!(rerun.status.success(), "{}", String::from_utf8_lossy(&rerun.stderr));
    assert_eq!(the_session(&sb)["status"], "complete");
}

/// `plan --executor slurm`: the sbatch lines, with the pipeline's [executor.slurm] table under
/// the command line's settings. Needs no cluster.
#[test]
fn the_dry_run_prints_the_jobs_it_would_submit() {
    let sb = Sandbox::new();
    let text = std::fs::read_to_string(chain()).unwrap()
        + "\n[executor.slurm]\npartition = \"gpu\"\ntime = \"1:00:00\"\ngres = \"gpu:1\"\n\
           [executor.slurm.kinds.toy-eval]\ngres = \"\"\ntime = \"10\"\n";
    let p = sb.write("chain.toml", &text);
    let out = sb
        .run(&["plan", p.to_str().unwrap(), "--profile", "tiny", "--executor", "slurm", "--account", "lab"])
        .expect(0);
    let dry = out.stdout();
    assert!(dry.contains("11 of 11 instances are not cached"), "{dry}");
    let jobs: Vec<&str> = dry.lines().filter(|l| l.contains("sbatch --parsable")).collect();
    assert_eq!(jobs.len(), 11, "{dry}");
    assert!(jobs[0].starts_with("J1=$(sbatch --parsable") && !jobs[0].contains("--dependency"), "{}", jobs[0]);
    let baseline = jobs.iter().find(|l| l.contains("toy-chain:baseline")).unwrap();
    assert!(baseline.contains("\"--dependency=afterok:$J1\" --kill-on-invalid-dep=yes"), "{baseline}");
    assert!(baseline.contains("--time=10") && !baseline.contains("--gres"), "kind settings: {baseline}");
    assert!(baseline.contains("--partition=gpu") && baseline.contains("--account=lab"), "{baseline}");
    assert!(jobs[0].contains("--gres=gpu:1") && jobs[0].contains("--time=1:00:00"), "{}", jobs[0]);
    assert!(baseline.contains("--only baseline --expect-key"), "{baseline}");
    // Bad settings: located in the file, or named on the command line; exit 2.
    let bad = sb.write(
        "bad.toml",
        &(std::fs::read_to_string(chain()).unwrap() + "\n[executor.slurm]\ntime = \"two hours\"\ngpus = 1\n"),
    );
    let err = sb.run(&["plan", bad.to_str().unwrap(), "--executor", "slurm"]).expect(2).stderr();
    assert!(err.contains("is not a Slurm time limit") && err.contains("bad.toml:"), "{err}");
    assert!(err.contains("unknown setting `gpus`"), "{err}");
    let err =
        sb.run(&["plan", &chain(), "--executor", "slurm", "--sbatch-arg=--dependency=afterany:1"]).expect(2).stderr();
    assert!(err.contains("rpt-flow sets --dependency itself"), "{err}");
    let err = sb.run(&["run", &chain(), "--partition", "gpu"]).expect(2).stderr();
    assert!(err.contains("add --executor slurm"), "{err}");
    // No Slurm client: a clear error before anything is submitted, and an honest session.
    let out = sb.cmd(&["run", &chain(), "--executor", "slurm"]).env("PATH", "/nonexistent").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Slurm does not answer") && err.contains("on PATH"), "{err}");
    assert_eq!(sb.session("toy-chain.json")["status"], "failed");
}

/// What each job runs: `run --only NAME --expect-key KEY`. Needs no cluster.
#[test]
fn only_runs_one_instance_whose_inputs_are_cached() {
    let sb = Sandbox::new();
    let p = chain();
    let err = sb.run(&["run", &p, "--only", "baseline"]).expect(1).stderr();
    assert!(err.contains("input `base`") && err.contains("is not in the cache"), "{err}");
    let err = sb.run(&["run", &p, "--only", "baseline_"]).expect(2).stderr();
    assert!(err.contains("did you mean `baseline`?"), "{err}");
    sb.run(&["run", &p, "--only", "base"]).expect(0);
    let keys = crate::support::plan_keys(&sb, &[&p]);
    let key = &keys.iter().find(|(n, _)| n == "baseline").unwrap().1;
    let out = sb.run(&["run", &p, "--only", "baseline", "--expect-key", key]).expect(0);
    assert!(out.stdout().contains("baseline: computed in"), "{}", out.stdout());
    assert!(!sb.path().join("sessions").exists(), "--only writes no session");
    let wrong = "0".repeat(64);
    let err = sb.run(&["run", &p, "--only", "baseline", "--expect-key", &wrong]).expect(1).stderr();
    assert!(err.contains("changed since"), "{err}");
}

/// A job that hits its time limit ends TIMEOUT with a hint; its checkpoint is kept, and the job
/// submitted by the next run resumes from it and gives the uninterrupted result. Slow: Slurm's
/// shortest limit is a minute, and the controller enforces it on a periodic check (seen from 65
/// to past 75 s), so the stage is made two minutes long; about 2 minutes in all.
#[test]
fn a_timed_out_job_resumes_from_its_checkpoint() {
    let Some(_cluster) = slurm_cluster() else { return };
    const LONG: &str = "[pipeline]\nname = \"slurm-timeout\"\n\
        [stages.base]\nkind = \"toy-load\"\n\
        [stages.long]\nkind = \"toy-scale\"\ninput = \"base\"\nfactor = 1.01\nsteps = 120\nsleep_ms = 1000\n";
    let sb = Sandbox::new();
    let p = sb.write("long.toml", LONG);
    let p = p.to_str().unwrap();
    let first = sb.run(&args(&["run", p, "--time", "1"], &FAST)).expect(1);
    let err = first.stderr();
    assert!(err.contains("TIMEOUT") && err.contains("raise `time` for this kind"), "{err}");
    assert!(crate::support::has_checkpoint(&sb.path().join("cache")), "the partial checkpoint is kept");
    let second = sb.run(&args(&["run", p, "--time", "10"], &FAST)).expect(0);
    let s = sb.session("slurm-timeout.json");
    let log = s["stages"]["long"]["job"]["log"].as_str().unwrap().to_string();
    let text = std::fs::read_to_string(&log).unwrap();
    let resumed: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("toy-scale: resumed at step "))
        .unwrap_or_else(|| panic!("the second job resumed ({log}):\n{text}\n{}", second.stderr()))
        .parse()
        .unwrap();
    assert!(resumed >= 30, "most steps were kept: resumed at {resumed}");
    // The same stage without pauses, uninterrupted, locally: the same numbers.
    let local = Sandbox::new();
    let q = local.write("long.toml", &LONG.replace("sleep_ms = 1000", "sleep_ms = 0"));
    local.run(&["run", q.to_str().unwrap(), "-q"]).expect(0);
    assert_eq!(s["stages"]["long"]["metrics"], local.session("slurm-timeout.json")["stages"]["long"]["metrics"]);
}

/// The pipeline edited while its jobs wait: each job checks that its instance's key is still
/// the one submitted, and fails saying so instead of computing something else under the name.
#[test]
fn a_pipeline_edited_mid_run_fails_the_changed_jobs_clearly() {
    let Some(_cluster) = slurm_cluster() else { return };
    let sb = Sandbox::new();
    let text = std::fs::read_to_string(chain()).unwrap();
    let p = sb.write("chain.toml", &text);
    let run = args(&["run", p.to_str().unwrap(), "--set", "defaults.toy-scale.sleep_ms=400"], &FAST);
    let child = sb.spawn(&run, &[("TOY_LOG", "log")]);
    assert!(wait_until(Duration::from_secs(60), || !sb.log_lines("log").is_empty()), "a job computed");
    // The second level's fine-tune steps (the profile sets them; the file's own value is used here).
    let edited = text.replacen("steps = 1", "steps = 2", 1);
    assert_ne!(edited, text);
    std::fs::write(&p, edited).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("as when its job was submitted") && err.contains("changed since"), "{err}");
    let rerun = sb.cmd(&run).output().unwrap();
    assert!(
        rerun.status.success(),
        "the next run submits what the file now means: {}",
        String::from_utf8_lossy(&rerun.stderr)
    );
}
