//! Holographic attention (src/model/holographic.rs): causal, exact when one region covers the
//! sequence, gradients to every new tensor (finite differences), the cached path, save/load.

use candle_core::{DType, Device, Tensor};
use rpt_flow::model::{causal_lm_loss, Arch, HoloConfig, KvCache, LoadOptions, Model, ModelConfig};

/// A random model (2 layers, 4 heads over 2 kv heads, head_dim 8): llama unquantised, or bitnet.
fn random(arch: Arch, init_std: f64) -> Model {
    let mut cfg = ModelConfig::tiny(arch, 48, 32, 64, 2, 4, 2);
    cfg.raw["initializer_range"] = init_std.into();
    let cfg = ModelConfig::from_json(cfg.raw).unwrap();
    Model::random(&cfg, 11, &LoadOptions::default()).unwrap()
}

fn swapped(m: &Model, window: usize, regions: usize, boundary_dim: usize) -> Model {
    let mut h = m.clone();
    h.swap_attention(HoloConfig { layers: vec![0, 1], window, regions, boundary_dim }).unwrap();
    h
}

fn ids(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 17 + salt * 5 + i * i) % 48).collect()
}

fn logits(m: &Model, ids: &[u32]) -> Tensor {
    m.forward(&Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap()).unwrap().squeeze(0).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn no_logit_depends_on_a_later_token() {
    let n = 14;
    for arch in [Arch::Llama, Arch::Bitnet] {
        let base = random(arch, 0.3);
        for (w, r, bd) in [(1, 1, 8), (3, 2, 8), (4, 8, 2), (5, 1, 4), (16, 2, 8)] {
            let h = swapped(&base, w, r, bd);
            let a = ids(n, 0);
            let la = logits(&h, &a);
            for j in [0, 3, 7, 12] {
                let mut b = a.clone();
                b[j] = (b[j] + 13) % 48;
                let lb = logits(&h, &b);
                if j > 0 {
                    let before = max_diff(&la.narrow(0, 0, j).unwrap(), &lb.narrow(0, 0, j).unwrap());
                    assert_eq!(before, 0.0, "{arch:?} w={w} R={r}: token {j} changed logits before it by {before}");
                }
                let after = max_diff(&la.narrow(0, j, n - j).unwrap(), &lb.narrow(0, j, n - j).unwrap());
                assert!(after > 1e-4, "{arch:?} w={w} R={r}: token {j} changed nothing at or after it");
            }
        }
    }
}

#[test]
fn one_region_covering_the_sequence_is_exact_attention() {
    for arch in [Arch::Llama, Arch::Bitnet] {
        let base = random(arch, 0.3);
        let a = ids(12, 1);
        let want = logits(&base, &a);
        for (w, r, bd) in [(12, 1, 8), (12, 4, 2), (16, 3, 4), (64, 64, 8)] {
            let got = logits(&swapped(&base, w, r, bd), &a);
            let d = max_diff(&got, &want);
            assert!(d < 1e-5, "{arch:?} w={w} R={r} r={bd}: logits differ from full attention by {d}");
        }
        // Regions shorter than the sequence do change them (the test above can fail).
        let d = max_diff(&logits(&swapped(&base, 3, 2, 8), &a), &want);
        assert!(d > 1e-4, "{arch:?}: w=3 gave the full-attention logits ({d})");
    }
}

#[test]
fn token_by_token_with_the_kv_cache_matches_the_full_forward() {
    let base = random(Arch::Bitnet, 0.3);
    let h = swapped(&base, 3, 2, 4);
    let a = ids(11, 2);
    let want = logits(&h, &a);
    let mut cache = KvCache::new(h.num_layers());
    let mut rows = vec![];
    // A 4-token prompt, then one token at a time.
    let prompt = Tensor::new(&a[..4], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    rows.push(h.forward_cached(&prompt, &mut cache, None).unwrap().squeeze(0).unwrap());
    for &t in &a[4..] {
        let x = Tensor::new(&[t], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        rows.push(h.forward_cached(&x, &mut cache, None).unwrap().squeeze(0).unwrap());
    }
    let got = Tensor::cat(&rows, 0).unwrap();
    let d = max_diff(&got, &want);
    assert!(d < 1e-5, "cached and full forwards differ by {d}");
}

/// Mean next-token loss of the training forward.
fn loss(m: &Model, ids: &Tensor) -> f64 {
    causal_lm_loss(&m.forward_train(ids).unwrap(), ids).unwrap().to_scalar::<f32>().unwrap() as f64
}

#[test]
fn every_holographic_tensor_gets_the_finite_difference_gradient() {
    let base = random(Arch::Llama, 0.5);
    let h = swapped(&base, 3, 2, 4);
    let x = Tensor::new(ids(12, 3).as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let params: Vec<_> = h.named_parameters().into_iter().filter(|(n, _)| n.contains(".holographic.")).collect();
    assert_eq!(params.len(), 6, "three tensors in each of two layers");
    let grads = causal_lm_loss(&h.forward_train(&x).unwrap(), &x).unwrap().backward().unwrap();
    for (k, (name, var)) in params.iter().enumerate() {
        assert_eq!(var.dtype(), DType::F32, "{name}");
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        // The directional derivative along a fixed random direction u.
        let n = var.elem_count();
        let u: Vec<f32> = (0..n).map(|i| (((i * 7919 + k * 104729) % 1000) as f32 / 500.0) - 1.0).collect();
        let u = Tensor::from_vec(u, var.shape(), &Device::Cpu).unwrap();
        let analytic = (g * &u).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let orig = var.as_tensor().copy().unwrap();
        // Small enough for the curvature, large enough for f32 round-off (≈1e-4 on the quotient).
        let eps = 3e-3;
        var.set(&(&orig + (&u * eps).unwrap()).unwrap()).unwrap();
        let up = loss(&h, &x);
        var.set(&(&orig - (&u * eps).unwrap()).unwrap()).unwrap();
        let down = loss(&h, &x);
        var.set(&orig).unwrap();
        let numeric = (up - down) / (2.0 * eps);
        assert!(analytic.abs() > 1e-4, "{name}: gradient along u is {analytic}: nothing flows");
        let err = (analytic - numeric).abs();
        assert!(
            err < 2e-2 * numeric.abs() + 1.5e-3,
            "{name}: backward {analytic} vs finite differences {numeric} (difference {err})"
        );
    }
}

#[test]
fn a_swapped_model_saves_and_loads_with_its_new_tensors() {
    let base = random(Arch::Bitnet, 0.3);
    let h = swapped(&base, 3, 2, 4);
    // Change the new tensors so the round trip is not just the initialisation.
    for (name, var) in h.named_parameters() {
        if name.ends_with("holographic.bias") {
            var.set(&(var.as_tensor() + 0.25).unwrap()).unwrap();
        }
    }
    h.refresh();
    let dir = tempfile::tempdir().unwrap();
    h.save(dir.path()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["rpt_holographic"]["window"], 3);
    let back = Model::from_dir(dir.path(), &LoadOptions::default()).unwrap();
    let a = ids(10, 4);
    assert_eq!(max_diff(&logits(&back, &a), &logits(&h, &a)), 0.0);
    // Its tensors stay f32 in a bf16 model.
    let bf = Model::from_dir(dir.path(), &LoadOptions { dtype: DType::BF16, ..Default::default() }).unwrap();
    for (name, var) in bf.named_parameters() {
        let want = if name.contains(".holographic.") { DType::F32 } else { DType::BF16 };
        assert_eq!(var.dtype(), want, "{name}");
    }
    // Swapping twice, and a layer that does not exist, are refused with the reason.
    let mut again = back.clone();
    let e = again.swap_attention(HoloConfig { layers: vec![0], window: 2, regions: 2, boundary_dim: 2 }).unwrap_err();
    assert!(e.to_string().contains("already has holographic attention"), "{e}");
    let mut plain = base.clone();
    let e = plain.swap_attention(HoloConfig { layers: vec![5], window: 2, regions: 2, boundary_dim: 2 }).unwrap_err();
    assert!(e.to_string().contains("layer 5 does not exist"), "{e}");
    let e = plain.swap_attention(HoloConfig { layers: vec![0], window: 2, regions: 2, boundary_dim: 3 }).unwrap_err();
    assert!(e.to_string().contains("boundary_dim 3"), "{e}");
    // A checkpoint whose config names holographic layers but lacks their tensors is refused.
    let mut cfg2 = cfg.clone();
    cfg2["rpt_holographic"]["layers"] = serde_json::json!([0]);
    base.save(dir.path()).unwrap();
    std::fs::write(dir.path().join("config.json"), cfg2.to_string()).unwrap();
    let e = Model::from_dir(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(format!("{e:#}").contains("missing tensors"), "{e:#}");
}

/// The summaries carry information: at initialisation the swapped model is closer to the full
/// model (KL of next-token distributions) than the same model with its summaries switched off.
#[test]
fn summaries_bring_the_swapped_model_closer_to_full_attention() {
    let base = random(Arch::Llama, 0.3);
    let a = ids(24, 5);
    let kl = |m: &Model| -> f64 {
        let p = candle_nn::ops::log_softmax(&logits(&base, &a), 1).unwrap();
        let q = candle_nn::ops::log_softmax(&logits(m, &a), 1).unwrap();
        let pe = p.exp().unwrap();
        ((&p - &q).unwrap() * pe).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64 / 24.0
    };
    let h = swapped(&base, 4, 8, 8);
    let local_only = swapped(&base, 4, 8, 8);
    for (name, var) in local_only.named_parameters() {
        if name.ends_with("holographic.bias") {
            var.set(&(var.as_tensor() - 1e4).unwrap()).unwrap();
        }
    }
    local_only.refresh();
    h.refresh();
    let (with, without) = (kl(&h), kl(&local_only));
    assert!(with < 0.9 * without, "KL to full attention: with summaries {with}, window only {without}");
}
