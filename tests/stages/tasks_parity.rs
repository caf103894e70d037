//! `eval-tasks` against lm-evaluation-harness: tests/fixtures/make_tasks_reference.py runs the
//! harness (lm_eval 0.4.9.2, its HF model class, f32) on the fixture models over
//! tests/fixtures/tasks/items.jsonl as two local `multiple_choice` tasks, and records every item's
//! prompt, per-choice log-likelihoods, acc and acc_norm (tests/fixtures/tasks/reference.json).
//! Here the `rpt-flow` binary scores the same items in a pipeline and must agree: the prompt
//! exactly, each log-likelihood to 1e-5 (relative, at least 1e-5 absolute), acc and acc_norm
//! exactly, item by item and overall.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value as Json;

use crate::ppl_parity::lit;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The harness's per-task text templates, in rpt-flow's `{field}` form.
const TASKS: [(&str, &str, &str); 2] =
    [("rpt_mc_plain", "plain", "Question: {question}\\nAnswer:"), ("rpt_mc_space", "space", "{question}\\n")];

/// Runs `stages` (eval-tasks tables over the input `model`) on the model in the folder `model`,
/// in `dir`, with extra environment; (stage name → (metrics, items.jsonl rows)).
fn run_in(
    dir: &std::path::Path,
    model: &std::path::Path,
    stages: &[(String, String)],
    env: &[(&str, &std::path::Path)],
) -> Vec<(String, Json, Vec<Json>)> {
    let mut toml = format!(
        "[pipeline]\nname = \"tasks-parity\"\n[stages.model]\nkind = \"load\"\nmodel = {{ path = {} }}\ndtype = \"f32\"\n",
        lit(model)
    );
    for (stage, body) in stages {
        toml.push_str(&format!("[stages.{stage}]\nkind = \"eval-tasks\"\ninput = \"model\"\nbatch = 3\n{body}\n"));
    }
    let file = dir.join("tasks.toml");
    std::fs::write(&file, toml).unwrap();
    let cli = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_rpt-flow"));
        c.args(args).arg(&file).current_dir(dir).env_remove("RPT_CACHE").env_remove("RPT_SESSIONS");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    cli(&["run", "-q"]);
    let plan: Json = serde_json::from_slice(&cli(&["plan", "--format", "json"])).unwrap();
    let mut out = Vec::new();
    for (stage, _) in stages {
        let inst = plan["instances"].as_array().unwrap().iter().find(|i| i["name"] == stage.as_str()).unwrap();
        let entry = dir.join(inst["entry"].as_str().unwrap());
        let manifest: Json =
            serde_json::from_str(&std::fs::read_to_string(entry.join("manifest.json")).unwrap()).unwrap();
        let rows = std::fs::read_to_string(entry.join("items.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        out.push((stage.clone(), manifest["metrics"].clone(), rows));
    }
    out
}

/// Runs the local JSONL tasks on the model in `model` (a folder).
fn run(model: &std::path::Path) -> Vec<(String, Json, Vec<Json>)> {
    let dir = tempfile::tempdir().unwrap();
    let items = repo().join("tests/fixtures/tasks/items.jsonl");
    let stages: Vec<(String, String)> = TASKS
        .iter()
        .map(|(_, stage, text)| {
            let body = format!(
                "task = {{ jsonl = {}, text = \"{text}\", choices = \"choices\", gold = \"answer\" }}",
                lit(&items)
            );
            (stage.to_string(), body)
        })
        .collect();
    run_in(dir.path(), model, &stages, &[])
}

/// Agreement of one task's items with the harness's record of them.
fn assert_items_agree(at: &str, rows: &[Json], items: &[Json]) {
    assert_eq!(rows.len(), items.len(), "{at}");
    for (ours, theirs) in rows.iter().zip(items) {
        let at = format!("{at} item {}", theirs["doc_id"]);
        assert_eq!(ours["context"], theirs["context"], "{at}: the prompt");
        let (a, b) = (ours["lls"].as_array().unwrap(), theirs["lls"].as_array().unwrap());
        assert_eq!(a.len(), b.len(), "{at}");
        for (x, y) in a.iter().zip(b) {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(close(x, y), "{at}: log-likelihood {x} vs the harness's {y}");
        }
        let gold = ours["gold"].as_u64().unwrap();
        assert_eq!(
            f64::from(u8::from(ours["pred"].as_u64() == Some(gold))),
            theirs["acc"].as_f64().unwrap(),
            "{at}: acc"
        );
        if let Some(norm) = theirs["acc_norm"].as_f64() {
            assert_eq!(f64::from(u8::from(ours["pred_norm"].as_u64() == Some(gold))), norm, "{at}: acc_norm");
        }
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * b.abs().max(1.0)
}

/// The local tasks on `model` (its folder) agree with the harness's record of them.
fn check_local(model: &str, dir: &std::path::Path) {
    let reference: Json =
        serde_json::from_str(&std::fs::read_to_string(repo().join("tests/fixtures/tasks/reference.json")).unwrap())
            .unwrap();
    for ((harness_task, _, _), (stage, metrics, rows)) in TASKS.iter().zip(run(dir)) {
        let r = &reference["models"][model][harness_task];
        let items = r["items"].as_array().unwrap();
        assert_items_agree(&format!("{model}/{stage}"), &rows, items);
        assert_eq!(metrics["items"], items.len(), "{model}/{stage}");
        for m in ["acc", "acc_norm"] {
            assert_eq!(metrics[m], r[m], "{model}/{stage}: {m}");
            let (x, y) = (metrics[format!("{m}_stderr")].as_f64().unwrap(), r[format!("{m}_stderr")].as_f64().unwrap());
            assert!((x - y).abs() < 1e-12, "{model}/{stage}: {m}_stderr {x} vs {y}");
        }
    }
}

#[test]
fn eval_tasks_matches_lm_evaluation_harness_item_by_item() {
    for model in ["llama_tiny", "bitnet_tiny"] {
        check_local(model, &repo().join("tests/fixtures").join(model));
    }
}

/// stories260K: a real pretrained Llama (../shared, never committed), converted at run time.
#[test]
fn eval_tasks_matches_lm_evaluation_harness_on_stories260k() {
    let out = tempfile::tempdir().unwrap();
    let Some(converted) = crate::support::stories260k_converted(out.path()) else { return };
    check_local("stories260K", &converted);
}

/// The hub tasks: rows of tests/fixtures/tasks/hub_rows.json written as parquet files in each
/// dataset's schema, at its pinned revision, in an offline hub cache; the reference is the
/// harness's own task configs (YAML, `process_docs`, partial scoring, MMLU's description and
/// first-n examples) over the same rows.
#[test]
fn hub_tasks_match_the_harness_task_configs() {
    use rpt_flow::data::task_hub::{dataset, schemas};
    let reference: Json =
        serde_json::from_str(&std::fs::read_to_string(repo().join("tests/fixtures/tasks/reference.json")).unwrap())
            .unwrap();
    let rows: Json =
        serde_json::from_str(&std::fs::read_to_string(repo().join("tests/fixtures/tasks/hub_rows.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hub = dir.path().join("hub");
    for (task, schema) in [
        ("arc_easy", schemas::arc()),
        ("arc_challenge", schemas::arc()),
        ("hellaswag", schemas::hellaswag()),
        ("piqa", schemas::piqa()),
        ("winogrande", schemas::winogrande()),
        ("mmlu", schemas::mmlu()),
    ] {
        let d = dataset(task).unwrap();
        let snapshot = hub.join(format!("datasets--{}", d.repo.replace('/', "--"))).join("snapshots").join(d.revision);
        let splits = rows[task].as_object().unwrap();
        let mut names = splits.keys();
        let (eval, shots) = (names.next().unwrap(), names.next().unwrap());
        for (split, file) in [(eval, d.eval_file), (shots, d.fewshot_file)] {
            let path = snapshot.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            rpt_flow::data::write_rows(&path, &schema, splits[split].as_array().unwrap()).unwrap();
        }
    }
    let cases = reference["hub"]["cases"].as_object().unwrap();
    let stages: Vec<(String, String)> = cases
        .iter()
        .enumerate()
        .map(|(i, (key, case))| {
            let task = key.split('/').next().unwrap();
            (format!("c{i}"), format!("task = \"{task}\"\nnum_fewshot = {}", case["num_fewshot"]))
        })
        .collect();
    let results = run_in(
        dir.path(),
        &repo().join("tests/fixtures/llama_tiny"),
        &stages,
        &[("HF_HUB_CACHE", &hub), ("HF_HUB_OFFLINE", std::path::Path::new("1"))],
    );
    for ((key, case), (_, metrics, items)) in cases.iter().zip(results) {
        assert_items_agree(key, &items, case["items"].as_array().unwrap());
        assert_eq!(metrics["acc"], case["acc"], "{key}: acc");
    }
}
