//! Generation (sampling, stop tokens, text) and residual hooks (interventions, KV-cached hooks).

use crate::common::*;
use candle_core::{DType, Tensor};
use rpt_flow::model::{Bos, GenerateOptions, HookPoint, Hooks, KvCache, Sampling, StopReason, TextTokenizer};
use std::cell::Cell;

fn sampled(seed: u64) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 12,
        sampling: Sampling::Sample { temperature: 1.5, top_p: 0.95, seed },
        stop_tokens: vec![],
    }
}

#[test]
fn sampling_is_seeded() {
    let m = load("llama_tiny", DType::F32, None);
    let prompt = Reference::load("llama_tiny").greedy_prompt();
    let a = m.generate(&prompt, &sampled(1), None).unwrap();
    let b = m.generate(&prompt, &sampled(1), None).unwrap();
    let c = m.generate(&prompt, &sampled(2), None).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens);
    assert_eq!(a.tokens.len(), 12);
    assert_eq!(a.stop, StopReason::MaxNewTokens);
    // Temperature 0 is greedy.
    let g = GenerateOptions {
        sampling: Sampling::Sample { temperature: 0.0, top_p: 1.0, seed: 0 },
        max_new_tokens: 10,
        ..Default::default()
    };
    assert_eq!(m.generate(&prompt, &g, None).unwrap().tokens, Reference::load("llama_tiny").greedy("none.f32"));
}

#[test]
fn stop_tokens_end_generation() {
    let m = load("llama_tiny", DType::F32, None);
    let r = Reference::load("llama_tiny");
    let greedy = r.greedy("none.f32");
    let opts = GenerateOptions { max_new_tokens: 10, sampling: Sampling::Greedy, stop_tokens: vec![greedy[3]] };
    let g = m.generate(&r.greedy_prompt(), &opts, None).unwrap();
    assert_eq!(g.tokens, greedy[..4].to_vec());
    assert_eq!(g.stop, StopReason::StopToken(greedy[3]));
}

#[test]
fn generate_text_decodes_the_new_tokens() {
    let m = load("llama_tiny", DType::F32, None);
    let tok = TextTokenizer::from_dir(&fixture("llama_tiny"), m.config()).unwrap();
    let r = Reference::load("llama_tiny");
    let prompt = tok.decode(&r.greedy_prompt(), true).unwrap();
    let opts = GenerateOptions { max_new_tokens: 10, ..Default::default() };
    let g = m.generate_text(&tok, &prompt, Bos::Add, &opts).unwrap();
    let want = r.greedy("none.f32");
    // The decoded prompt may re-tokenise differently; the text must be the decoding of the tokens.
    assert_eq!(g.text.as_deref().unwrap(), tok.decode(&g.tokens, true).unwrap());
    if tok.encode(&prompt, Bos::Add).unwrap() == r.greedy_prompt() {
        assert_eq!(g.tokens, want);
    }
}

#[test]
fn interventions_replace_the_residual_stream() {
    let m = load("bitnet_tiny", DType::F32, None);
    let ids = Reference::load("bitnet_tiny").input_ids();
    let base = m.forward(&ids).unwrap();
    // An identity intervention changes nothing.
    let mut h = Hooks::new();
    h.intervene(None, |_, x| Ok(x.clone()));
    assert_close("identity", &m.forward_with_hooks(&ids, &mut h).unwrap(), &base, 0.0);
    drop(h);
    // Noise on the embedding changes the logits, and is seen downstream by an observer.
    let calls = Cell::new(0);
    let mut h = Hooks::new();
    h.intervene(Some(HookPoint::Embed), |_, x| x + 0.5);
    h.observe(Some(HookPoint::ResidPre(0)), |_, x| {
        calls.set(calls.get() + 1);
        let e = Reference::load("bitnet_tiny").get("ternary.f32.hidden.0").clone();
        assert_close("resid_pre(0) sees the intervention", x, &(e + 0.5)?, 1e-6);
        Ok(())
    });
    let out = m.forward_with_hooks(&ids, &mut h).unwrap();
    drop(h);
    assert_eq!(calls.get(), 1);
    assert!(max_rel_err(&out, &base) > 1e-2);
    // Zeroing the last layer's attention contribution: resid_mid(l) := resid_pre(l).
    let pre = std::cell::RefCell::new(None::<Tensor>);
    let mut h = Hooks::new();
    let last = m.num_layers() - 1;
    h.observe(Some(HookPoint::ResidPre(last)), |_, x| {
        *pre.borrow_mut() = Some(x.clone());
        Ok(())
    });
    h.intervene(Some(HookPoint::ResidMid(last)), |_, _| Ok(pre.borrow().clone().unwrap()));
    let out = m.forward_with_hooks(&ids, &mut h).unwrap();
    assert!(max_rel_err(&out, &base) > 1e-3);
    // A wrong shape is an error, not a panic.
    let mut h = Hooks::new();
    h.intervene(Some(HookPoint::FinalNorm), |_, x| x.narrow(1, 0, 1));
    assert!(m.forward_with_hooks(&ids, &mut h).is_err());
}

