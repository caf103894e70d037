//! `finetune`: pruned weights stay exactly zero (or, as the notebooks, grow back with the regrowth
//! reported), an interrupted run resumes to the bit-identical result (f32 masters, and bf16 state
//! with chunk batches), a chained fine-tune continues the batch stream, a diverging run stops with
//! a clear error, and the progressive pipeline's keys behave.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};

use crate::support::{has_checkpoint, plan_keys, repo, wait_until, Sandbox};

const MODEL: &str = r#"{ random = { vocab_size = 300, hidden_size = 32, intermediate_size = 88, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2 }, seed = 1, tokenizer = "synthetic:facts:train" }"#;

fn pipeline(finetune: &str) -> String {
    format!(
        "[pipeline]\nname = \"ft\"\n[stages.base]\nkind = \"load\"\nmodel = {MODEL}\n\
         [stages.pruned]\nkind = \"prune\"\ninput = \"base\"\nsparsity = 0.4\n\
         [stages.tuned]\nkind = \"finetune\"\ninput = \"pruned\"\ndata = \"synthetic:facts:train\"\n\
         batch = 4\nmicro_batch = 2\nseq_len = 16\ntrainable = \"all\"\n{finetune}\n"
    )
}

fn entry(sb: &Sandbox, name: &str) -> PathBuf {
    let s = sb.session("ft.json");
    let key = s["stages"][name]["key"].as_str().unwrap().to_string();
    sb.path().join("cache").join(&key[..2]).join(key)
}

fn tensors(path: PathBuf) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap().into_iter().collect()
}

fn masks(path: PathBuf) -> rpt_flow::stages::mask::Masks {
    rpt_flow::stages::mask::read(&path).unwrap().expect("a mask file")
}

fn as_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn pruned_weights_never_move_and_the_rest_do() {
    let sb = Sandbox::real();
    let p = sb.write("ft.toml", &pipeline("steps = 6\nlr = 0.05\nweight_decay = 0.1"));
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    let before = tensors(entry(&sb, "pruned").join("model.safetensors"));
    let after = tensors(entry(&sb, "tuned").join("model.safetensors"));
    let mask = masks(entry(&sb, "tuned").join("mask.safetensors"));
    assert!(!mask.is_empty(), "the mask travels with the fine-tuned model");
    use std::os::unix::fs::MetadataExt as _;
    let inode = |stage: &str| std::fs::metadata(entry(&sb, stage).join("mask.safetensors")).unwrap().ino();
    assert_eq!(inode("tuned"), inode("pruned"), "the unchanged mask is shared (hard link), not stored twice");
    let (mut moved_kept, mut kept) = (0usize, 0usize);
    for (name, m) in &mask {
        let m = m.to_keep();
        let (b, a) = (as_f32(&before[name]), as_f32(&after[name]));
        for i in 0..m.len() {
            if m[i] == 0 {
                assert_eq!(a[i], 0.0, "{name}[{i}] was pruned and moved to {}", a[i]);
            } else {
                kept += 1;
                moved_kept += (a[i] != b[i]) as usize;
            }
        }
    }
    assert!(moved_kept > kept / 2, "training changed only {moved_kept} of {kept} kept weights");
    let s = sb.session("ft.json");
    let loss = s["stages"]["tuned"]["metrics"]["loss"].as_array().unwrap();
    assert_eq!(loss.len(), 6);
    assert_eq!(loss[0][0], 1);
}

fn weights_hash(sb: &Sandbox) -> String {
    blake3::hash(&std::fs::read(entry(sb, "tuned").join("model.safetensors")).unwrap()).to_hex().to_string()
}

#[test]
fn a_killed_finetune_resumes_to_the_identical_result() {
    resumes_to_the_identical_result(&pipeline("steps = 40\ncheckpoint_every = 3\nlr = 0.01"));
}

/// Runs `body` once through, and once killed after its first checkpoint then run again: the
/// final weights and the loss curves must be identical. Returns the resumed sandbox.
fn resumes_to_the_identical_result(body: &str) -> Sandbox {
    let clean = Sandbox::real();
    let p = clean.write("ft.toml", body);
    clean.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);

    let sb = Sandbox::real();
    let p = sb.write("ft.toml", body);
    let mut child = sb.spawn(&["run", p.to_str().unwrap(), "-q"], &[]);
    let found = wait_until(Duration::from_secs(120), || has_checkpoint(&sb.path().join("cache")));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(found, "a checkpoint was written before the kill");
    let again = sb.run(&["run", p.to_str().unwrap()]).expect(0);
    assert!(again.stderr().contains("finetune: resumed at step"), "{}", again.stderr());
    assert_eq!(weights_hash(&sb), weights_hash(&clean), "final weights differ after resuming");
    let loss = |s: &Sandbox| s.session("ft.json")["stages"]["tuned"]["metrics"]["loss"].clone();
    assert_eq!(loss(&sb), loss(&clean), "loss curves differ after resuming");
    sb
}

