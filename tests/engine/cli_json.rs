//! Machine-readable output and editor support: `schema` (checked against every shipped pipeline
//! with a small validator of the JSON Schema subset it emits), `completions`, and `--format json`
//! of `validate`, `explain` and `cache ls`.

use serde_json::Value as Json;

use crate::support::{repo, Sandbox};

fn chain() -> String {
    repo().join("tests/pipelines/chain.toml").display().to_string()
}

/// A pipeline file as the JSON value a schema validator sees (what Taplo checks).
fn toml_as_json(path: &std::path::Path) -> Json {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let value: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::to_value(value).unwrap()
}

/// Checks `v` against `schema` for the draft-07 keywords `rpt-flow schema` emits, pushing one
/// line per violation. A keyword outside that subset fails the test, so the schema cannot grow a
/// keyword this check silently ignores.
fn check(root: &Json, schema: &Json, v: &Json, at: &str, errors: &mut Vec<String>) {
    let Some(s) = schema.as_object() else { panic!("{at}: a schema must be an object, found {schema}") };
    if let Some(r) = s.get("$ref") {
        let target = r.as_str().and_then(|r| r.strip_prefix('#')).and_then(|p| root.pointer(p));
        let target = target.unwrap_or_else(|| panic!("{at}: unresolvable $ref {r}"));
        return check(root, target, v, at, errors);
    }
    let fail = |errors: &mut Vec<String>, what: String| errors.push(format!("{at}: {what}"));
    for (keyword, arg) in s {
        match keyword.as_str() {
            "$schema" | "title" | "description" | "markdownDescription" | "default" | "x-taplo" | "definitions" => {}
            "type" => {
                let types: Vec<&str> = match arg {
                    Json::String(t) => vec![t.as_str()],
                    Json::Array(ts) => ts.iter().map(|t| t.as_str().unwrap()).collect(),
                    other => panic!("{at}: bad type {other}"),
                };
                let is = |t: &str| match t {
                    "object" => v.is_object(),
                    "array" => v.is_array(),
                    "string" => v.is_string(),
                    "boolean" => v.is_boolean(),
                    "integer" => v.is_i64() || v.is_u64(),
                    "number" => v.is_number(),
                    "null" => v.is_null(),
                    other => panic!("{at}: unknown type {other}"),
                };
                if !types.iter().any(|t| is(t)) {
                    fail(errors, format!("{v} is not of type {types:?}"));
                }
            }
            "enum" if !arg.as_array().unwrap().contains(v) => fail(errors, format!("{v} is not one of {arg}")),
            "const" if arg != v => fail(errors, format!("{v} is not {arg}")),
            "minimum" if v.as_f64().is_some_and(|x| x < arg.as_f64().unwrap()) => fail(errors, format!("{v} < {arg}")),
            "maximum" if v.as_f64().is_some_and(|x| x > arg.as_f64().unwrap()) => fail(errors, format!("{v} > {arg}")),
            "minItems" if v.as_array().is_some_and(|a| (a.len() as u64) < arg.as_u64().unwrap()) => {
                fail(errors, format!("fewer than {arg} items"))
            }
            "minProperties" if v.as_object().is_some_and(|o| (o.len() as u64) < arg.as_u64().unwrap()) => {
                fail(errors, format!("fewer than {arg} keys"))
            }
            "required" => {
                for key in arg.as_array().unwrap() {
                    if v.as_object().is_some_and(|o| !o.contains_key(key.as_str().unwrap())) {
                        fail(errors, format!("missing required key {key}"));
                    }
                }
            }
            "enum" | "const" | "minimum" | "maximum" | "minItems" | "minProperties" => {}
            "items" => {
                for (i, item) in v.as_array().into_iter().flatten().enumerate() {
                    check(root, arg, item, &format!("{at}[{i}]"), errors);
                }
            }
            "properties" => {
                for (key, sub) in arg.as_object().unwrap() {
                    if let Some(x) = v.get(key) {
                        check(root, sub, x, &format!("{at}.{key}"), errors);
                    }
                }
            }
            "additionalProperties" => {
                let listed = s.get("properties").and_then(Json::as_object);
                for (key, x) in v.as_object().into_iter().flatten() {
                    if listed.is_some_and(|p| p.contains_key(key)) {
                        continue;
                    }
                    match arg {
                        Json::Bool(false) => errors.push(format!("{at}: unexpected key `{key}`")),
                        Json::Bool(true) => {}
                        sub => check(root, sub, x, &format!("{at}.{key}"), errors),
                    }
                }
            }
            "anyOf" | "oneOf" => {
                let passing = arg
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|branch| {
                        let mut e = Vec::new();
                        check(root, branch, v, at, &mut e);
                        e.is_empty()
                    })
                    .count();
                let ok = if keyword == "anyOf" { passing >= 1 } else { passing == 1 };
                if !ok {
                    errors.push(format!("{at}: {passing} branches of {keyword} match"));
                }
            }
            other => panic!("{at}: keyword `{other}` is outside the subset this test checks"),
        }
    }
}

