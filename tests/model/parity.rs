//! Parity with transformers on the tiny fixtures (tests/fixtures/make_reference.py).
//!
//! f32: logits and hidden states within 1e-4·max(1,|ref|), mean NLL within 1e-5 relative, greedy
//! tokens identical. bf16: within the documented bf16 tolerances (docs/model.md).

use crate::common::*;
use candle_core::DType;
use rpt_flow::model::{GenerateOptions, HookPoint, Quantization, Sampling};

const F32_TOL: f32 = 1e-4;
/// bf16: we follow transformers' rounding points (bit-identical on these fixtures); the tolerance
/// allows a couple of bf16 ulps (2⁻⁷ relative each) for other BLAS back-ends.
const BF16_TOL: f32 = 2e-2;
/// bf16 on a GPU (`RPT_TEST_DEVICE=cuda`), against the same CPU references: cuBLAS sums a product
/// in another order, which moves some bf16 roundings wherever the weights are not ternary. On an
/// H200 (2026-11-30) the ternary and llama fixtures came out bit-identical, the unquantised BitNet
/// 2.5e-2 from its reference — transformers itself, on the same GPU, lands 4.3e-2 from it
/// (tests/fixtures/bf16_device_gap.py).
const BF16_GPU_TOL: f32 = 5e-2;
const BF16_NLL_REL: f64 = 1e-3;

fn check(fixture_name: &str, mode: &str, dtype: DType, q: Option<Quantization>) {
    let r = Reference::load(fixture_name);
    let model = load(fixture_name, dtype, q);
    let ids = r.input_ids();
    let (logits, seen) = forward_capture(&model, &ids);
    let d = if dtype == DType::F32 { "f32" } else { "bf16" };
    let key = format!("{mode}.{d}");
    let tol = match dtype {
        DType::F32 => F32_TOL,
        _ if model.device().is_cpu() => BF16_TOL,
        _ => BF16_GPU_TOL,
    };
    let what = format!("{fixture_name} {key}");
    assert_close(&format!("{what} logits"), &logits, r.get(&format!("{key}.logits")), tol);
    let n = model.num_layers();
    for l in 0..n {
        // transformers' hidden_states[l] is the input of layer l.
        assert_close(
            &format!("{what} hidden {l}"),
            &seen[&HookPoint::ResidPre(l)],
            r.get(&format!("{key}.hidden.{l}")),
            tol,
        );
        assert_close(
            &format!("{what} resid_mid {l}"),
            &seen[&HookPoint::ResidMid(l)],
            r.get(&format!("{key}.resid_mid.{l}")),
            tol,
        );
        assert_close(
            &format!("{what} resid_post {l}"),
            &seen[&HookPoint::ResidPost(l)],
            r.get(&format!("{key}.resid_post.{l}")),
            tol,
        );
    }
    // ... and the last one is after the final norm.
    assert_close(&format!("{what} hidden {n}"), &seen[&HookPoint::FinalNorm], r.get(&format!("{key}.hidden.{n}")), tol);
    assert_close(&format!("{what} embed"), &seen[&HookPoint::Embed], r.get(&format!("{key}.hidden.0")), tol);
    let nll = mean_nll(&logits, &ids);
    let want = r.nll(&key);
    let rel = ((nll - want) / want).abs();
    let nll_tol = if dtype == DType::F32 { 1e-5 } else { BF16_NLL_REL };
    assert!(rel <= nll_tol, "{what} NLL {nll} vs {want} (rel {rel:e})");
    {
        let opts = GenerateOptions { max_new_tokens: 10, sampling: Sampling::Greedy, stop_tokens: vec![] };
        let g = model.generate(&r.greedy_prompt(), &opts, None).unwrap();
        assert_eq!(g.tokens, r.greedy(&key), "{what} greedy tokens");
    }
}

#[test]
fn bitnet_ternary_f32() {
    check("bitnet_tiny", "ternary", DType::F32, None);
}

#[test]
fn bitnet_unquantised_f32() {
    check("bitnet_tiny", "none", DType::F32, Some(Quantization::None));
}

#[test]
fn bitnet_packed_f32() {
    check("bitnet_tiny_packed", "ternary", DType::F32, None);
}

#[test]
fn llama_f32() {
    check("llama_tiny", "none", DType::F32, None);
}

#[test]
fn bitnet_ternary_bf16() {
    check("bitnet_tiny", "ternary", DType::BF16, None);
}

#[test]
fn bitnet_unquantised_bf16() {
    check("bitnet_tiny", "none", DType::BF16, Some(Quantization::None));
}

#[test]
fn bitnet_packed_bf16() {
    check("bitnet_tiny_packed", "ternary", DType::BF16, None);
}

#[test]
fn llama_bf16() {
    check("llama_tiny", "none", DType::BF16, None);
}
