//! Two `run`s of one pipeline at once on one cache: every instance is computed exactly once.

use crate::support::Sandbox;

#[test]
fn two_concurrent_runs_compute_each_instance_once() {
    let sb = Sandbox::new();
    let p = sb.write(
        "slowchain.toml",
        r#"
[pipeline]
name = "slowchain"

[stages.base]
kind = "toy-load"

[sweeps.level]
over = { factor = [0.9, 0.8, 0.7] }
chain = { from = "base", carry = "tuned" }

[sweeps.level.stages.tuned]
kind = "toy-scale"
input = "$chain"
factor = "$factor"
steps = 5
sleep_ms = 30

[sweeps.level.stages.score]
kind = "toy-eval"
input = "tuned"
"#,
    );
    let args = ["run", p.to_str().unwrap(), "-q"];
    let a = sb.spawn(&args, &[("TOY_LOG", "log")]);
    let b = sb.spawn(&args, &[("TOY_LOG", "log")]);
    let (oa, ob) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(oa.status.success(), "{}", String::from_utf8_lossy(&oa.stderr));
    assert!(ob.status.success(), "{}", String::from_utf8_lossy(&ob.stderr));
    let mut lines = sb.log_lines("log");
    assert_eq!(lines.len(), 7, "7 instances, each computed once: {lines:#?}");
    lines.sort();
    lines.dedup();
    assert_eq!(lines.len(), 7);
    let s = sb.session("slowchain.json");
    assert_eq!(s["status"], "complete");
    assert_eq!(sb.run(&["cache", "ls"]).expect(0).stdout().lines().filter(|l| l.contains("slowchain")).count(), 7);
}
