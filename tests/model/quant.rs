//! Quantisation: train path = inference path, packed (offline) = latent (online) within bf16
//! rounding, and the parity reference really depends on both quantisers.

use crate::common::*;
use candle_core::DType;
use rpt_flow::model::quant::{act_fake_quant, weight_fake_quant};
use rpt_flow::model::Quantization;

#[test]
fn train_and_inference_paths_give_the_same_logits() {
    for (name, q) in [
        ("bitnet_tiny", None),
        ("bitnet_tiny", Some(Quantization::None)),
        ("bitnet_tiny_packed", None),
        ("llama_tiny", None),
    ] {
        for dtype in [DType::F32, DType::BF16] {
            let m = load(name, dtype, q);
            let ids = Reference::load(name).input_ids();
            let a = m.forward(&ids).unwrap();
            let b = m.forward_train(&ids).unwrap();
            m.set_weight_cache(false);
            assert_close("without weight cache", &m.forward(&ids).unwrap(), &a, 0.0);
            let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            assert_close(&format!("{name} {q:?} {dtype:?} train vs infer"), &b, &a, tol);
        }
    }
}

#[test]
fn packed_and_latent_forms_agree_within_bf16_rounding() {
    // The packed fixture holds round(W/β) and β rounded to bf16 (as the hub checkpoint stores it).
    // That rounding (relative ≤ 2⁻⁹) flips a few int8 activation codes downstream, so the two forms
    // differ by up to ~5e-2 in single logits (mean ~1e-2) — in transformers exactly as here.
    let ids = Reference::load("bitnet_tiny").input_ids();
    let (ra, rb) = (Reference::load("bitnet_tiny"), Reference::load("bitnet_tiny_packed"));
    for (dtype, d) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
        let latent = load("bitnet_tiny", dtype, None);
        let packed = load("bitnet_tiny_packed", dtype, None);
        let a = latent.forward(&ids).unwrap();
        let b = packed.forward(&ids).unwrap();
        let ours = max_rel_err(&b, &a);
        let theirs = max_rel_err(rb.get(&format!("ternary.{d}.logits")), ra.get(&format!("ternary.{d}.logits")));
        assert!(ours <= 8e-2, "packed vs latent {dtype:?}: {ours:e}");
        assert!((ours - theirs).abs() <= 1e-3, "packed vs latent {dtype:?}: {ours:e}, transformers {theirs:e}");
        let mean = (&b - &a).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(mean <= 2e-2, "mean |packed − latent| = {mean}");
        // The ternary codes are identical.
        for n in latent.projection_names() {
            let w = latent.projection(&n).unwrap();
            let (t, _) = rpt_flow::model::quant::ternarize(&w).unwrap();
            let codes = packed.projection(&n).unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(t.to_vec2::<f32>().unwrap(), codes.to_vec2::<f32>().unwrap(), "{n}");
        }
    }
}

#[test]
fn parity_reference_needs_both_quantisers() {
    let r = Reference::load("bitnet_tiny");
    let ids = r.input_ids();
    let want = r.get("ternary.f32.logits");
    // Neither quantiser (the unquantised reference) is far away.
    assert!(max_rel_err(r.get("none.f32.logits"), want) > 1e-2);
    // Weights quantised, activations not: still far beyond the 1e-4 parity tolerance.
    let m = load("bitnet_tiny", DType::F32, Some(Quantization::None));
    for n in m.projection_names() {
        let w = m.projection(&n).unwrap();
        m.set_projection(&n, &weight_fake_quant(&w).unwrap()).unwrap();
    }
    let logits = m.forward(&ids.to_device(m.device()).unwrap()).unwrap();
    let e = max_rel_err(&logits.to_device(want.device()).unwrap(), want);
    assert!(e > 1e-3, "weight-only quantisation is within {e:e} of the reference");
    // Activations quantised, weights not, is not reachable through the public API; checked by hand
    // (2026-11-26): removing act-quant from BitLinear fails `model_parity::bitnet_ternary_f32` with
    // 5.5e-2, removing weight-quant with 2.7e0 (tolerance 1e-4). The quantiser itself does move values:
    let x = r.get("ternary.f32.hidden.1");
    let d = max_rel_err(&act_fake_quant(x).unwrap(), x);
    assert!(d > 1e-3, "activation fake-quant changes values by {d:e}");
}

