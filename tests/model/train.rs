//! Training path: gradients reach every parameter (STE through both quantisers, no fused ops
//! without a backward), and AdamW steps lower the loss.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rpt_flow::model::{causal_lm_loss, Arch, LoadOptions, Model, ModelConfig};

#[test]
fn every_parameter_gets_a_gradient() {
    for name in ["bitnet_tiny", "llama_tiny"] {
        let m = load(name, DType::F32, None);
        let ids = Reference::load(name).input_ids();
        let loss = causal_lm_loss(&m.forward_train(&ids).unwrap(), &ids).unwrap();
        let grads = loss.backward().unwrap();
        for (n, v) in m.named_parameters() {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient of {n} has norm {norm}");
        }
    }
}

#[test]
fn loss_matches_the_reference_nll() {
    let r = Reference::load("bitnet_tiny");
    let m = load("bitnet_tiny", DType::F32, None);
    let ids = r.input_ids();
    let loss = causal_lm_loss(&m.forward_train(&ids).unwrap(), &ids).unwrap().to_scalar::<f32>().unwrap() as f64;
    let want = r.nll("ternary.f32");
    assert!(((loss - want) / want).abs() < 1e-5, "{loss} vs {want}");
}

#[test]
fn adamw_steps_lower_the_loss() {
    let cfg = ModelConfig::tiny(Arch::Bitnet, 64, 32, 64, 2, 4, 2);
    let m = Model::random(&cfg, 3, &LoadOptions::default()).unwrap();
    let ids: Vec<u32> = (0..2 * 16).map(|i| ((i * 7 + i / 5) % 64) as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 16), &Device::Cpu).unwrap();
    let mut opt = AdamW::new(m.parameters(), ParamsAdamW { lr: 3e-2, ..Default::default() }).unwrap();
    let mut losses = vec![];
    for _ in 0..8 {
        let loss = causal_lm_loss(&m.forward_train(&ids).unwrap(), &ids).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.backward_step(&loss).unwrap();
    }
    assert!(losses[7] < losses[0] - 0.3, "loss did not fall: {losses:?}");
    // After training, the inference path (with its weight cache re-enabled) sees the new weights.
    m.refresh();
    let a = m.forward(&ids).unwrap();
    let b = m.forward_train(&ids).unwrap();
    assert_close("after training", &a, &b, 1e-5);
}

/// The fused training ops (`train_ops.rs`) give the composed candle ops' loss and gradients for
/// every parameter of both test models, within float rounding.
#[test]
fn fused_training_ops_give_the_composed_gradients() {
    use rpt_flow::model::train_ops;
    for name in ["bitnet_tiny", "llama_tiny"] {
        let m = load(name, DType::F32, None);
        let ids = Reference::load(name).input_ids();
        let run = || {
            let loss = causal_lm_loss(&m.forward_train(&ids).unwrap(), &ids).unwrap();
            let grads = loss.backward().unwrap();
            let g: Vec<(String, Vec<f32>)> = m
                .named_parameters()
                .into_iter()
                .map(|(n, v)| (n, grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap()))
                .collect();
            (loss.to_scalar::<f32>().unwrap(), g)
        };
        let (lf, gf) = run();
        let (lc, gc) = train_ops::composed(run);
        assert!((lf - lc).abs() <= 1e-5 * lc.abs(), "{name}: loss {lf} vs {lc}");
        for ((n, a), (_, b)) in gf.iter().zip(&gc) {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-5 * scale, "{name}: gradient of {n} differs by {worst} (max |g| {scale})");
        }
        assert_ne!(gf, gc, "{name}: the two paths should not be the same code");
    }
}

/// The reference inputs (2 × 12 tokens) and 2 × 100 tokens: long enough for the inference
/// attention kernel (`attention_kernel.rs`, from 17 queries) and several of its query blocks.
fn short_and_long_inputs(name: &str, m: &Model) -> Vec<Tensor> {
    let vocab = m.config().vocab_size;
    let long: Vec<u32> = (0..200).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    vec![Reference::load(name).input_ids(), Tensor::from_vec(long, (2, 100), &Device::Cpu).unwrap()]
}

/// On CPU in f32 the training forward is the inference forward: the same int8 kernel for the
/// ternary products and the fused ops' inference arithmetic, so the logits agree bit for bit.
#[test]
fn the_training_forward_equals_the_inference_forward() {
    for name in ["bitnet_tiny", "llama_tiny"] {
        let m = load(name, DType::F32, None);
        for ids in short_and_long_inputs(name, &m) {
            let infer = m.forward(&ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let train = m.forward_train(&ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(infer == train, "{name}: training and inference logits differ on {:?}", ids.dims());
        }
    }
}

/// The inference forward through the fused attention and gate ops and the attention kernel gives
/// the composed ops' logits bit for bit (so entries cached before them keep their meaning).
#[test]
fn fused_inference_ops_change_no_logit() {
    use rpt_flow::model::train_ops;
    for name in ["bitnet_tiny", "llama_tiny"] {
        let m = load(name, DType::F32, None);
        for ids in short_and_long_inputs(name, &m) {
            let fused = m.forward(&ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let composed =
                train_ops::composed(|| m.forward(&ids)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(fused == composed, "{name}: the fused inference forward changed the logits on {:?}", ids.dims());
        }
    }
}

/// `Model::train_loss` (the LM head and the loss in one op on CPU) gives the loss of the logits
/// path bit for bit and its gradients to float rounding.
#[test]
fn train_loss_equals_the_loss_of_the_logits() {
    use rpt_flow::model::next_token_targets;
    for name in ["bitnet_tiny", "llama_tiny"] {
        let m = load(name, DType::F32, None);
        let ids = Reference::load(name).input_ids();
        let grads = |loss: Tensor| {
            let g = loss.backward().unwrap();
            let out: Vec<Vec<f32>> = m
                .named_parameters()
                .iter()
                .map(|(_, v)| g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap())
                .collect();
            (loss.to_scalar::<f32>().unwrap(), out)
        };
        let (lf, gf) = grads(m.train_loss(&ids, &next_token_targets(&ids).unwrap()).unwrap());
        let (lc, gc) = grads(causal_lm_loss(&m.forward_train(&ids).unwrap(), &ids).unwrap());
        assert_eq!(lf.to_bits(), lc.to_bits(), "{name}: loss {lf} vs {lc}");
        for (a, b) in gf.iter().zip(&gc) {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-5 * scale, "{name}: gradients differ by {worst} (max {scale})");
        }
    }
}

/// An inference forward records no autograd graph in any dtype: with one, every activation of
/// the forward stays alive until its output is dropped (the bf16 RMSNorm once multiplied by the
/// variable itself, and a bf16 2B eval at 4 × 2048 tokens ran a 141 GB GPU out of memory). The
/// training forward does record one, so the check can fail.
#[test]
fn inference_records_no_graph() {
    for name in ["bitnet_tiny", "bitnet_tiny_packed", "llama_tiny"] {
        for dtype in [DType::F32, DType::BF16] {
            let m = load(name, dtype, None);
            let ids = Reference::load(name).input_ids().to_device(m.device()).unwrap();
            assert!(!m.forward(&ids).unwrap().track_op(), "{name} {dtype:?}: forward");
            assert!(!m.forward_hidden(&ids, None).unwrap().track_op(), "{name} {dtype:?}: forward_hidden");
            if name != "bitnet_tiny_packed" {
                assert!(m.forward_train(&ids).unwrap().track_op(), "{name} {dtype:?}: forward_train");
            }
        }
    }
}