#[test]
fn hooks_run_on_every_step_of_a_cached_generation() {
    let m = load("bitnet_tiny", DType::F32, None);
    let r = Reference::load("bitnet_tiny");
    let steps = Cell::new(0);
    let mut h = Hooks::new();
    h.observe(Some(HookPoint::Embed), |_, _| {
        steps.set(steps.get() + 1);
        Ok(())
    });
    let opts = GenerateOptions { max_new_tokens: 10, ..Default::default() };
    let g = m.generate(&r.greedy_prompt(), &opts, Some(&mut h)).unwrap();
    drop(h);
    assert_eq!(g.tokens, r.greedy("ternary.f32"));
    assert_eq!(steps.get(), 10, "one prefill + 9 decode steps");
    // The cached forward gives the same logits as the full forward.
    let ids = r.input_ids();
    let full = m.forward(&ids).unwrap();
    let mut cache = KvCache::new(m.num_layers());
    let a = m.forward_cached(&ids.narrow(1, 0, 7).unwrap(), &mut cache, None).unwrap();
    let b = m.forward_cached(&ids.narrow(1, 7, 5).unwrap(), &mut cache, None).unwrap();
    assert_eq!(cache.seq_len(), 12);
    assert_close("cached", &Tensor::cat(&[a, b], 1).unwrap(), &full, 1e-4);
}

#[test]
fn hidden_then_logits_equals_forward() {
    let m = load("llama_tiny", DType::F32, None);
    let ids = Reference::load("llama_tiny").input_ids();
    let h = m.forward_hidden(&ids, None).unwrap();
    assert_eq!(h.dims(), &[2, 12, 64]);
    let chunked = Tensor::cat(
        &[m.logits(&h.narrow(1, 0, 5).unwrap()).unwrap(), m.logits(&h.narrow(1, 5, 7).unwrap()).unwrap()],
        1,
    )
    .unwrap();
    assert_close("hidden → logits", &chunked, &m.forward(&ids).unwrap(), 0.0);
}

/// An f32 model whose embedding is exactly bf16 (the fixture: a bf16 checkpoint loaded in f32)
/// generates with the bf16 copy of its LM head: the logits of each KV-cache step equal the f32
/// matmul's to float rounding (the same products, summed in another order) and pick the same
/// tokens; with the weight cache off the plain matmul runs.
#[test]
fn the_bf16_generation_head_of_an_f32_model_gives_the_f32_logits() {
    let r = Reference::load("bitnet_tiny");
    let ids = r.input_ids().narrow(0, 0, 1).unwrap();
    let step_logits = |cached: bool| {
        let m = load("bitnet_tiny", DType::F32, None);
        m.set_weight_cache(cached);
        let mut cache = KvCache::new(m.num_layers());
        let mut out = vec![];
        for t in 0..ids.dim(1).unwrap() {
            let l = m.forward_cached(&ids.narrow(1, t, 1).unwrap(), &mut cache, None).unwrap();
            out.push(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        out
    };
    let (fast, plain) = (step_logits(true), step_logits(false));
    assert_ne!(fast, plain, "the two heads sum in different orders; equal bits would mean one path");
    for (a, b) in fast.iter().zip(&plain) {
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "step logits differ by {worst}");
        let argmax = |v: &[f32]| v.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).unwrap().0;
        assert_eq!(argmax(a), argmax(b));
    }
}
