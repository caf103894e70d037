//! The standing reliability suite: kill -9 at seeded points of a chained run, resume, and end
//! with the keys and results of an uninterrupted run and a clean `cache verify`; and a seeded
//! mutation fuzz of the pipeline parser/expander: no panics, every rejection located.
//! `scripts/soak.sh` and `scripts/fuzz-pipelines.sh` run the same for longer (docs/reliability.md).

use std::time::Duration;

use rpt_flow::data::SplitMix64;

use crate::support::{repo, results, Sandbox};

/// The chain of tests/pipelines/chain.toml, slowed down so that kills land inside stages,
/// between checkpoints and around commits.
const SLOW_CHAIN: &str = r#"
[pipeline]
name = "faults"
seed = 5

[defaults.toy-scale]
steps = 30
sleep_ms = 20
checkpoint_every = 4

[stages.base]
kind = "toy-load"
size = 16

[sweeps.level]
over = { factor = [0.5, 0.25, 0.125] }
chain = { from = "base", carry = "tuned" }

[sweeps.level.stages.pruned]
kind = "toy-scale"
input = "$chain"
factor = "$factor"
steps = 2

[sweeps.level.stages.tuned]
kind = "toy-scale"
input = "pruned"
factor = 1.5

[sweeps.level.stages.after]
kind = "toy-eval"
input = "tuned"
"#;

/// Kills a run after each of `points` seeded delays (re-running after each kill), then lets it
/// finish; returns the sandbox.
pub fn killed_and_resumed(seed: u64, points: usize) -> (Sandbox, usize) {
    let sb = Sandbox::new();
    let p = sb.write("faults.toml", SLOW_CHAIN);
    let mut rng = SplitMix64::new(seed);
    let mut kills = 0;
    for _ in 0..points {
        let mut child = sb.spawn(&["run", p.to_str().unwrap(), "-q"], &[]);
        let delay = 40 + rng.index(500) as u64;
        std::thread::sleep(Duration::from_millis(delay));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
    }
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    (sb, kills)
}

#[test]
fn killed_at_seeded_points_a_run_ends_as_if_never_killed() {
    let clean = Sandbox::new();
    let p = clean.write("faults.toml", SLOW_CHAIN);
    clean.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    let want = results(&clean.session("faults.json"));
    let (sb, kills) = killed_and_resumed(11, 6);
    eprintln!("faults: {kills} of 6 seeded points killed the run (SIGKILL), then it resumed");
    assert!(kills >= 3, "the seeded delays should land inside the run ({kills} kills)");
    assert_eq!(results(&sb.session("faults.json")), want, "keys and metrics of an uninterrupted run");
    assert!(sb.run(&["cache", "verify"]).expect(0).stdout().contains("all intact"));
    sb.run(&["cache", "gc"]).expect(0);
    let left: Vec<_> =
        std::fs::read_dir(sb.path().join("cache/tmp")).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "gc clears what the kills left: {left:?}");
}

/// Mutations of real pipelines: a byte changed, a line dropped, doubled or swapped, a token
/// inserted, the text cut short.
pub fn mutate(text: &str, rng: &mut SplitMix64) -> String {
    const TOKENS: [&str; 16] = [
        "=",
        "[",
        "]",
        "{",
        "}",
        "\"",
        ".",
        "$chain",
        "-1",
        "1e400",
        "nan",
        "[stages.x]\n",
        "kind = \"prune\"\n",
        "input = \"$chain\"\n",
        "over = { a = [] }\n",
        "[profiles.p]\n\"stages.x.y\" = 1\n",
    ];
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for _ in 0..1 + rng.index(3) {
        if lines.is_empty() {
            break;
        }
        let i = rng.index(lines.len());
        match rng.index(6) {
            0 => {
                let mut b = lines[i].clone().into_bytes();
                if !b.is_empty() {
                    let j = rng.index(b.len());
                    b[j] = b" =[]{}\".$,0-9azZ#\\\n"[rng.index(19)];
                }
                lines[i] = String::from_utf8_lossy(&b).into_owned();
            }
            1 => {
                lines.remove(i);
            }
            2 => lines.insert(i, lines[i].clone()),
            3 => {
                let j = rng.index(lines.len());
                lines.swap(i, j);
            }
            4 => {
                let at = rng.index(lines[i].len() + 1);
                if lines[i].is_char_boundary(at) {
                    lines[i].insert_str(at, TOKENS[rng.index(TOKENS.len())]);
                }
            }
            _ => lines.truncate(i),
        }
    }
    lines.join("\n")
}

/// Parses `cases` mutants of every shipped pipeline and malformed test file; returns how many
/// were rejected. Panics (with the input) on a panic or on an error without a location.
pub fn fuzz(seed: u64, cases: usize) -> usize {
    let registry = rpt_flow::stages::registry();
    let catalog = registry.catalog();
    let mut corpus = Vec::new();
    for dir in ["pipelines", "benches", "tests/pipelines", "tests/malformed"] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "toml") {
                corpus.push(std::fs::read_to_string(e.path()).unwrap());
            }
        }
    }
    let mut rng = SplitMix64::new(seed);
    let mut rejected = 0;
    for case in 0..cases {
        let text = mutate(&corpus[rng.index(corpus.len())], &mut rng);
        let options = rpt_flow::spec::SpecOptions::default();
        let outcome = std::panic::catch_unwind(|| rpt_flow::spec::parse("fuzz.toml", &text, &catalog, &options));
        let Ok(result) = outcome else {
            panic!("case {case} (seed {seed}) panicked on:\n{text}");
        };
        if let Err(errors) = result {
            rejected += 1;
            assert!(!errors.diagnostics.is_empty(), "case {case}: rejected without a reason:\n{text}");
            for d in &errors.diagnostics {
                let locatable = d.message != "the pipeline has no stages";
                assert!(
                    d.span.is_some() || !locatable,
                    "case {case} (seed {seed}): `{}` has no location; input:\n{text}",
                    d.message
                );
            }
        }
    }
    rejected
}

#[test]
fn mutated_pipelines_never_panic_and_every_rejection_is_located() {
    let cases = std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(600);
    let seed = std::env::var("FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let rejected = fuzz(seed, cases);
    eprintln!("fuzz: {cases} mutants (seed {seed}), {rejected} rejected with a location, none panicked");
    assert!(rejected > cases / 4, "the mutations should break most inputs ({rejected} of {cases})");
}