fn violations(schema: &Json, doc: &Json) -> Vec<String> {
    let mut errors = Vec::new();
    check(schema, schema, doc, "$", &mut errors);
    errors
}

#[test]
fn the_schema_lists_every_kind_and_parameter_with_its_default() {
    let sb = Sandbox::real();
    let schema = sb.run(&["schema"]).expect(0).json();
    assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
    let defs = &schema["definitions"];
    let kinds = sb.run(&["stages", "--format", "json"]).expect(0).json();
    let kinds = kinds.as_array().unwrap();
    assert!(kinds.len() >= 10, "{} kinds", kinds.len());
    let names: Vec<&Json> = kinds.iter().map(|k| &k["kind"]).collect();
    assert_eq!(defs["stage"]["properties"]["kind"]["enum"].as_array().unwrap().iter().collect::<Vec<_>>(), names);
    for k in kinds {
        let kind = k["kind"].as_str().unwrap();
        let branch = &defs[format!("stage.{kind}")];
        assert_eq!(branch["properties"]["kind"]["const"], kind);
        assert_eq!(branch["additionalProperties"], false, "{kind}: only its own keys");
        for input in k["inputs"].as_array().unwrap() {
            let name = input["name"].as_str().unwrap();
            assert!(branch["properties"][name].is_object(), "{kind}: input {name}");
            let required = branch["required"].as_array().unwrap().iter().any(|r| r == name);
            assert_eq!(required, input["required"].as_bool().unwrap(), "{kind}: input {name} required");
        }
        for p in k["params"].as_array().unwrap() {
            let name = p["name"].as_str().unwrap();
            let reference = format!("#/definitions/param.{kind}.{name}");
            assert_eq!(branch["properties"][name]["$ref"], reference.as_str(), "{kind}.{name}");
            assert_eq!(defs[format!("template.{kind}")]["properties"][name]["anyOf"][0]["$ref"], reference.as_str());
            assert_eq!(
                schema["properties"]["defaults"]["properties"][kind]["properties"][name]["$ref"],
                reference.as_str()
            );
            let def = &defs[format!("param.{kind}.{name}")];
            let help = p["help"].as_str().unwrap();
            let description = def["description"].as_str().unwrap();
            assert!(description.starts_with(help.trim_end()), "{kind}.{name}: {description}");
            assert!(def["markdownDescription"].is_string(), "{kind}.{name}");
            // `stages` shows a JSON default as its JSON text; the others are words.
            let default_text = p["default"].as_str().unwrap();
            match serde_json::from_str::<Json>(default_text) {
                Ok(value) => assert_eq!(def["default"], value, "{kind}.{name}: default"),
                Err(_) => assert!(def.get("default").is_none(), "{kind}.{name}: `{default_text}` has no value"),
            }
        }
    }
    // --out writes the same text.
    sb.run(&["schema", "--out", "p.schema.json"]).expect(0);
    let written = std::fs::read_to_string(sb.path().join("p.schema.json")).unwrap();
    assert_eq!(written, sb.run(&["schema"]).expect(0).stdout());
}

