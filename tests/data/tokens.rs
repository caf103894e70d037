//! Tokenisation cache and the BPE trainer.

use std::sync::Arc;

use rpt_flow::data::{token_stream, train_bpe, HubOptions, Source, BOS_TOKEN, EOS_TOKEN};

fn corpus() -> Vec<String> {
    let s = Source::parse_name("synthetic:facts:test").unwrap();
    s.text().unwrap().text.lines().map(String::from).collect()
}

#[test]
fn bpe_is_deterministic_and_round_trips() {
    let texts = corpus();
    let a = train_bpe(&texts, 800).unwrap();
    let b = train_bpe(&texts, 800).unwrap();
    let json = a.to_string(false).unwrap();
    assert_eq!(json, b.to_string(false).unwrap(), "two trainings differ");
    assert_eq!(a.get_vocab_size(true), 800);
    assert_eq!(a.token_to_id(BOS_TOKEN), Some(0));
    assert_eq!(a.token_to_id(EOS_TOKEN), Some(1));

    let text = "The capital of France is Paris. Zebras écrivent 42!";
    let plain = a.encode(text, false).unwrap();
    assert_eq!(a.decode(plain.get_ids(), false).unwrap(), text);
    let with_bos = a.encode(text, true).unwrap();
    assert_eq!(with_bos.get_ids()[0], 0);
    assert_eq!(&with_bos.get_ids()[1..], plain.get_ids());
    // Frequent words of the corpus become single tokens.
    assert_eq!(a.encode(" capital", false).unwrap().get_ids().len(), 1);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    a.save(&path, false).unwrap();
    let back = tokenizers::Tokenizer::from_file(&path).unwrap();
    assert_eq!(back.encode(text, true).unwrap().get_ids(), with_bos.get_ids());
}

#[test]
fn token_streams_are_cached_per_tokenizer_and_source() {
    let tok = train_bpe(&corpus(), 400).unwrap();
    let hub = HubOptions::offline_at("/nonexistent");
    let src = Source::parse_name("synthetic:facts:test").unwrap();
    let first = token_stream(&src, &hub, &tok, "tok-400", false).unwrap();
    let again = token_stream(&src, &hub, &tok, "tok-400", false).unwrap();
    assert!(Arc::ptr_eq(&first.ids, &again.ids), "second call re-tokenised");
    assert_eq!(first.bytes, src.text().unwrap().bytes());
    let expected = tok.encode(src.text().unwrap().text.as_str(), false).unwrap();
    assert_eq!(first.ids.as_slice(), expected.get_ids());

    let with_bos = token_stream(&src, &hub, &tok, "tok-400", true).unwrap();
    assert_eq!(with_bos.ids.len(), first.ids.len() + 1);
    let other_tok = train_bpe(&corpus(), 300).unwrap();
    let other = token_stream(&src, &hub, &other_tok, "tok-300", false).unwrap();
    assert!(other.ids.len() > first.ids.len(), "a smaller vocab gives more tokens");
}
