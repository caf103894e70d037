//! `RUST_LOG=info` says on stderr what each stage is doing; without it the stages say nothing
//! more than before, and stdout is the same either way.

use crate::support::Sandbox;

const PIPELINE: &str = "[pipeline]\nname = \"logs\"\n\
    [stages.base]\nkind = \"load\"\nmodel = \"builtin:tiny-bitnet\"\n\
    [stages.pruned]\nkind = \"prune\"\ninput = \"base\"\nsparsity = 0.2\n\
    [stages.tuned]\nkind = \"finetune\"\ninput = \"pruned\"\ndata = \"synthetic:facts:train\"\n\
    steps = 3\nbatch = 2\nseq_len = 16\n\
    [stages.ppl]\nkind = \"eval-ppl\"\ninput = \"tuned\"\ndata = \"synthetic:facts:test\"\nseq_len = 32\nmax_windows = 2\n\
    [stages.facts]\nkind = \"generate\"\ninput = \"base\"\nprompts = \"facts\"\nmax_new_tokens = 2\n";

/// Runs the pipeline in the sandbox with `RUST_LOG` as given (unset for `None`).
fn run(sb: &Sandbox, rust_log: Option<&str>, quiet: bool) -> (String, String) {
    let p = sb.write("logs.toml", PIPELINE);
    let mut args = vec!["run", p.to_str().unwrap()];
    if quiet {
        args.push("-q");
    }
    let mut cmd = sb.cmd(&args);
    match rust_log {
        Some(filter) => cmd.env("RUST_LOG", filter),
        None => cmd.env_remove("RUST_LOG"),
    };
    let out = cmd.env_remove("NO_COLOR").output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "run failed\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    (stdout, stderr)
}

/// The lines of `stderr` that hold every one of `parts`.
fn lines_with<'a>(stderr: &'a str, parts: &[&str]) -> Vec<&'a str> {
    stderr.lines().filter(|l| parts.iter().all(|p| l.contains(p))).collect()
}

#[test]
fn rust_log_info_shows_what_each_stage_does() {
    let sb = Sandbox::real();
    let (stdout, stderr) = run(&sb, Some("info"), true);
    assert!(!stderr.contains('\x1b'), "no colour codes in a log that is not a terminal:\n{stderr:?}");
    for stage in ["base", "pruned", "tuned", "ppl", "facts"] {
        let instance = format!("instance={stage}");
        for event in ["stage start", "stage done"] {
            assert!(
                !lines_with(&stderr, &[" INFO ", event, &instance]).is_empty(),
                "no `{event}` line for {stage} on stderr:\n{stderr}"
            );
        }
    }
    // The start line carries the key, the end line the time.
    let start = lines_with(&stderr, &["stage start", "instance=tuned"])[0];
    assert!(start.contains("kind=finetune") && start.contains("key="), "{start}");
    assert!(lines_with(&stderr, &["stage done", "instance=tuned"])[0].contains("seconds="), "{stderr}");
    for (event, fields) in [
        ("model loaded", &["parameters=", "dtype="][..]),
        ("pruned", &["target=0.2", "achieved="][..]),
        ("finetune start", &["steps=3", "lr="][..]),
        ("finetune", &["step=3", "loss=", "tok_per_s="][..]),
        ("data ready", &["data=synthetic:facts:test", "tokens=", "windows=2"][..]),
        ("eval-ppl done", &["ppl="][..]),
        ("generated", &["accuracy="][..]),
    ] {
        let mut parts = vec![event];
        parts.extend_from_slice(fields);
        assert!(!lines_with(&stderr, &parts).is_empty(), "no line with {parts:?} on stderr:\n{stderr}");
    }
    // With -q nothing else reaches stderr: every line is a log event. None reaches stdout.
    assert!(stderr.lines().all(|l| l.contains(" INFO ") || l.contains(" WARN ")), "{stderr}");
    assert!(!stdout.contains(" INFO ") && !stdout.contains("stage start"), "{stdout}");

    // Run again: everything is cached, and the log says so.
    let (_, stderr) = run(&sb, Some("info"), true);
    assert!(!lines_with(&stderr, &["stage cached", "instance=ppl", "key="]).is_empty(), "{stderr}");
    assert!(lines_with(&stderr, &["stage start"]).is_empty(), "{stderr}");
}

#[test]
fn without_rust_log_the_stages_log_nothing() {
    let sb = Sandbox::real();
    let (_, stderr) = run(&sb, None, true);
    assert_eq!(stderr, "", "-q and no RUST_LOG: stderr is empty");
    let sb = Sandbox::real();
    let (_, stderr) = run(&sb, None, false);
    assert!(!stderr.contains(" INFO ") && !stderr.contains("stage start"), "{stderr}");
    assert!(stderr.contains("tuned (finetune): running"), "the progress lines are still there:\n{stderr}");
}