#[test]
fn a_diverging_finetune_stops_with_the_step_and_keeps_the_cache_consistent() {
    let sb = Sandbox::real();
    let p = sb.write("ft.toml", &pipeline("steps = 30\ncheckpoint_every = 1\nlr = 1e30\nschedule = \"constant\""));
    let r = sb.run(&["run", p.to_str().unwrap()]).expect(1);
    let err = r.stderr();
    assert!(err.contains("non-finite loss"), "{err}");
    assert!(err.contains("at step "), "{err}");
    assert!(err.contains("the last good state"), "{err}");
    assert!(!entry(&sb, "tuned").exists(), "no entry for a failed fine-tune");
    sb.run(&["cache", "verify"]).expect(0);
}

#[test]
fn progressive_keys_extend_and_change_as_a_researcher_expects() {
    let sb = Sandbox::real();
    let p = repo().join("pipelines/progressive.toml");
    let p = p.to_str().unwrap();
    let base = plan_keys(&sb, &[p, "--profile", "tiny"]);
    let extended = plan_keys(
        &sb,
        &[
            p,
            "--profile",
            "tiny",
            "--set",
            "sweeps.level.over.sparsity=[0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.40, 0.50, 0.60]",
        ],
    );
    let new: Vec<&String> = extended.iter().filter(|e| !base.contains(e)).map(|(n, _)| n).collect();
    assert_eq!(new.len(), 5, "only the 60% level is new: {new:?}");
    assert!(new.iter().all(|n| n.starts_with("level[sparsity=0.6]")), "{new:?}");

    let steps = plan_keys(&sb, &[p, "--profile", "tiny", "--set", "defaults.finetune.steps=7"]);
    let changed: Vec<&String> = base.iter().zip(&steps).filter(|(a, b)| a.1 != b.1).map(|(a, _)| &a.0).collect();
    let unchanged: Vec<&String> = base.iter().zip(&steps).filter(|(a, b)| a.1 == b.1).map(|(a, _)| &a.0).collect();
    for n in ["base", "baseline", "baseline-text", "level[sparsity=0.05].pruned", "level[sparsity=0.05].before"] {
        assert!(unchanged.iter().any(|u| *u == n), "{n} must keep its key; unchanged: {unchanged:?}");
    }
    assert!(changed.iter().any(|c| *c == "control[finetunes=1].tuned"), "the control chain changes too");
    assert!(changed.iter().any(|c| *c == "level[sparsity=0.05].tuned"));
    assert!(changed.iter().any(|c| *c == "level[sparsity=0.5].pruned"), "every later level changes");
}

/// The notebook's fine-tune: masks not re-applied, every parameter (the embedding too), bf16
/// optimizer state, chunks drawn with replacement.
const NOTEBOOK: &str = "masks = \"ignore\"\noptimizer_precision = \"model\"\nbatches = \"chunks\"\ngrad_clip = 1.0\n";

#[test]
fn with_masks_ignored_pruned_weights_grow_back_and_the_regrowth_is_reported() {
    let sb = Sandbox::real();
    let p = sb.write("ft.toml", &pipeline(&format!("steps = 4\nlr = 0.01\n{NOTEBOOK}")));
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    let m = sb.session("ft.json")["stages"]["tuned"]["metrics"].clone();
    let pruned_mask = masks(entry(&sb, "pruned").join("mask.safetensors"));
    let after = tensors(entry(&sb, "tuned").join("model.safetensors"));
    assert!(!entry(&sb, "tuned").join("mask.safetensors").exists(), "no mask: the zeros are not kept");
    let (mut pruned, mut regrown) = (0u64, 0u64);
    for (name, mk) in &pruned_mask {
        let mk = mk.to_keep();
        for (k, w) in mk.iter().zip(as_f32(&after[name])) {
            if *k == 0 {
                pruned += 1;
                regrown += (w != 0.0) as u64;
            }
        }
    }
    assert!(regrown > pruned / 2, "most pruned weights got gradients and moved: {regrown} of {pruned}");
    assert_eq!(m["pruned_positions"], pruned);
    assert_eq!(m["regrown"], regrown, "the metric counts what the weights show");
    assert!(m["sparsity_after"].as_f64().unwrap() < m["sparsity_before"].as_f64().unwrap());
    assert_eq!(m["batches"], "chunks");
    assert_eq!(m["masks"], "ignore");
}

#[test]
fn a_killed_notebook_finetune_in_bf16_resumes_to_the_identical_result() {
    let body = pipeline(&format!("steps = 30\ncheckpoint_every = 3\nlr = 0.01\n{NOTEBOOK}"))
        .replace("[stages.pruned]", "dtype = \"bf16\"\n[stages.pruned]");
    let sb = resumes_to_the_identical_result(&body);
    let w = tensors(entry(&sb, "tuned").join("model.safetensors"));
    assert!(w.values().all(|t| t.dtype() == DType::BF16), "the model stays bf16");
}

