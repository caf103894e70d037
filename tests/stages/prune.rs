//! `prune`: exact sparsity, nested levels, per-row and per-tensor scopes, masks that survive a
//! save/load round trip.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use rpt_flow::model::{LoadOptions, Model};

use crate::support::Sandbox;

const MODEL: &str = r#"{ random = { vocab_size = 300, hidden_size = 32, intermediate_size = 88, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2 }, seed = 3, tokenizer = "synthetic:facts:train" }"#;

fn pipeline(body: &str) -> String {
    format!("[pipeline]\nname = \"p\"\n[stages.base]\nkind = \"load\"\nmodel = {MODEL}\n{body}")
}

/// The entry directory of an instance, from the session.
fn entry(sb: &Sandbox, name: &str) -> PathBuf {
    let s = sb.session("p.json");
    let key = s["stages"][name]["key"].as_str().unwrap().to_string();
    sb.path().join("cache").join(&key[..2]).join(key)
}

fn tensors(path: PathBuf) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap().into_iter().collect()
}

fn zeros_f32(t: &Tensor) -> Vec<bool> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| *x == 0.0).collect()
}

fn projections(map: &BTreeMap<String, Tensor>) -> Vec<(&String, &Tensor)> {
    map.iter().filter(|(k, _)| k.ends_with("_proj.weight")).collect()
}

#[test]
fn global_levels_are_exact_nested_and_masks_round_trip() {
    let sb = Sandbox::real();
    let p = sb.write(
        "p.toml",
        &pipeline(
            "[stages.p10]\nkind = \"prune\"\ninput = \"base\"\nsparsity = 0.1\n\
             [stages.p20]\nkind = \"prune\"\ninput = \"p10\"\nsparsity = 0.2\n\
             [stages.ppl]\nkind = \"eval-ppl\"\ninput = \"p20\"\ndata = \"synthetic:facts:test\"\nseq_len = 32\nmax_windows = 2\n",
        ),
    );
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    let (w10, w20) =
        (tensors(entry(&sb, "p10").join("model.safetensors")), tensors(entry(&sb, "p20").join("model.safetensors")));
    let m20 = rpt_flow::stages::mask::read(&entry(&sb, "p20").join("mask.safetensors")).unwrap().unwrap();
    let total: usize = projections(&w10).iter().map(|(_, t)| t.elem_count()).sum();
    for (level, weights, sparsity) in [("p10", &w10, 0.1), ("p20", &w20, 0.2)] {
        let zeros: usize = projections(weights).iter().map(|(_, t)| zeros_f32(t).iter().filter(|z| **z).count()).sum();
        assert_eq!(zeros, (sparsity * total as f64).round() as usize, "{level}: exact to one element");
    }
    for (name, t10) in projections(&w10) {
        let (z10, z20) = (zeros_f32(t10), zeros_f32(&w20[name]));
        assert!(z10.iter().zip(&z20).all(|(a, b)| !a || *b), "{name}: every zero of 10% is a zero of 20%");
        let mask = m20[name].to_keep();
        assert!(mask.iter().zip(&z20).all(|(m, z)| (*m == 0) == *z), "{name}: mask = zeros");
    }
    // The pruned model loads back (through the public loader) with the same zeros.
    let model = Model::from_dir(&entry(&sb, "p20"), &LoadOptions::default()).unwrap();
    for (name, t) in model.projections().unwrap() {
        assert_eq!(zeros_f32(&t), zeros_f32(&w20[&name]), "{name} after load");
    }
    let s = sb.session("p.json");
    let m = &s["stages"]["p20"]["metrics"];
    assert_eq!(m["already_pruned"].as_u64().unwrap() as usize, (0.1 * total as f64).round() as usize);
    assert!(m["ternary_zero_before"].as_f64().unwrap() > 0.0 && m["ternary_zero_after"].is_number());
}

#[test]
fn per_row_and_per_tensor_scopes_hit_their_own_targets() {
    let sb = Sandbox::real();
    let p = sb.write(
        "p.toml",
        &pipeline(
            "[stages.rows]\nkind = \"prune\"\ninput = \"base\"\nsparsity = 0.25\nscope = \"per-row\"\n\
             [stages.tensors]\nkind = \"prune\"\ninput = \"base\"\nsparsity = 0.3\nscope = \"per-tensor\"\ntargets = [\"*.mlp.*\"]\n",
        ),
    );
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    let rows = tensors(entry(&sb, "rows").join("model.safetensors"));
    for (name, t) in projections(&rows) {
        let (r, c) = t.dims2().unwrap();
        let z = zeros_f32(t);
        for i in 0..r {
            let n = z[i * c..(i + 1) * c].iter().filter(|x| **x).count();
            assert_eq!(n, (0.25 * c as f64).round() as usize, "{name} row {i}");
        }
    }
    let tens = tensors(entry(&sb, "tensors").join("model.safetensors"));
    for (name, t) in projections(&tens) {
        let n = zeros_f32(t).iter().filter(|x| **x).count();
        if name.contains(".mlp.") {
            assert_eq!(n, (0.3 * t.elem_count() as f64).round() as usize, "{name}");
        } else {
            assert_eq!(n, 0, "{name} is not targeted");
        }
    }
}

#[test]
fn bad_targets_and_packed_models_are_clear_errors() {
    let sb = Sandbox::real();
    let p = sb.write(
        "p.toml",
        &pipeline("[stages.x]\nkind = \"prune\"\ninput = \"base\"\nsparsity = 0.1\ntargets = [\"*.lm_head.*\"]\n"),
    );
    let r = sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(1);
    assert!(r.stderr().contains("no projection matches targets"), "{}", r.stderr());
    let bad = sb.write("q.toml", &pipeline("[stages.x]\nkind = \"prune\"\ninput = \"base\"\nsparsity = 1.5\n"));
    let r = sb.run(&["validate", bad.to_str().unwrap()]).expect(2);
    assert!(r.stderr().contains("1.5 is out of range: expected a number in [0, 1]"), "{}", r.stderr());
}
