//! `finetune`: pruned weights stay exactly zero, an interrupted run resumes to the bit-identical
//! result, a diverging run stops with a clear error, and the progressive pipeline's keys behave.

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
    let mask = tensors(entry(&sb, "tuned").join("mask.safetensors"));
    assert!(!mask.is_empty(), "the mask travels with the fine-tuned model");
    let (mut moved_kept, mut kept) = (0usize, 0usize);
    for (name, m) in &mask {
        let m: Vec<u8> = m.flatten_all().unwrap().to_vec1().unwrap();
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
    let body = pipeline("steps = 40\ncheckpoint_every = 3\nlr = 0.01");
    let clean = Sandbox::real();
    let p = clean.write("ft.toml", &body);
    clean.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);

    let sb = Sandbox::real();
    let p = sb.write("ft.toml", &body);
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
    assert!(changed.iter().any(|c| *c == "control"), "the control fine-tune changes too");
    assert!(changed.iter().any(|c| *c == "level[sparsity=0.05].tuned"));
    assert!(changed.iter().any(|c| *c == "level[sparsity=0.5].pruned"), "every later level changes");
}