#[test]
fn a_chained_finetune_continues_the_batch_stream_unless_told_to_restart() {
    let sb = Sandbox::real();
    let two = |extra: &str| {
        format!(
            "{}[stages.again]\nkind = \"finetune\"\ninput = \"tuned\"\ndata = \"synthetic:facts:train\"\n\
             batch = 4\nseq_len = 16\nsteps = 3\n{extra}\n",
            pipeline("steps = 5\nlr = 0.01")
        )
    };
    let p = sb.write("ft.toml", &two(""));
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    let m = |n: &str| sb.session("ft.json")["stages"][n]["metrics"].clone();
    assert_eq!(m("tuned")["first_batch"], 0);
    assert_eq!(m("again")["first_batch"], 5, "after the 5 steps of its input's fine-tune");
    let continued = m("again")["loss"].clone();
    let p = sb.write("ft.toml", &two("stream = \"restart\""));
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    assert_eq!(m("again")["first_batch"], 0);
    assert_ne!(m("again")["loss"], continued, "other batches, another loss curve");
}

/// The criticality regulariser: λ = 0 measures the branching ratios and trains bit-identically to
/// a fine-tune without it; a large λ pulls the mean ratio towards the target; a killed
/// regularised fine-tune resumes to the same weights and the same logged ratios.
#[test]
fn the_criticality_regulariser_measures_at_zero_and_pulls_towards_the_target() {
    let sb = Sandbox::real();
    let body = "[pipeline]\nname = \"ft\"\n[stages.base]\nkind = \"load\"\nmodel = \"builtin:tiny-bitnet\"\n";
    let tune = |name: &str, extra: &str| {
        format!(
            "[stages.{name}]\nkind = \"finetune\"\ninput = \"base\"\ndata = \"synthetic:facts:train\"\n\
             steps = 10\nbatch = 4\nmicro_batch = 2\nseq_len = 32\nlr = 3e-3\n{extra}\n"
        )
    };
    let text = [
        body.to_string(),
        tune("plain", ""),
        tune("zero", "criticality_lambda = 0"),
        tune("pulled", "criticality_lambda = 10\ncriticality_target = 1.0"),
    ]
    .concat();
    let p = sb.write("ft.toml", &text);
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    let hash = |stage: &str| {
        blake3::hash(&std::fs::read(entry(&sb, stage).join("model.safetensors")).unwrap()).to_hex().to_string()
    };
    assert_eq!(hash("zero"), hash("plain"), "λ = 0 must train exactly as without the regulariser");
    let s = sb.session("ft.json");
    let m = |stage: &str| s["stages"][stage]["metrics"].clone();
    assert_eq!(m("zero")["loss"], m("plain")["loss"]);
    assert!(m("plain").get("criticality").is_none());
    let zero = &m("zero")["criticality"];
    assert_eq!(zero["layers"], serde_json::json!([1, 2, 3]), "all but the first layer by default");
    assert_eq!(zero["branching"].as_array().unwrap().len(), 10, "one entry per step");
    assert_eq!(zero["branching"][0][1].as_array().unwrap().len(), 3);
    let pulled = &m("pulled")["criticality"];
    assert_eq!(pulled["branching"][0], zero["branching"][0], "the same first forward");
    let dist = |c: &serde_json::Value| (c["final_mean_branching"].as_f64().unwrap() - 1.0).abs();
    assert!(
        dist(pulled) < 0.6 * dist(zero),
        "λ = 10 left the mean BR at {} (λ = 0: {})",
        pulled["final_mean_branching"],
        zero["final_mean_branching"]
    );

    // Resuming a regularised run gives the uninterrupted run's weights and logged ratios.
    let body =
        pipeline("steps = 30\ncheckpoint_every = 3\nlr = 0.01\ncriticality_lambda = 1\ncriticality_layers = \"all\"");
    let sb = resumes_to_the_identical_result(&body);
    let c = &sb.session("ft.json")["stages"]["tuned"]["metrics"]["criticality"];
    let steps: Vec<u64> = c["branching"].as_array().unwrap().iter().map(|b| b[0].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=30).collect::<Vec<u64>>(), "every step logged once across the kill");

    // The regulariser's settings without its weight are refused where they are written.
    let sb = Sandbox::real();
    let p = sb.write("bad.toml", &pipeline("steps = 2\ncriticality_target = 1.2"));
    let err = sb.run(&["validate", p.to_str().unwrap()]).expect(2).stderr();
    assert!(err.contains("bad.toml:") && err.contains("without criticality_lambda"), "{err}");
    let p = sb.write("bad2.toml", &pipeline("steps = 2\ncriticality_lambda = 1\ncriticality_layers = [0, 7]"));
    let err = sb.run(&["run", p.to_str().unwrap()]).expect(1).stderr();
    assert!(err.contains("layer 7 does not exist (the model has 2 layers)"), "{err}");
}
