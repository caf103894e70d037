//! Measures of generated text: repetition (distinct bigrams) and whether an expected answer
//! appears as a word.

use std::collections::HashSet;

/// Distinct-bigram ratio of a token sequence (1 = no bigram repeats; short sequences count as 1).
pub fn distinct_bigrams(tokens: &[u32]) -> f64 {
    if tokens.len() < 3 {
        return 1.0;
    }
    let pairs: Vec<(u32, u32)> = tokens.windows(2).map(|w| (w[0], w[1])).collect();
    pairs.iter().collect::<HashSet<_>>().len() as f64 / pairs.len() as f64
}

/// Whether `expected` appears in `text` as a word (case-insensitive).
pub fn contains_word(text: &str, expected: &str) -> bool {
    let lower = text.to_lowercase();
    let e = expected.to_lowercase();
    lower.match_indices(&e).any(|(i, _)| {
        let before = lower[..i].chars().next_back();
        let after = lower[i + e.len()..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_match_whole_and_case_insensitively() {
        assert!(contains_word(" Paris, of course", "paris"));
        assert!(contains_word("Neil Armstrong.", "Armstrong"));
        assert!(!contains_word("Parisian", "Paris"));
        assert!(!contains_word("", "Paris"));
    }

    #[test]
    fn bigram_diversity() {
        assert_eq!(distinct_bigrams(&[1, 2, 3, 4]), 1.0);
        assert_eq!(distinct_bigrams(&[7, 7, 7, 7, 7]), 0.25);
        assert_eq!(distinct_bigrams(&[1, 2]), 1.0);
    }
}