#[test]
fn every_shipped_pipeline_validates_against_the_schema_and_the_committed_copy_is_current() {
    let sb = Sandbox::real();
    let text = sb.run(&["schema"]).expect(0).stdout();
    let committed = std::fs::read_to_string(repo().join("docs/pipeline.schema.json")).unwrap_or_default();
    assert!(
        committed == text,
        "docs/pipeline.schema.json is stale: run `cargo run -- schema --out docs/pipeline.schema.json`"
    );
    let schema: Json = serde_json::from_str(&text).unwrap();
    let mut files = Vec::new();
    for dir in ["pipelines", "benches"] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 15, "{files:?}");
    for f in &files {
        let errors = violations(&schema, &toml_as_json(f));
        assert!(errors.is_empty(), "{} does not match the schema:\n{}", f.display(), errors.join("\n"));
    }
}

#[test]
fn the_schema_rejects_malformed_pipelines_and_accepts_the_test_pipelines() {
    // tests/malformed uses the toy kinds, so the toy harness's schema.
    let sb = Sandbox::new();
    let schema = sb.run(&["schema"]).expect(0).json();
    for file in ["chain.toml", "grid.toml"] {
        let errors = violations(&schema, &toml_as_json(&repo().join("tests/pipelines").join(file)));
        assert!(errors.is_empty(), "{file}:\n{}", errors.join("\n"));
    }
    // What the schema can see (structure, kinds, keys, types, ranges, one-of values); the rest
    // (input names, cycles, variables, profiles' paths) is `validate`'s alone.
    for (file, expected) in [
        ("02-unknown-top-level.toml", "unexpected key `stage`"),
        ("03-unknown-kind.toml", "is not one of"),
        ("04-missing-kind.toml", "missing required key \"kind\""),
        ("05-kind-not-string.toml", "is not of type"),
        ("06-unknown-param.toml", "branches of oneOf match"),
        ("07-wrong-type.toml", "branches of oneOf match"),
        ("08-out-of-range.toml", "branches of oneOf match"),
        ("09-bad-enum.toml", "branches of oneOf match"),
        ("11-missing-input.toml", "branches of oneOf match"),
        ("18-sweep-values-not-list.toml", "is not of type"),
        ("19-sweep-empty-list.toml", "fewer than 1 items"),
        ("20-sweep-without-over.toml", "missing required key \"over\""),
        ("21-sweep-without-stages.toml", "missing required key \"stages\""),
        ("27-unknown-pipeline-key.toml", "unexpected key `seeds`"),
        ("28-pipeline-seed-type.toml", "is not of type"),
        ("29-defaults-unknown-kind.toml", "unexpected key `toy-scal`"),
        ("30-defaults-unknown-param.toml", "unexpected key `step`"),
        ("35-unknown-sweep-key.toml", "unexpected key `chian`"),
        ("36-input-not-string.toml", "branches of oneOf match"),
    ] {
        let errors = violations(&schema, &toml_as_json(&repo().join("tests/malformed").join(file)));
        assert!(errors.iter().any(|e| e.contains(expected)), "{file}: expected `{expected}`, got {errors:#?}");
    }
}

#[test]
fn completions_name_every_subcommand() {
    let sb = Sandbox::new();
    for shell in ["bash", "zsh", "fish"] {
        let script = sb.run(&["completions", shell]).expect(0).stdout();
        for sub in ["validate", "plan", "run", "report", "explain", "stages", "cache", "schema", "completions"] {
            assert!(script.contains(sub), "{shell}: `{sub}` missing from\n{script}");
        }
        assert!(script.contains("rpt-flow") || script.contains("rpt__flow"), "{shell}: names the program");
    }
    let bad = sb.run(&["completions", "tcsh"]).expect(2);
    assert!(bad.stderr().contains("bash"), "{}", bad.stderr());
}

