//! `validate` and `stages`: every malformed pipeline in tests/malformed gives its exact error.

use crate::support::{repo, Sandbox};

struct Expectation {
    args: Vec<String>,
    error: String,
    at: String,
    help: Option<String>,
}

fn expectation(text: &str) -> Expectation {
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(&format!("# {name}: ")).map(str::to_string));
    Expectation {
        args: field("args").map(|a| a.split_whitespace().map(str::to_string).collect()).unwrap_or_default(),
        error: field("expect-error").expect("every malformed file states its error"),
        at: field("expect-at").expect("every malformed file states its location"),
        help: field("expect-help"),
    }
}

#[test]
fn every_malformed_pipeline_gives_its_exact_error_and_writes_nothing() {
    let dir = repo().join("tests/malformed");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 25, "the corpus has {} files", files.len());
    let sb = Sandbox::new();
    for file in &files {
        let exp = expectation(&std::fs::read_to_string(file).unwrap());
        let path = file.display().to_string();
        let mut args = vec!["validate".to_string(), path.clone()];
        args.extend(exp.args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = sb.run(&args);
        let err = run.stderr();
        assert_eq!(run.code(), 2, "{path}: exit code; stderr:\n{err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
        assert_eq!(errors, vec![format!("error: {}", exp.error)], "{path}: errors\n{err}");
        match exp.at.as_str() {
            "none" => assert!(!err.contains("-->"), "{path}: no location expected\n{err}"),
            at if at.starts_with("--set") => {
                assert!(err.contains(&format!("--> {at}\n")), "{path}: location {at}\n{err}")
            }
            at => assert!(err.contains(&format!("--> {path}:{at}\n")), "{path}: location {at}\n{err}"),
        }
        if let Some(help) = &exp.help {
            assert!(err.contains(&format!("= help: {help}\n")), "{path}: help `{help}`\n{err}");
        }
        if exp.at != "none" {
            assert!(err.contains('^'), "{path}: a caret under the offending text is expected\n{err}");
        }
    }
    let written: Vec<_> = std::fs::read_dir(sb.path()).unwrap().collect();
    assert!(written.is_empty(), "validate must write nothing, found {written:?}");
}

#[test]
fn shipped_test_pipelines_are_valid() {
    let sb = Sandbox::new();
    for (file, instances) in [("tests/pipelines/chain.toml", 11), ("tests/pipelines/grid.toml", 13)] {
        let path = repo().join(file);
        let run = sb.run(&["validate", path.to_str().unwrap()]).expect(0);
        assert!(run.stdout().contains(&format!("{instances} instances")), "{}", run.stdout());
    }
    assert!(std::fs::read_dir(sb.path()).unwrap().next().is_none(), "validate wrote files");
}

#[test]
fn profiles_and_sets_apply_in_order_and_set_values_parse_as_toml() {
    let sb = Sandbox::new();
    let path = repo().join("tests/pipelines/chain.toml");
    let p = path.to_str().unwrap();
    let doc =
        sb.run(&["plan", p, "--format", "json", "--profile", "tiny", "--set", "stages.base.size=5"]).expect(0).json();
    let base = &doc["instances"][0];
    assert_eq!(base["name"], "base");
    assert_eq!(base["params"]["size"], 5, "--set after the profile wins");
    let tuned = doc["instances"].as_array().unwrap().iter().find(|i| i["name"] == "level[factor=0.5].tuned").unwrap();
    assert_eq!(tuned["params"]["steps"], 2, "the profile set the default steps");
    let doc = sb.run(&["plan", p, "--format", "json", "--set", "sweeps.level.over.factor=[2, 3]"]).expect(0).json();
    let names: Vec<&str> = doc["instances"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"level[factor=2].pruned") && names.contains(&"level[factor=3].after"), "{names:?}");
    assert_eq!(names.len(), 2 + 2 * 3);
}

#[test]
fn stages_lists_every_kind_with_parameters_from_the_schema() {
    let sb = Sandbox::new();
    let out = sb.run(&["stages"]).expect(0).stdout();
    for kind in ["toy-load", "toy-scale", "toy-eval", "toy-text", "toy-count", "toy-fail"] {
        assert!(out.contains(kind), "{kind} missing:\n{out}");
    }
    assert!(out.contains("checkpoint_every") && out.contains("steps between checkpoints"), "{out}");
    let doc = sb.run(&["stages", "toy-text", "--format", "json"]).expect(0).json();
    assert_eq!(doc[0]["kind"], "toy-text");
    assert_eq!(doc[0]["params"][0]["name"], "style");
    assert_eq!(doc[0]["params"][0]["type"], "plain|shout");
    assert_eq!(doc[0]["inputs"][0]["type"], "model");
    let bad = sb.run(&["stages", "toy-txt"]).expect(2);
    assert!(bad.stderr().contains("did you mean `toy-text`?"), "{}", bad.stderr());
}
