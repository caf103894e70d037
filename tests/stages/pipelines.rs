//! Every shipped pipeline runs under its `tiny` profile, and a second run is fully cached.

use crate::support::{repo, Sandbox};

fn run_tiny(file: &str, session: &str) -> (Sandbox, serde_json::Value) {
    run_profiles(file, &["tiny"], session)
}

/// Runs `file` under `profiles`, checks the session completed and that a second run computes
/// nothing.
fn run_profiles(file: &str, profiles: &[&str], session: &str) -> (Sandbox, serde_json::Value) {
    let sb = Sandbox::real();
    let p = repo().join(file);
    let mut args = vec!["run", p.to_str().unwrap()];
    for prof in profiles {
        args.extend(["--profile", prof]);
    }
    let first = sb.run(&args).expect(0);
    assert!(first.stdout().contains("computed"), "{}", first.stdout());
    let s = sb.session(session);
    assert_eq!(s["status"], "complete");
    let again = sb.run(&args).expect(0);
    assert!(again.stdout().contains("nothing to compute"), "second run: {}", again.stdout());
    (sb, s)
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn columns(table: &serde_json::Value) -> Vec<&str> {
    table["columns"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect()
}

fn check_text(text: &serde_json::Value) {
    let label = text["label"].as_str().unwrap();
    assert!(["correct", "wrong", "repetitive"].contains(&label), "{label}");
    let outputs = text["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 3, "the notebook's three fact prompts");
    for o in outputs {
        assert!(o["expected"].is_string() && o["label"].is_string() && o["token_ids"].is_array());
    }
}

#[test]
fn sparsity_tiny_notebook_protocol() {
    let (_sb, s) = run_tiny("pipelines/sparsity.toml", "sparsity.tiny.json");
    let st = &s["stages"];
    let base = &st["baseline"]["metrics"];
    assert!(f(&base["ppl"]).is_finite() && f(&base["ppl"]) > 1.0);
    assert_eq!(base["protocol"]["name"], "texts", "each text its own window, as the sparsity notebook");
    for level in ["0.1", "0.2", "0.3", "0.5", "0.7", "0.8", "0.9"] {
        let pruned = &st[format!("level[sparsity={level}].pruned")]["metrics"];
        assert_eq!(pruned["rule"], "notebook");
        assert_eq!(pruned["sparsity_before"], 0.0, "every level prunes the base model");
        let (want, got) = (level.parse::<f64>().unwrap(), f(&pruned["sparsity"]));
        // |w| ≤ the percentile: at least the level (ties at the threshold go too).
        assert!(got >= want - 1e-9 && got < want + 0.02, "level {level}: achieved {got}");
        let ppl = &st[format!("level[sparsity={level}].ppl")]["metrics"];
        assert!(f(&ppl["ppl"]).is_finite());
        assert_eq!(ppl["tokens"], base["tokens"], "same texts at every level");
        check_text(&st[format!("level[sparsity={level}].text")]["metrics"]);
    }
    let table = &s["tables"][0];
    assert_eq!(
        columns(table),
        ["sparsity", "achieved (%)", "ppl", "vs baseline (%)", "ternary 0 before → after prune (%)", "text label"]
    );
}

#[test]
fn sparsity_tiny_rigorous_protocol() {
    let (_sb, s) = run_profiles("pipelines/sparsity.toml", &["tiny", "rigorous"], "sparsity.rigorous.tiny.json");
    let st = &s["stages"];
    assert_eq!(st["baseline"]["metrics"]["protocol"]["name"], "chunks");
    for level in ["0.1", "0.2", "0.3"] {
        let pruned = &st[format!("level[sparsity={level}].pruned")]["metrics"];
        assert_eq!(pruned["rule"], "exact");
        let want: f64 = level.parse().unwrap();
        let n = f(&pruned["weights"]);
        assert!((f(&pruned["sparsity"]) - want).abs() <= 0.5 / n + 1e-12, "level {level}: exact sparsity");
    }
}

#[test]
fn profiles_apply_in_file_order_whatever_the_command_line_order() {
    let sb = Sandbox::real();
    let p = repo().join("pipelines/progressive.toml");
    let plan = |profiles: &[&str]| {
        let mut args = vec!["plan", p.to_str().unwrap(), "--format", "json"];
        for prof in profiles {
            args.extend(["--profile", prof]);
        }
        sb.run(&args).expect(0).json()
    };
    let (a, b) = (plan(&["tiny", "rigorous"]), plan(&["rigorous", "tiny"]));
    assert_eq!(a["instances"], b["instances"], "same keys in either order");
    let eval = |plan: &serde_json::Value| {
        plan["instances"].as_array().unwrap().iter().find(|i| i["name"] == "baseline").unwrap()["params"].clone()
    };
    // tiny (defined last) sets the size and the data; rigorous the protocol.
    assert_eq!(eval(&a)["data"], "synthetic:facts:test");
    assert_eq!(eval(&a)["protocol"], "chunks");
    assert_eq!(eval(&a)["seq_len"], 64);
    assert_eq!(eval(&plan(&["tiny"]))["protocol"], "rpt-notebook");
}

#[test]
fn inference_tiny_runs_every_protocol() {
    let (_sb, s) = run_tiny("pipelines/inference.toml", "inference.tiny.json");
    let chunks = &s["stages"]["ppl"]["metrics"];
    let lcpp = &s["stages"]["ppl-llama-cpp"]["metrics"];
    assert_eq!(chunks["protocol"]["name"], "chunks");
    assert_eq!(lcpp["protocol"]["name"], "llama-cpp");
    // chunks scores seq_len-1 tokens per window, llama-cpp seq_len-1-seq_len/2.
    assert_eq!(chunks["tokens"].as_u64().unwrap(), chunks["windows"].as_u64().unwrap() * 63);
    assert_eq!(lcpp["tokens"].as_u64().unwrap(), lcpp["windows"].as_u64().unwrap() * (63 - 32));
    assert!(chunks["bits_per_byte"].as_f64().unwrap() > 0.0);
    assert_eq!(s["stages"]["base"]["metrics"]["quantization"], "ternary");
}

#[test]
fn shipped_pipelines_validate_in_full_and_tiny_form() {
    let sb = Sandbox::real();
    for entry in std::fs::read_dir(repo().join("pipelines")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            let path = p.to_str().unwrap();
            sb.run(&["validate", path]).expect(0);
            sb.run(&["validate", path, "--profile", "tiny"]).expect(0);
            let text = std::fs::read_to_string(&p).unwrap();
            if text.contains("[profiles.rigorous]") {
                sb.run(&["validate", path, "--profile", "rigorous"]).expect(0);
                sb.run(&["validate", path, "--profile", "tiny", "--profile", "rigorous"]).expect(0);
            }
        }
    }
    let stages = sb.run(&["stages"]).expect(0).stdout();
    for kind in ["load", "prune", "eval-ppl", "generate"] {
        assert!(stages.contains(&format!("{kind} (v")), "{kind} missing from `rpt-flow stages`");
    }
    assert!(!stages.contains("toy-"), "the shipped binary lists only real stages");
}

const LEVELS: [&str; 8] = ["0.05", "0.1", "0.15", "0.2", "0.25", "0.3", "0.4", "0.5"];

/// What both protocols of the progressive run share: a fine-tune per level and per control point,
/// each continuing the batch stream of its lineage, and the researcher's table.
fn check_progressive(s: &serde_json::Value) {
    let st = &s["stages"];
    assert_eq!(st["base"]["metrics"]["source"]["builtin"], "tiny-bitnet");
    for (k, level) in LEVELS.iter().enumerate() {
        let get = |stage: &str| st[format!("level[sparsity={level}].{stage}")]["metrics"].clone();
        assert!(f(&get("before")["ppl"]).is_finite() && f(&get("after")["ppl"]).is_finite(), "level {level}");
        let tuned = get("tuned");
        assert_eq!(tuned["loss"].as_array().unwrap().len(), 8);
        assert_eq!(tuned["first_batch"], 8 * k as u64, "level {level} continues the stream after {k} fine-tunes");
        assert!(get("text")["label"].is_string());
        let control = &st[format!("control[finetunes={}].tuned", k + 1)]["metrics"];
        assert_eq!(control["first_batch"], tuned["first_batch"], "the control's point {} sees the same batches", k + 1);
        assert!(f(&st[format!("control[finetunes={}].after", k + 1)]["metrics"]["ppl"]).is_finite());
    }
    let table = &s["tables"][0];
    assert_eq!(
        columns(table),
        [
            "sparsity",
            "achieved (%)",
            "ppl before",
            "ppl after",
            "vs baseline (%)",
            "recovery",
            "before/after",
            "0% control",
            "after ft: zeros / ternary 0 (%)",
            "ternary 0 before → after prune (%)",
            "text label"
        ]
    );
    let rows = table["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1 + 8, "the baseline and one row per level (the control is a column)");
    assert_eq!(rows[8][0], "50%");
    for r in &rows[1..] {
        let before: f64 = r[2].as_str().unwrap().parse().unwrap();
        let after: f64 = r[3].as_str().unwrap().parse().unwrap();
        let recovery: f64 = r[5].as_str().unwrap().parse().unwrap();
        assert!((recovery - (before - after)).abs() < 0.011, "recovery = before − after: {r:?}");
        assert_ne!(r[7], "—", "every level has its control point: {r:?}");
    }
}

#[test]
fn progressive_tiny_notebook_protocol() {
    let (sb, s) = run_tiny("pipelines/progressive.toml", "progressive-sparsity.tiny.json");
    check_progressive(&s);
    // gc --keep plans the full pipeline too, whose unpinned hub model cannot be resolved here
    // (no network): it must still work, and keep every entry of the tiny run.
    let p = repo().join("pipelines/progressive.toml");
    let gc = sb.run(&["cache", "gc", "--keep", p.to_str().unwrap()]).expect(0).stdout();
    assert!(gc.contains("removed 0 entries"), "{gc}");
    let st = &s["stages"];
    assert_eq!(st["baseline"]["metrics"]["protocol"]["name"], "rpt-notebook");
    assert_eq!(st["baseline"]["metrics"]["protocol"]["encode"], "per-row");
    let mut previous = 0.0;
    for level in LEVELS {
        let get = |stage: &str| st[format!("level[sparsity={level}].{stage}")]["metrics"].clone();
        let (pruned, tuned) = (get("pruned"), get("tuned"));
        assert_eq!(pruned["rule"], "notebook");
        // The level is a percentile of what is left: the levels compound.
        let achieved = f(&pruned["sparsity"]);
        let before = f(&pruned["sparsity_before"]);
        let want = before + (1.0 - before) * level.parse::<f64>().unwrap();
        assert!(achieved >= want - 1e-9 && achieved < want + 0.02, "level {level}: {achieved} vs {want}");
        assert!(achieved > previous);
        previous = achieved;
        // Masks are not re-applied: pruned weights grow back, and the regrowth is reported.
        assert_eq!(tuned["masks"], "ignore");
        assert!(f(&tuned["regrown_fraction"]) > 0.0, "level {level}: {tuned}");
        assert!(f(&tuned["sparsity_after"]) < achieved, "level {level}: regrowth lowers the sparsity");
        assert_eq!(
            tuned["trainable"],
            f(&st["base"]["metrics"]["parameters"]),
            "every parameter trains, the embedding too"
        );
    }
}

#[test]
fn progressive_tiny_rigorous_protocol() {
    let (_sb, s) =
        run_profiles("pipelines/progressive.toml", &["tiny", "rigorous"], "progressive-sparsity.rigorous.tiny.json");
    check_progressive(&s);
    let st = &s["stages"];
    assert_eq!(st["baseline"]["metrics"]["protocol"]["name"], "chunks");
    let mut previous_zeros = 0;
    for level in LEVELS {
        let get = |stage: &str| st[format!("level[sparsity={level}].{stage}")]["metrics"].clone();
        let (pruned, tuned) = (get("pruned"), get("tuned"));
        let zeros = pruned["zeros"].as_u64().unwrap();
        assert!(zeros > previous_zeros, "levels nest and grow");
        assert_eq!(
            pruned["already_pruned"].as_u64().unwrap(),
            previous_zeros,
            "level {level} starts from the previous one"
        );
        let n = f(&pruned["weights"]);
        assert!((f(&pruned["sparsity"]) - level.parse::<f64>().unwrap()).abs() <= 0.5 / n + 1e-12);
        previous_zeros = zeros;
        assert_eq!(tuned["masks"], "keep");
        assert_eq!(tuned["regrown"], 0, "masks kept: nothing grows back");
        assert_eq!(tuned["sparsity_after"], pruned["sparsity"]);
    }
}

#[test]
fn tiny_pretrain_tiny_learns_something_and_is_bit_reproducible() {
    let (sb, s) = run_tiny("pipelines/tiny-pretrain.toml", "tiny-pretrain.tiny.json");
    let (sb2, s2) = run_tiny("pipelines/tiny-pretrain.toml", "tiny-pretrain.tiny.json");
    let weights = |sb: &Sandbox, s: &serde_json::Value| {
        let key = s["stages"]["trained"]["key"].as_str().unwrap().to_string();
        let dir = sb.path().join("cache").join(&key[..2]).join(key);
        (std::fs::read(dir.join("model.safetensors")).unwrap(), std::fs::read(dir.join("tokenizer.json")).unwrap())
    };
    assert!(weights(&sb, &s) == weights(&sb2, &s2), "two fresh runs give different bytes");
    let loss = s["stages"]["trained"]["metrics"]["loss"].as_array().unwrap();
    assert_eq!(loss.len(), 8);
    let ppl = |n: &str| s["stages"][n]["metrics"]["ppl"].as_f64().unwrap();
    assert!(ppl("ppl-trained") < ppl("ppl-untrained"), "eight steps already lower the perplexity");
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// progressive-criticality reuses progressive's cached chain under the same profiles.
fn progressive_criticality_reuses_the_chain(profiles: &[&str], session: &str) -> serde_json::Value {
    let sb = Sandbox::real();
    let prog = repo().join("pipelines/progressive.toml");
    let crit = repo().join("pipelines/progressive-criticality.toml");
    let with = |cmd: &str, file: &std::path::Path, extra: &[&str]| {
        let mut a = vec![cmd.to_string(), file.to_str().unwrap().to_string()];
        for p in profiles {
            a.extend(["--profile".to_string(), p.to_string()]);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run_prog = with("run", &prog, &["-q"]);
    sb.run(&args(&run_prog)).expect(0);
    let plan_crit = with("plan", &crit, &["--format", "json"]);
    let plan = sb.run(&args(&plan_crit)).expect(0).json();
    for i in plan["instances"].as_array().unwrap() {
        let name = i["name"].as_str().unwrap();
        let shared = name == "base" || name.ends_with(".pruned") || name.ends_with(".tuned");
        let expected = if shared { "cached" } else { "to run" };
        assert_eq!(i["status"], expected, "{name} ({profiles:?})");
    }
    let run_crit = with("run", &crit, &["-q"]);
    sb.run(&args(&run_crit)).expect(0);
    let s = sb.session(session);
    assert_eq!(s["stages"]["level[sparsity=0.5].tuned"]["cached"], true);
    s
}

#[test]
fn progressive_criticality_reuses_every_cached_level_in_both_protocols() {
    let s = progressive_criticality_reuses_the_chain(&["tiny"], "progressive-criticality.tiny.json");
    let g = &s["stages"]["level[sparsity=0.5].growth"]["metrics"];
    assert!(f(&g["lyapunov"]).is_finite());
    assert_eq!(g["scale"], "absolute");
    assert_eq!(g["protocol"]["texts"]["count"], 8, "the notebook's per-row texts");
    let s =
        progressive_criticality_reuses_the_chain(&["tiny", "rigorous"], "progressive-criticality.rigorous.tiny.json");
    let g = &s["stages"]["level[sparsity=0.5].growth"]["metrics"];
    assert_eq!(g["scale"], "relative");
    assert_eq!(g["protocol"]["name"], "chunks");
}

fn check_criticality(s: &serde_json::Value) {
    let st = &s["stages"];
    let layers = st["residuals"]["metrics"]["layers"].as_array().unwrap().len();
    for name in ["growth", "level[sparsity=0.1].growth", "level[sparsity=0.3].growth"] {
        let g = &st[name]["metrics"];
        let delta: Vec<f64> = g["delta"].as_array().unwrap().iter().map(f).collect();
        assert_eq!(delta.len(), layers + 1, "{name}");
        // The notebook's convention: from layer 0's output, and the embedding-based figures beside.
        let amp = delta[layers] / delta[1];
        assert!((f(&g["amplification"]) - amp).abs() < 1e-12 * amp.abs());
        assert!((f(&g["lyapunov"]) - amp.ln() / (layers - 1) as f64).abs() < 1e-12);
        assert!((f(&g["amplification_from_embedding"]) - delta[layers] / delta[0]).abs() < 1e-9);
    }
}

#[test]
fn criticality_tiny_in_both_protocols() {
    let (_sb, s) = run_tiny("pipelines/criticality.toml", "criticality.tiny.json");
    check_criticality(&s);
    let r = &s["stages"]["residuals"]["metrics"];
    assert_eq!(r["windows"], 8, "eight texts, one forward each");
    assert_eq!(r["protocol"]["texts"]["longer_than"], 100);
    assert_eq!(s["stages"]["growth"]["metrics"]["scale"], "absolute");
    let (_sb, s) = run_profiles("pipelines/criticality.toml", &["tiny", "rigorous"], "criticality.rigorous.tiny.json");
    check_criticality(&s);
    assert_eq!(s["stages"]["residuals"]["metrics"]["protocol"]["name"], "chunks");
    assert_eq!(s["stages"]["growth"]["metrics"]["scale"], "relative");
}

#[test]
fn predictive_coding_tiny_in_both_protocols() {
    for (profiles, session, scope) in [
        (&["tiny"][..], "predictive-coding.tiny.json", "tensor-percentile"),
        (&["tiny", "rigorous"][..], "predictive-coding.rigorous.tiny.json", "percentile"),
    ] {
        let (_sb, s) = run_profiles("pipelines/predictive_coding.toml", profiles, session);
        let st = &s["stages"];
        // Threshold 0 changes nothing: the same perplexity as the clean model on the same windows.
        assert_eq!(st["absolute[threshold=0].pruned"]["metrics"]["nll"], st["clean"]["metrics"]["nll"]);
        for p in [50, 70, 90] {
            let iv = &st[format!("percentile[percentile={p}].pruned")]["metrics"]["intervention"];
            assert_eq!(iv["mode"], scope, "{profiles:?}");
            let (masked, zeroed) = (f(&iv["masked_fraction"]), f(&iv["zeroed_fraction"]));
            // Natural zeros count as zeroed in the notebook's measure, not as newly zeroed.
            assert!(masked >= zeroed && masked > 0.0, "p{p}: masked {masked}, zeroed {zeroed}");
            assert!((masked - p as f64 / 100.0).abs() < 0.05, "p{p}: about p% below the cut, got {masked}");
        }
        let intervention = s["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["title"].as_str().unwrap().contains("percentile"))
            .unwrap();
        assert_eq!(columns(intervention)[1], "% zeroed (notebook)");
        assert_eq!(intervention["rows"][0][0], "none (baseline)", "the clean stage is the baseline");
    }
}

#[test]
fn baselines_tiny_measures_every_notebook_protocol() {
    let (_sb, s) = run_tiny("pipelines/baselines.toml", "baselines.tiny.json");
    let st = &s["stages"];
    let facts = &st["facts"]["metrics"];
    assert_eq!(facts["protocol"]["name"], "texts");
    assert_eq!(facts["windows"], 8, "eight fact sentences, each its own window");
    assert_eq!(st["wiki-validation"]["metrics"]["protocol"]["name"], "rpt-notebook");
    assert_eq!(st["wiki-test"]["metrics"]["protocol"]["name"], "chunks");
    let ppl: Vec<f64> =
        ["facts", "wiki-validation", "wiki-test"].iter().map(|n| f(&st[*n]["metrics"]["ppl"])).collect();
    assert!(ppl.iter().all(|p| p.is_finite() && *p > 1.0), "{ppl:?}");
    assert_ne!(ppl[0], ppl[2], "different text, different number");
}

#[test]
fn the_stage_reference_in_docs_is_generated_from_the_definitions() {
    let sb = Sandbox::real();
    let generated = sb.run(&["stages", "--format", "markdown"]).expect(0).stdout();
    let doc = std::fs::read_to_string(repo().join("docs/stage-reference.md")).unwrap();
    let body = doc.split_once("\n\n## ").map(|(_, rest)| format!("## {rest}")).unwrap_or_default();
    assert!(body == generated, "docs/stage-reference.md is stale: run scripts/stage-reference.sh");
}

#[test]
fn protocol_parameters_that_contradict_each_other_are_refused_with_the_fix() {
    let sb = Sandbox::real();
    let base = "[stages.base]\nkind = \"load\"\nmodel = \"builtin:tiny-bitnet\"\n";
    for (stage, error, line) in [
        (
            "kind = \"eval-ppl\"\ninput = \"base\"\ndata = \"synthetic:facts:test\"\nprotocol = \"rpt-notebook\"\nbos = \"window-start\"",
            "protocol \"rpt-notebook\" takes bos = \"none\" (the notebooks) or \"stream-start\"",
            5,
        ),
        (
            "kind = \"finetune\"\ninput = \"base\"\ndata = \"synthetic:facts:train\"\nmin_row_chars = 20",
            "min_row_chars applies to encode = \"per-row\"",
            5,
        ),
        (
            "kind = \"hook-residuals\"\ninput = \"base\"\ndata = \"synthetic:facts:test\"\ntexts = \"rows\"\nmax_windows = 4",
            "max_windows applies to texts = \"windows\"; use max_texts",
            5,
        ),
        (
            "kind = \"prune\"\ninput = \"base\"\nsparsity = 0.1\nrule = \"notebook\"\nscope = \"per-row\"",
            "rule = \"notebook\" takes one threshold over all targets: scope must be \"global\"",
            5,
        ),
        (
            "kind = \"eval-ppl\"\ninput = \"base\"\ndata = \"synthetic:facts:test\"\nmax_windows = \"most\"",
            "max_windows",
            8,
        ),
    ] {
        let p = sb.write("bad.toml", &format!("{base}[stages.s]\n{stage}\n"));
        let r = sb.run(&["validate", p.to_str().unwrap()]).expect(2);
        let err = r.stderr();
        assert!(err.contains(error), "expected `{error}` in:\n{err}");
        assert!(err.contains(&format!("bad.toml:{line}:")), "the error points into the file (line {line}):\n{err}");
        assert!(!sb.path().join("cache").exists() && !sb.path().join("sessions").exists(), "validate writes nothing");
    }
}

/// The benchmark pipelines (benches/*.toml, run at full size by scripts/rehearse-2b.sh and
/// scripts/device-check.sh) stay valid: the same graphs run here at toy size. Each computed stage
/// records its own peak memory, and a fine-tune shares its input's unchanged mask file.
#[test]
fn bench_pipelines_run_at_toy_size() {
    let (sb, s) = run_tiny("benches/rehearsal-2b.toml", "rehearsal-2b.tiny.json");
    for (name, st) in s["stages"].as_object().unwrap() {
        assert!(f(&st["peak_rss_mb"]) > 1.0, "{name}: no peak memory recorded");
    }
    let ls = sb.run(&["cache", "ls"]).expect(0);
    assert!(
        ls.stdout().contains("shared between entries by hard links"),
        "the fine-tunes' masks are links to their inputs' masks, counted once: {}",
        ls.stdout()
    );
    run_tiny("benches/device-speed.toml", "device-speed.tiny.json");
    run_profiles("benches/device-parity.toml", &[], "device-parity.json");
}

/// Sizes that cannot fit any machine are refused before anything runs (exit 2, with where),
/// instead of an allocation abort or a run that never ends.
#[test]
fn absurd_sizes_are_refused_up_front() {
    let sb = Sandbox::real();
    let p = repo().join("pipelines/progressive.toml");
    for set in ["defaults.finetune.batch=1000000000000000000", "defaults.finetune.steps=1000000000000000000"] {
        let run = sb.run(&["run", p.to_str().unwrap(), "--profile", "tiny", "--set", set]).expect(2);
        assert!(run.stderr().contains("out of range") && run.stderr().contains("--set:1:"), "{set}: {}", run.stderr());
    }
    assert!(!sb.path().join("sessions").exists(), "nothing ran, no session written");
}

/// `rpt-flow stages` shows what each kind contributes to reports: its roles and every metric
/// it writes, from the same declaration the executor checks runs against.
#[test]
fn stages_lists_each_kinds_roles_and_metrics() {
    let sb = Sandbox::real();
    let doc = sb.run(&["stages", "eval-ppl", "--format", "json"]).expect(0).json();
    assert_eq!(doc[0]["roles"], serde_json::json!(["perplexity"]));
    let metrics: Vec<&str> =
        doc[0]["metrics"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    for m in ["ppl", "bits_per_byte", "tokens", "protocol"] {
        assert!(metrics.contains(&m), "{m} in {metrics:?}");
    }
    let text = sb.run(&["stages", "hook-residuals"]).expect(0).stdout();
    assert!(text.contains("(report: residuals)"), "{text}");
    assert!(text.contains("metric intervention") && text.contains("(sometimes)"), "{text}");
}

/// The progressive pipeline with `--jobs 3` gives the numbers of a one-at-a-time run, and its
/// fine-tunes (a kind that runs alone) never run beside another instance: read from the run's
/// progress lines (`running` when an instance starts computing, `done in` when it is recorded).
#[test]
fn progressive_with_jobs_matches_the_serial_run_and_fine_tunes_run_alone() {
    let p = repo().join("pipelines/progressive.toml");
    let p = p.to_str().unwrap();
    let parallel = Sandbox::real();
    let out = parallel.run(&["run", p, "--profile", "tiny", "--jobs", "3"]).expect(0).stderr();
    let serial = Sandbox::real();
    serial.run(&["run", p, "--profile", "tiny"]).expect(0);
    let session = "progressive-sparsity.tiny.json";
    let (sp, ss) = (parallel.session(session), serial.session(session));
    let timing = ["tokens_per_second", "seconds", "peak_rss_mb"];
    let strip = |m: &serde_json::Value| {
        let mut m = m.as_object().unwrap().clone();
        timing.iter().for_each(|k| {
            m.remove(*k);
        });
        m
    };
    for (name, x) in sp["stages"].as_object().unwrap() {
        let y = &ss["stages"][name];
        assert_eq!(x["key"], y["key"], "{name}");
        assert_eq!(strip(&x["metrics"]), strip(&y["metrics"]), "{name}: --jobs 3 changed its numbers");
    }
    let mut running: Vec<String> = Vec::new();
    let mut most = 0;
    for line in out.lines() {
        let Some((who, what)) = line.split_once("): ") else { continue };
        if what == "running" {
            let a_finetune_runs = running.iter().any(|r| r.ends_with("(finetune"));
            let a_finetune_joins_others = who.ends_with("(finetune") && !running.is_empty();
            assert!(!a_finetune_runs, "`{who})` started beside a fine-tune: {running:?}:\n{out}");
            assert!(!a_finetune_joins_others, "the fine-tune `{who})` started beside {running:?}:\n{out}");
            running.push(who.to_string());
            most = most.max(running.len());
        } else if what.starts_with("done in") {
            running.retain(|r| r != who);
        }
    }
    assert!(most >= 2, "nothing ran in parallel:\n{out}");
}

/// The tiny progressive pipeline through Slurm (one sbatch job per instance, the shipped binary
/// in each) gives the session of a local run: same keys, same numbers.
#[test]
fn progressive_through_slurm_matches_the_local_run() {
    let Some(_cluster) = crate::support::slurm_cluster() else { return };
    let p = repo().join("pipelines/progressive.toml");
    let p = p.to_str().unwrap();
    let slurm = Sandbox::real();
    let out = slurm.run(&["run", p, "--profile", "tiny", "--executor", "slurm", "--poll-seconds", "0.5"]).expect(0);
    assert!(out.stdout().contains("59 instances: 59 computed"), "{}", out.stdout());
    let local = Sandbox::real();
    local.run(&["run", p, "--profile", "tiny", "-q"]).expect(0);
    let session = "progressive-sparsity.tiny.json";
    let (s, l) = (slurm.session(session), local.session(session));
    assert_eq!(s["status"], "complete");
    let timing = ["tokens_per_second", "seconds", "peak_rss_mb"];
    let strip = |m: &serde_json::Value| {
        let mut m = m.as_object().unwrap().clone();
        timing.iter().for_each(|k| {
            m.remove(*k);
        });
        m
    };
    assert_eq!(s["stages"].as_object().unwrap().len(), 59);
    for (name, x) in s["stages"].as_object().unwrap() {
        let y = &l["stages"][name];
        assert_eq!(x["key"], y["key"], "{name}");
        assert_eq!(x["status"], "done", "{name}");
        assert!(x["job"]["id"].as_str().is_some_and(|id| !id.is_empty()), "{name} ran as a job");
        assert_eq!(strip(&x["metrics"]), strip(&y["metrics"]), "{name}: Slurm changed its numbers");
    }
    // The report reads a Slurm session as it reads a local one.
    let report = slurm.run(&["report", "--no-plots", &format!("sessions/{}", today_dir(&slurm, session))]).expect(0);
    assert!(report.stdout().contains("sparsity"), "{}", report.stdout());
}

fn today_dir(sb: &Sandbox, file: &str) -> String {
    let day = std::fs::read_dir(sb.path().join("sessions")).unwrap().next().unwrap().unwrap().file_name();
    format!("{}/{file}", day.to_string_lossy())
}

/// downstream.toml under `tiny`: every model of the chain scored on synthetic:facts-mc, the
/// progressive table with a task column, the tasks table; its shared part has progressive.toml's
/// keys (progressive finds it cached).
#[test]
fn downstream_tiny_scores_every_level_and_shares_the_progressive_chain() {
    let (sb, s) = run_tiny("pipelines/downstream.toml", "downstream.tiny.json");
    let st = &s["stages"];
    for name in ["base-tasks[task=synthetic:facts-mc].score", "tasks[sparsity=0.5,task=synthetic:facts-mc].score"] {
        let m = &st[name]["metrics"];
        assert_eq!(m["task"], "synthetic:facts-mc", "{name}");
        assert_eq!(m["items"], 45, "{name}: one question per fact");
        let acc = f(&m["acc"]);
        assert!((0.0..=1.0).contains(&acc) && f(&m["acc_stderr"]) > 0.0, "{name}: {m}");
        assert_eq!(st[name]["roles"][0], "tasks");
    }
    let tables = s["tables"].as_array().unwrap();
    let main = &tables[0];
    assert_eq!(main["id"], "progressive#1");
    assert!(columns(main).contains(&"synthetic:facts-mc acc (%)"), "{main}");
    assert!(main["rows"].as_array().unwrap().iter().all(|r| r.as_array().unwrap().last().unwrap() != "—"), "{main}");
    let tasks = tables.iter().find(|t| t["id"] == "tasks").expect("a tasks table");
    assert_eq!(tasks["rows"].as_array().unwrap().len(), 9, "the base and eight levels: {tasks}");
    let prog = repo().join("pipelines/progressive.toml");
    let plan = sb.run(&["plan", prog.to_str().unwrap(), "--profile", "tiny", "--format", "json"]).expect(0).json();
    for i in plan["instances"].as_array().unwrap() {
        let name = i["name"].as_str().unwrap();
        let shared = ["base", "baseline"].contains(&name)
            || (name.starts_with("level[") && [".pruned", ".tuned", ".after"].iter().any(|s| name.ends_with(s)));
        assert_eq!(i["status"], if shared { "cached" } else { "to run" }, "{name}");
    }
}

/// A task that does not exist, or a hub dataset that is not there offline: clear errors.
#[test]
fn eval_tasks_bad_input_is_located_and_explained() {
    let sb = Sandbox::real();
    let p = sb.write(
        "t.toml",
        "[stages.base]\nkind = \"load\"\nmodel = \"builtin:tiny-bitnet\"\n\
         [stages.score]\nkind = \"eval-tasks\"\ninput = \"base\"\ntask = \"arc-easy\"\n",
    );
    let err = sb.run(&["validate", p.to_str().unwrap()]).expect(2).stderr();
    assert!(err.contains("t.toml:") && err.contains("did you mean `arc_easy`?"), "{err}");
    let p = sb.write(
        "j.toml",
        "[stages.base]\nkind = \"load\"\nmodel = \"builtin:tiny-bitnet\"\n\
         [stages.score]\nkind = \"eval-tasks\"\ninput = \"base\"\ntask = { jsonl = \"missing.jsonl\" }\n",
    );
    let err = sb.run(&["validate", p.to_str().unwrap()]).expect(2).stderr();
    assert!(err.contains("missing.jsonl"), "{err}");
    let p = sb.write(
        "h.toml",
        "[stages.base]\nkind = \"load\"\nmodel = \"builtin:tiny-bitnet\"\n\
         [stages.score]\nkind = \"eval-tasks\"\ninput = \"base\"\ntask = \"piqa\"\n",
    );
    let hub = sb.path().join("empty-hub");
    let out =
        sb.cmd(&["run", p.to_str().unwrap()]).env("HF_HUB_OFFLINE", "1").env("HF_HUB_CACHE", &hub).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("baber/piqa") && err.contains("piqa_validation.parquet") && err.contains("142f6d73"), "{err}");
}

/// holographic.toml under `tiny`: every layer swapped at each (R, w), perplexity before and after
/// an adaptation that trains only the new tensors, generations, and forward timings of the full
/// and swapped models.
#[test]
fn holographic_tiny_swaps_adapts_and_times() {
    let (_sb, s) = run_tiny("pipelines/holographic.toml", "holographic-attention.tiny.json");
    let st = &s["stages"];
    let full = f(&st["full"]["metrics"]["ppl"]);
    assert!(full.is_finite() && full > 1.0);
    // tiny-bitnet: 4 layers, 4 heads over 2 kv heads of 32 dims; boundary_dim defaults to 32.
    let per_layer = 2 * 32 * 32 + 2 * 4;
    for (r, w) in [(2, 4), (2, 8), (4, 4), (4, 8)] {
        let point = format!("holo[regions={r},window={w}]");
        let swap = &st[format!("{point}.swapped")]["metrics"];
        assert_eq!(swap["layers"], serde_json::json!([0, 1, 2, 3]), "{point}");
        assert_eq!(swap["reach"], (r + 1) * w, "{point}");
        assert_eq!(swap["new_parameters"], 4 * per_layer, "{point}");
        assert_eq!(swap["attention"], format!("holographic w={w} R={r}"));
        let before = f(&st[format!("{point}.before")]["metrics"]["ppl"]);
        assert!(before.is_finite() && before != full, "{point}: {before} vs full {full}");
        let tuned = &st[format!("{point}.adapted")]["metrics"];
        assert_eq!(tuned["trainable"], 4 * per_layer, "{point}: only the holographic tensors train");
        assert!(f(&st[format!("{point}.after")]["metrics"]["ppl"]).is_finite());
        check_text(&st[format!("{point}.text")]["metrics"]);
        let speed = &st[format!("{point}.speed")]["metrics"];
        assert_eq!(speed["attention"], format!("holographic w={w} R={r}"));
    }
    let speed = &st["full-speed"]["metrics"];
    assert_eq!(speed["attention"], "full");
    let rows = speed["lengths"].as_array().unwrap();
    assert_eq!(rows.iter().map(|r| r["length"].as_u64().unwrap()).collect::<Vec<_>>(), [64, 128, 256]);
    for r in rows {
        assert!(f(&r["tokens_per_second"]) > 0.0 && f(&r["seconds"]) > 0.0, "{r}");
        assert!(r["peak_memory_mb"].is_null() || f(&r["peak_memory_mb"]) > 0.0, "{r}");
        assert_eq!(r["beyond_context"], false, "tiny-bitnet has 256 positions");
    }
    let tables = s["tables"].as_array().unwrap();
    assert_eq!(tables[0]["id"], "attention#1", "the attention table is the main table");
    assert_eq!(tables[0]["rows"].as_array().unwrap().len(), 5, "full and four swaps");
    assert!(tables.iter().any(|t| t["id"] == "speed"));
}

/// swap-attention's mistakes: an odd boundary dimension is located in the file; a layer the
/// model lacks, swapping a swapped model, and training holographic tensors a model lacks are
/// clear errors at run time.
#[test]
fn swap_attention_bad_input_is_located_and_explained() {
    let sb = Sandbox::real();
    let head = "[stages.base]\nkind = \"load\"\nmodel = \"builtin:tiny-bitnet\"\n";
    let p = sb.write(
        "odd.toml",
        &format!("{head}[stages.s]\nkind = \"swap-attention\"\ninput = \"base\"\nwindow = 4\nregions = 2\nboundary_dim = 5\n"),
    );
    let err = sb.run(&["validate", p.to_str().unwrap()]).expect(2).stderr();
    assert!(err.contains("odd.toml:9:16") && err.contains("boundary_dim: 5 is odd"), "{err}");
    let p = sb.write(
        "layer.toml",
        &format!(
            "{head}[stages.s]\nkind = \"swap-attention\"\ninput = \"base\"\nwindow = 4\nregions = 2\nlayers = [1, 9]\n"
        ),
    );
    let err = sb.run(&["run", p.to_str().unwrap()]).expect(1).stderr();
    assert!(err.contains("layer 9 does not exist: the model has layers 0..3"), "{err}");
    let p = sb.write(
        "twice.toml",
        &format!(
            "{head}[stages.s]\nkind = \"swap-attention\"\ninput = \"base\"\nwindow = 4\nregions = 2\n\
             [stages.t]\nkind = \"swap-attention\"\ninput = \"s\"\nwindow = 8\nregions = 2\n"
        ),
    );
    let err = sb.run(&["run", p.to_str().unwrap()]).expect(1).stderr();
    assert!(err.contains("already has holographic attention in layers [0, 1, 2, 3]"), "{err}");
    let p = sb.write(
        "train.toml",
        &format!(
            "{head}[stages.t]\nkind = \"finetune\"\ninput = \"base\"\ndata = \"synthetic:facts:train\"\n\
             steps = 1\nbatch = 1\nseq_len = 16\ntrainable = \"holographic\"\n"
        ),
    );
    let err = sb.run(&["run", p.to_str().unwrap()]).expect(1).stderr();
    assert!(err.contains("no trainable parameters") && err.contains("holographic"), "{err}");
}

/// criticality-regularised.toml under `tiny`: the regularised fine-tunes log their branching
/// ratios and end nearer criticality the larger λ; the combined chain is holographic, pruned and
/// regularised; the criticality table compares every perturbed model.
#[test]
fn criticality_regularised_tiny_pulls_towards_criticality() {
    let (_sb, s) = run_tiny("pipelines/criticality-regularised.toml", "criticality-regularised.tiny.json");
    let st = &s["stages"];
    let br = |name: &str| f(&st[name]["metrics"]["branching"]["mean_without_first"]);
    for level in ["0.1", "0.3"] {
        assert!(st[format!("level[sparsity={level}].tuned")]["metrics"].get("criticality").is_none());
        for lambda in ["0_1", "1", "10"] {
            let c = &st[format!("lambda-{lambda}[sparsity={level}].tuned")]["metrics"]["criticality"];
            assert_eq!(c["layers"], serde_json::json!([1, 2, 3]));
            assert_eq!(c["branching"].as_array().unwrap().len(), 8, "one entry per step");
        }
        let (plain, strong) =
            (br(&format!("level[sparsity={level}].growth")), br(&format!("lambda-10[sparsity={level}].growth")));
        assert!(strong < plain, "level {level}: λ = 10 left the mean BR at {strong}, unregularised {plain}");
        let combined = &st[format!("combined[sparsity={level}].tuned")]["metrics"];
        assert_eq!(combined["criticality"]["lambda"], 1.0);
        assert!(f(&st[format!("combined[sparsity={level}].after")]["metrics"]["ppl"]).is_finite());
    }
    assert_eq!(st["holo"]["metrics"]["attention"], "holographic w=8 R=2");
    let tables = s["tables"].as_array().unwrap();
    assert_eq!(tables[0]["id"], "progressive#1", "pruning chains, not the attention table, lead");
    let crit = tables.iter().find(|t| t["id"] == "criticality").expect("a criticality table");
    let rows = crit["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1 + 5 * 2, "the base and every level of every chain");
    assert!(rows.iter().any(|r| r[0].as_str().unwrap().contains("holographic w=8 R=2")), "{crit}");
}

/// equilibrium.toml under `tiny`: every method learns (the loss falls, the held-out perplexity
/// beats the unigram bar), EP's update agrees with the true gradient at small β, and the three
/// methods end close together (same initialisation and batches).
#[test]
fn equilibrium_tiny_trains_every_method_and_ep_follows_the_true_gradient() {
    let (_sb, s) = run_tiny("pipelines/equilibrium.toml", "equilibrium.tiny.json");
    let st = &s["stages"];
    for data in ["facts", "wiki"] {
        let mut ppls = Vec::new();
        for method in ["ep", "ep-symmetric", "backprop"] {
            let name = format!("{data}[method={method}].train");
            let m = &st[&name]["metrics"];
            assert_eq!(m["method"], method);
            let loss: Vec<f64> = m["loss"].as_array().unwrap().iter().map(|p| f(&p[1])).collect();
            assert_eq!(loss.len(), 200, "{name}: one loss per step");
            let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
            let (first, last) = (mean(&loss[..10]), mean(&loss[loss.len() - 20..]));
            assert!(last < first - 1.0, "{name}: the loss fell from {first} to only {last}");
            assert!((f(&m["final_loss"]) - mean(&loss[loss.len() - 20..])).abs() < 1e-9, "{name}: the last 10%");
            let ppl = f(&m["ppl"]);
            assert!(ppl < f(&m["unigram_ppl"]) && ppl < 256.0, "{name}: ppl {ppl} vs unigram {}", m["unigram_ppl"]);
            ppls.push(ppl);
            let cosines = m["cosine"].as_array().unwrap();
            if method == "backprop" {
                assert!(cosines.is_empty() && m["cosine_mean"].is_null(), "{name}");
            } else {
                assert_eq!(cosines.len(), 20, "{name}: every 10 steps");
                for c in cosines {
                    let (cos, ratio) = (f(&c["cosine"]), f(&c["norm_ratio"]));
                    assert!((-1.0..=1.0).contains(&cos), "{name}: {c}");
                    // β = 0.01: the estimate is the gradient up to O(β) (O(β²) symmetric).
                    assert!(cos > 0.99 && (ratio - 1.0).abs() < 0.05, "{name}: {c}");
                }
                assert!(f(&m["cosine_mean"]) > 0.995, "{name}");
            }
            let free = &m["relaxation"]["free"];
            assert_eq!(free["relaxations"], 200 * 8, "{name}: one free phase per example");
            assert!(f(&free["unconverged"]) < 0.05 * 1600.0, "{name}: {free}");
            assert_eq!(m["adjoint"]["failed"], 0, "{name}");
        }
        let (lo, hi) = ppls.iter().fold((f64::MAX, 0f64), |(a, b), &p| (a.min(p), b.max(p)));
        assert!(hi / lo < 1.1, "{data}: the methods end apart: {ppls:?}");
    }
    let table = s["tables"].as_array().unwrap().iter().find(|t| t["id"] == "equilibrium").expect("the table");
    assert_eq!(table["rows"].as_array().unwrap().len(), 6);
    assert_eq!(s["tables"][0]["id"], "equilibrium", "the main table");
}