#[test]
fn validate_json_lists_every_problem_with_its_place_and_keeps_the_exit_codes() {
    let sb = Sandbox::new();
    let ok = sb.run(&["validate", &chain(), "--format", "json"]).expect(0).json();
    assert_eq!(ok["ok"], true);
    assert_eq!(ok["problems"], serde_json::json!([]));
    assert_eq!(ok["instances"], 11);
    assert_eq!(ok["pipeline"], "toy-chain");

    let bad = sb.write(
        "bad.toml",
        "[stages.base]\nkind = \"toy-load\"\nsize = 0\n\n[stages.words]\nkind = \"toy-text\"\ninput = \"base\"\nstyle = \"shuot\"\n",
    );
    let run = sb.run(&["validate", bad.to_str().unwrap(), "--format", "json"]);
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(run.stderr().is_empty(), "json mode prints the problems once, on stdout: {}", run.stderr());
    let doc = run.json();
    assert_eq!(doc["ok"], false);
    let problems = doc["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{doc:#}");
    let size = &problems[0];
    assert_eq!(size["file"], bad.to_str().unwrap());
    assert_eq!((size["line"].as_u64(), size["col"].as_u64()), (Some(3), Some(8)), "{size}");
    assert!(size["message"].as_str().unwrap().contains("out of range"), "{size}");
    let style = &problems[1];
    assert_eq!((style["line"].as_u64(), style["col"].as_u64()), (Some(8), Some(9)), "{style}");
    assert_eq!(style["help"], "did you mean `shout`?");
    // The same problems in text, on stderr, with the same exit code.
    let text = sb.run(&["validate", bad.to_str().unwrap()]).expect(2).stderr();
    assert!(text.contains(":3:8") && text.contains(":8:9") && text.contains("did you mean `shout`?"), "{text}");

    // A problem in a --set override points into it; a missing file has no position.
    let set = sb.run(&["validate", &chain(), "--set", "stages.base.size=0", "--format", "json"]).expect(2).json();
    assert_eq!(set["problems"][0]["file"], "--set", "{set:#}");
    let missing = sb.run(&["validate", "nope.toml", "--format", "json"]).expect(2).json();
    assert_eq!(missing["problems"][0]["file"], "nope.toml");
    assert!(missing["problems"][0]["line"].is_null(), "{missing:#}");
}

#[test]
fn explain_and_cache_ls_json_describe_keys_and_entries() {
    let sb = Sandbox::new();
    let p = chain();
    let name = "level[factor=0.25].tuned";
    let fresh = sb.run(&["explain", &p, name, "--format", "json"]).expect(0).json();
    assert_eq!(fresh["instance"], name);
    assert_eq!(fresh["status"], "to run");
    assert!(fresh["entry"].is_null() && fresh["nearest"].is_null(), "{fresh:#}");
    assert_eq!(fresh["key"].as_str().unwrap().len(), 64);
    assert_eq!(fresh["key_material"]["params"], fresh["params"], "the params are what the key hashes");
    assert_eq!(fresh["inputs"][0]["slot"], "input");

    sb.run(&["run", &p, "-q"]).expect(0);
    let cached = sb.run(&["explain", &p, name, "--format", "json"]).expect(0).json();
    assert_eq!(cached["status"], "cached");
    assert_eq!(cached["key"], fresh["key"]);
    assert!(cached["entry"].as_str().unwrap().contains(fresh["key"].as_str().unwrap()), "{cached:#}");

    // A changed parameter: a miss, diffed against the nearest cached entry.
    let changed = sb.run(&["explain", &p, name, "--set", "defaults.toy-scale.steps=7", "--format", "json"]);
    let changed = changed.expect(0).json();
    assert_eq!(changed["status"], "to run");
    let near = &changed["nearest"];
    assert_eq!(near["key"], fresh["key"], "{changed:#}");
    assert_eq!(near["instance"], name);
    let diffs: Vec<&str> = near["differences"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    assert!(diffs.iter().any(|d| d.starts_with("params.steps:") && d.ends_with("→ 7")), "{diffs:?}");

    let ls = sb.run(&["cache", "ls", "--format", "json"]).expect(0).json();
    assert_eq!(ls["count"], 11);
    let entries = ls["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 11);
    let session = sb.session("toy-chain.json");
    let entry = entries.iter().find(|e| e["instance"] == name).expect("the tuned entry is listed");
    assert_eq!(entry["key"], session["stages"][name]["key"]);
    assert_eq!(entry["kind"], session["stages"][name]["kind"]);
    assert!(entry["bytes"].as_u64().unwrap() > 0 && entry["created"].as_u64().unwrap() > 1_600_000_000, "{entry}");
    assert_eq!(entry["last_pipeline"], "toy-chain");
    assert!(ls["bytes_on_disk"].as_u64().unwrap() <= ls["bytes_listed"].as_u64().unwrap());
    let empty = Sandbox::new();
    let none = empty.run(&["cache", "ls", "--format", "json"]).expect(0).json();
    assert_eq!((none["count"].as_u64(), none["entries"].as_array().map(Vec::len)), (Some(0), Some(0)));
}
