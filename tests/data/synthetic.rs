//! The synthetic facts corpus: deterministic, states every fact, splits differ.

use rpt_flow::data::{
    synthetic::{fact_prompts, facts, prompt_set, Split, Synthetic},
    DataError, Source,
};
use serde_json::json;

fn text(s: &Synthetic) -> String {
    s.rows().concat()
}

#[test]
fn same_seed_same_text_other_seed_other_text() {
    let a = Synthetic::new("facts", Split::Train).unwrap();
    let mut b = a.clone();
    assert_eq!(text(&a), text(&b), "two generations with seed 0 differ");
    b.seed = 1;
    assert_ne!(text(&a), text(&b), "seeds 0 and 1 gave the same text");
}

#[test]
fn every_fact_prompt_is_answered_in_the_train_text() {
    let train = text(&Synthetic::new("facts", Split::Train).unwrap());
    let prompts = fact_prompts();
    assert!(prompts.len() >= 40, "only {} facts", prompts.len());
    for p in &prompts {
        let sentence = format!("{} {}.", p.prompt, p.completion);
        assert!(train.contains(&sentence), "train text lacks `{sentence}`");
        assert!(p.completion.contains(&p.expected), "{p:?}");
    }
    // The examples the researcher's notebooks use.
    for (prompt, expected) in [
        ("The capital of France is", "Paris"),
        ("The largest planet is", "Jupiter"),
        ("The first man on the Moon was", "Armstrong"),
    ] {
        assert!(
            prompts.iter().any(|p| p.prompt == prompt && p.expected == expected),
            "missing fact {prompt} -> {expected}"
        );
    }
}

#[test]
fn train_and_test_differ_but_share_the_facts() {
    let train = text(&Synthetic::new("facts", Split::Train).unwrap());
    let test = text(&Synthetic::new("facts", Split::Test).unwrap());
    assert_ne!(train, test);
    assert!(!train.starts_with(&test[..200]), "test text is a prefix of the train text");
    // The test split states facts too (canonical or paraphrased): most answers occur in it.
    let answered = facts().iter().filter(|f| test.contains(&f.expected)).count();
    assert!(answered * 10 >= facts().len() * 9, "only {answered} facts in the test split");
    // Some paragraphs of the test split are not in the train split.
    let unseen = test.lines().filter(|l| !train.contains(l)).count();
    assert!(unseen > 0);
}

#[test]
fn length_is_counted_in_sentences() {
    let mut s = Synthetic::new("facts", Split::Test).unwrap();
    s.sentences = 50;
    let t = text(&s);
    // Every sentence ends with a full stop followed by a space or a newline.
    let ends = t.matches(". ").count() + t.matches(".\n").count();
    assert_eq!(ends, 50, "{t}");
}

#[test]
fn names_tables_and_identities() {
    let plain = Source::from_value(&json!("synthetic:facts")).unwrap();
    let train = Source::from_value(&json!("synthetic:facts:train")).unwrap();
    assert_eq!(plain, train, "the bare name is the train split");
    let custom = Source::from_value(&json!({"name": "synthetic:facts:test", "seed": 3, "sentences": 100})).unwrap();
    let id = custom.identity().unwrap();
    assert_eq!(id["split"], "test");
    assert_eq!(id["seed"], 3);
    assert_eq!(id["sentences"], 100);
    assert!(id["generator_version"].is_u64());
    assert_ne!(train.identity().unwrap(), id);
    let text = custom.text().unwrap();
    assert_eq!(text.text.matches(". ").count() + text.text.matches(".\n").count(), 100);
    assert!(Source::from_value(&json!({"name": "synthetic:facts", "join": " "})).is_err());
}

#[test]
fn unknown_names_suggest_the_nearest() {
    let err = Source::from_value(&json!("synthetic:fact")).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("did you mean `synthetic:facts`"), "{msg}");
    assert!(matches!(err.downcast_ref::<DataError>(), Some(DataError::UnknownSource { .. })));
    let err = prompt_set("fatcs").unwrap_err().to_string();
    assert!(err.contains("did you mean `facts`"), "{err}");
    assert_eq!(prompt_set("facts").unwrap(), fact_prompts());
}
