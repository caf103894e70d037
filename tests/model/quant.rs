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
    let e = max_rel_err(&m.forward(&ids).unwrap(), want);
    assert!(e > 1e-3, "weight-only quantisation is within {e:e} of the reference");
    // Activations quantised, weights not, is not reachable through the public API; checked by hand
    // (2026-11-26): removing act-quant from BitLinear fails `model_parity::bitnet_ternary_f32` with
    // 5.5e-2, removing weight-quant with 2.7e0 (tolerance 1e-4). The quantiser itself does move values:
    let x = r.get("ternary.f32.hidden.1");
    let d = max_rel_err(&act_fake_quant(x).unwrap(), x);
    assert!(d > 1e-3, "activation fake-quant changes values by {d:e}");
}