/// A model opened with `pack_for_inference` keeps only the kernel's packed projections: the same
/// logits bit for bit (the kernel packs the same bits from the full weights), in a full forward
/// and token by token with the KV cache, and a clear refusal of everything that needs the
/// weights. Other dtypes ignore the option.
#[test]
fn packing_for_inference_keeps_the_outputs_and_refuses_weight_access() {
    use rpt_flow::model::{KvCache, LoadOptions, Model};
    for name in ["bitnet_tiny", "bitnet_tiny_packed"] {
        let path = fixture(name);
        let full = Model::from_dir(&path, &LoadOptions::default()).unwrap();
        let packed =
            Model::from_dir(&path, &LoadOptions { pack_for_inference: true, ..LoadOptions::default() }).unwrap();
        let ids = Reference::load(name).input_ids();
        let (a, b) = (full.forward(&ids).unwrap(), packed.forward(&ids).unwrap());
        // How many values differ in their bits (a count, so a failure prints one line).
        let differ = |x: &candle_core::Tensor, y: &candle_core::Tensor| -> usize {
            let v = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v(x).iter().zip(v(y)).filter(|(p, q)| p.to_bits() != q.to_bits()).count()
        };
        assert_eq!(differ(&a, &b), 0, "{name}: logits");
        let row = ids.narrow(0, 0, 1).unwrap();
        let (mut ca, mut cb) = (KvCache::new(full.num_layers()), KvCache::new(packed.num_layers()));
        for t in 0..row.dim(1).unwrap() {
            let tok = row.narrow(1, t, 1).unwrap();
            let (la, lb) = (
                full.forward_cached(&tok, &mut ca, None).unwrap(),
                packed.forward_cached(&tok, &mut cb, None).unwrap(),
            );
            assert_eq!(differ(&la, &lb), 0, "{name}: cached step {t}");
        }

        let stored: usize = full.state_dict().unwrap().values().map(|t| t.elem_count()).sum();
        assert_eq!(full.stored_parameter_count(), stored, "{name}: parameter count");
        assert_eq!(packed.stored_parameter_count(), stored, "{name}: parameter count, packed");
        for n in full.projection_names() {
            let w = full.projection(&n).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (zeros, total) = packed.kernel_zeros(&n).unwrap().expect("kernel-only projection");
            assert_eq!(total as usize, w.len(), "{n}");
            if name == "bitnet_tiny_packed" {
                // The stored values are the ternary codes themselves.
                assert_eq!(zeros as usize, w.iter().filter(|&&v| v == 0.0).count(), "{n}: zeros");
            }
            assert!(full.kernel_zeros(&n).unwrap().is_none());
        }
        // 2 bits a weight (rows padded to 128 inputs) against 32.
        assert!(packed.packed_for_inference() && !full.packed_for_inference());
        assert!(packed.projection_bytes() * 8 <= full.projection_bytes(), "{name}: packed weights not smaller");
        let proj = packed.projection_names()[0].clone();
        assert_eq!(proj, full.projection_names()[0]);
        let refusals = [
            packed.projection(&proj).unwrap_err().to_string(),
            packed.set_projection(&proj, &full.projection(&proj).unwrap()).unwrap_err().to_string(),
            packed.save(tempfile::tempdir().unwrap().path()).unwrap_err().to_string(),
            packed.forward_train(&ids).unwrap_err().to_string(),
        ];
        for e in refusals {
            assert!(e.contains(&proj) && e.contains("packed ternary weights only"), "{name}: {e}");
        }
    }
    // bf16 does not run the kernel: the option is ignored and the weights stay readable.
    let path = fixture("bitnet_tiny");
    let bf16 = LoadOptions { dtype: DType::BF16, pack_for_inference: true, ..LoadOptions::default() };
    let m = Model::from_dir(&path, &bf16).unwrap();
    assert!(!m.packed_for_inference() && m.projection(&m.projection_names()[0]).is_ok());
}
