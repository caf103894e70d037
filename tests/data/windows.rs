//! Evaluation windows (properties over many lengths) and training batches.

use std::{collections::HashMap, sync::Arc};

use rpt_flow::data::{windows, Bos, Protocol, TrainBatches, WindowOptions};

const BOS: u32 = 1_000_000;

fn opts(seq_len: usize, bos: Bos) -> WindowOptions {
    WindowOptions { seq_len, bos, bos_id: Some(BOS), max_windows: None }
}

/// How often each stream position is scored, found by matching every window back to the
/// stream (tokens are their own positions, so a scored id is its position).
fn score_counts(protocol: Protocol, n: u32, o: &WindowOptions) -> HashMap<u32, usize> {
    let stream: Vec<u32> = (0..n).collect();
    let mut counts = HashMap::new();
    for w in windows(protocol, &stream, o).unwrap() {
        assert!(w.input_ids.len() <= o.seq_len, "window longer than seq_len");
        assert!(w.targets.start >= 1 && w.targets.end <= w.input_ids.len());
        for &t in w.target_ids() {
            assert_ne!(t, BOS, "BOS is never a target");
            *counts.entry(t).or_default() += 1;
        }
    }
    counts
}

#[test]
fn rolling_scores_each_token_exactly_once() {
    for n in [2u32, 5, 17, 64, 100] {
        for (seq_len, stride) in [(2, 1), (4, 1), (4, 3), (8, 5), (16, 15)] {
            let none = score_counts(Protocol::Rolling { stride }, n, &opts(seq_len, Bos::None));
            assert_eq!(none.len(), n as usize - 1, "n={n} L={seq_len} s={stride}");
            assert!(none.values().all(|&c| c == 1) && !none.contains_key(&0));
            let start = score_counts(Protocol::Rolling { stride }, n, &opts(seq_len, Bos::StreamStart));
            assert_eq!(start.len(), n as usize, "stream-start scores token 0 too");
            assert!(start.values().all(|&c| c == 1));
            {
                let each = score_counts(Protocol::Rolling { stride }, n, &opts(seq_len, Bos::WindowStart));
                assert_eq!(each.len(), n as usize);
                assert!(each.values().all(|&c| c == 1));
            }
        }
    }
}

#[test]
fn rolling_refuses_a_stride_of_seq_len() {
    let stream: Vec<u32> = (0..20).collect();
    let err = windows(Protocol::Rolling { stride: 4 }, &stream, &opts(4, Bos::None)).unwrap_err();
    assert!(err.to_string().contains("stride must be in 1..=3"), "{err}");
}

#[test]
fn chunk_protocols_count_windows_and_scored_tokens() {
    for n in [16u32, 33, 100, 257] {
        for seq_len in [2usize, 4, 8, 16] {
            let nu = n as usize;
            let chunks = windows(Protocol::Chunks, &(0..n).collect::<Vec<_>>(), &opts(seq_len, Bos::None)).unwrap();
            assert_eq!(chunks.len(), nu / seq_len);
            assert_eq!(chunks.iter().map(|w| w.scored()).sum::<usize>(), nu / seq_len * (seq_len - 1));
            let llama = windows(Protocol::LlamaCpp, &(0..n).collect::<Vec<_>>(), &opts(seq_len, Bos::WindowStart));
            if seq_len == 2 {
                // The second half of a 2-token window holds no scored token: refused.
                assert!(llama.is_err());
            } else {
                let llama = llama.unwrap();
                assert_eq!(llama.len(), nu / seq_len);
                for w in &llama {
                    assert_eq!(w.input_ids[0], BOS);
                    assert_eq!(w.scored(), seq_len - 1 - seq_len / 2);
                    assert_eq!(w.logit_positions().start, seq_len / 2);
                }
            }
            let each =
                windows(Protocol::Chunks, &(0..n).collect::<Vec<_>>(), &opts(seq_len, Bos::WindowStart)).unwrap();
            assert_eq!(each.len(), nu / (seq_len - 1));
            assert!(each.iter().all(|w| w.input_ids[0] == BOS && w.input_ids.len() == seq_len));
        }
    }
}

#[test]
fn protocol_and_bos_names() {
    assert_eq!(Protocol::parse("rolling", Some(256)).unwrap(), Protocol::Rolling { stride: 256 });
    assert_eq!(Protocol::parse("llama-cpp", None).unwrap().name(), "llama-cpp");
    assert!(Protocol::parse("rolling", None).is_err());
    assert!(Protocol::parse("chunks", Some(3)).is_err());
    assert!(Protocol::parse("wanda", None).is_err());
    assert_eq!(Bos::parse("stream-start").unwrap(), Bos::StreamStart);
    assert!(Bos::parse("start").is_err());
}

fn stream(n: u32) -> Arc<Vec<u32>> {
    Arc::new((0..n).map(|i| i * 7 % 1000).collect())
}

#[test]
fn batches_depend_on_seed_and_step_alone() {
    let a = TrainBatches::new(stream(5000), 16, 8, 42).unwrap();
    let b = TrainBatches::new(stream(5000), 16, 8, 42).unwrap();
    // Out of order and repeated calls give what an in-order run gives.
    let in_order: Vec<_> = (0..20).map(|s| a.get(s)).collect();
    for s in (0..20).rev() {
        assert_eq!(b.get(s), in_order[s as usize], "step {s}");
    }
    assert_eq!(b.get(7), a.get(7));
    // Steps and seeds differ.
    assert_ne!(a.get(0).offsets, a.get(1).offsets);
    let c = TrainBatches::new(stream(5000), 16, 8, 43).unwrap();
    assert_ne!(a.get(0).offsets, c.get(0).offsets);
}

#[test]
fn batch_rows_are_windows_of_seq_len_plus_one() {
    let tokens = stream(300);
    let batches = TrainBatches::new(tokens.clone(), 10, 4, 0).unwrap();
    let mut seen_last = false;
    for step in 0..200 {
        let b = batches.get(step);
        assert_eq!((b.input_ids.len(), b.targets.len(), b.offsets.len()), (40, 40, 4));
        for (r, &o) in b.offsets.iter().enumerate() {
            assert!(o + 11 <= tokens.len(), "offset {o} overruns");
            seen_last |= o + 11 == tokens.len();
            assert_eq!(&b.input_ids[r * 10..r * 10 + 10], &tokens[o..o + 10]);
            assert_eq!(&b.targets[r * 10..r * 10 + 10], &tokens[o + 1..o + 11]);
        }
    }
    assert!(seen_last, "the last valid offset is never drawn");
    // Exactly seq_len + 1 tokens is one possible window; fewer is an error.
    assert_eq!(TrainBatches::new(stream(11), 10, 2, 0).unwrap().get(5).offsets, vec![0, 0]);
    assert!(TrainBatches::new(stream(10), 10, 2, 0).is_err());
}
