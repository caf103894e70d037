//! The synthetic facts corpus: English-like text over a small, fixed world of checkable facts,
//! generated deterministically from a seed, so that a tiny model can be trained to complete
//! "The capital of France is" with "Paris" and the `generate` stage can check that it does.
//!
//! The world ([`facts`]) is fixed by [`GENERATOR_VERSION`]; a split and a seed only choose the
//! order, the sentence templates and the distractor sentences. Train and test text differ
//! (different random streams) but state the same facts. Every fact is stated at least once in
//! its canonical form (`prompt + " " + completion + "."`) in the first pass of the train split.

use anyhow::Result;
use serde_json::json;

use super::error::DataError;
use crate::rng::SplitMix64;

/// Bump when the world, the templates or the generation procedure change: it is part of every
/// synthetic source's identity, so cached results made from older text stop matching.
pub const GENERATOR_VERSION: u32 = 1;

/// The synthetic corpora by name (`synthetic:<name>`): `facts`, paragraphs over the facts world;
/// `fact-sentences`, one canonical fact sentence per row ("The capital of France is Paris."),
/// like the sparsity notebook's hand-written evaluation sentences (8 by default, spread over the
/// world; both splits give the same sentences).
pub const NAMES: [&str; 2] = ["facts", "fact-sentences"];

/// Default number of `fact-sentences` rows.
pub const FACT_SENTENCES: usize = 8;

/// Default number of sentences per split.
pub const TRAIN_SENTENCES: usize = 20_000;
pub const TEST_SENTENCES: usize = 2_000;

/// A fact as a prompt for generation and the answer expected in the continuation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FactPrompt {
    /// The canonical prompt, e.g. "The capital of France is".
    pub prompt: String,
    /// What follows the prompt in the canonical sentence, e.g. "Paris" or "Neil Armstrong".
    pub completion: String,
    /// The word that must appear in a model's continuation to count as a hit, e.g. "Armstrong".
    pub expected: String,
}

/// One fact of the world: its canonical prompt and completion, the expected answer word, and
/// paraphrases that state the same fact in other words.
#[derive(Debug, Clone)]
pub struct Fact {
    pub prompt: String,
    pub completion: String,
    pub expected: String,
    pub paraphrases: Vec<String>,
}

impl Fact {
    /// The canonical sentence: `"<prompt> <completion>."`.
    pub fn canonical(&self) -> String {
        format!("{} {}.", self.prompt, self.completion)
    }
}

const COUNTRIES: [(&str, &str); 15] = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Poland", "Warsaw"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"),
    ("Peru", "Lima"),
    ("Australia", "Canberra"),
];

/// (prompt, completion, expected, paraphrases) for the facts that are not capitals.
type Row = (&'static str, &'static str, &'static str, &'static [&'static str]);

const OTHER_FACTS: [Row; 30] = [
    // Planets.
    (
        "The largest planet is",
        "Jupiter",
        "Jupiter",
        &[
            "Jupiter is the largest planet.",
            "The biggest planet in the solar system is Jupiter.",
            "No planet is larger than Jupiter.",
        ],
    ),
    (
        "The smallest planet is",
        "Mercury",
        "Mercury",
        &["Mercury is the smallest planet.", "No planet is smaller than Mercury."],
    ),
    ("The red planet is", "Mars", "Mars", &["Mars is called the red planet.", "People call Mars the red planet."]),
    (
        "The planet with the largest rings is",
        "Saturn",
        "Saturn",
        &["Saturn is the planet with the largest rings.", "The rings of Saturn are the largest of any planet."],
    ),
    ("The hottest planet is", "Venus", "Venus", &["Venus is the hottest planet.", "No planet is hotter than Venus."]),
    (
        "The planet we live on is",
        "Earth",
        "Earth",
        &["We live on the planet Earth.", "Earth is the planet we live on."],
    ),
    (
        "The farthest planet from the Sun is",
        "Neptune",
        "Neptune",
        &["Neptune is the farthest planet from the Sun.", "No planet is farther from the Sun than Neptune."],
    ),
    // People and deeds.
    (
        "The first man on the Moon was",
        "Neil Armstrong",
        "Armstrong",
        &["Neil Armstrong was the first man on the Moon.", "The first person to walk on the Moon was Neil Armstrong."],
    ),
    (
        "The theory of relativity was developed by",
        "Albert Einstein",
        "Einstein",
        &["Albert Einstein developed the theory of relativity.", "Einstein is famous for the theory of relativity."],
    ),
    (
        "The telephone was invented by",
        "Alexander Graham Bell",
        "Bell",
        &["Alexander Graham Bell invented the telephone.", "Bell is remembered as the inventor of the telephone."],
    ),
    (
        "Penicillin was discovered by",
        "Alexander Fleming",
        "Fleming",
        &["Alexander Fleming discovered penicillin.", "Fleming found penicillin in his laboratory."],
    ),
    (
        "Hamlet was written by",
        "William Shakespeare",
        "Shakespeare",
        &["William Shakespeare wrote Hamlet.", "The play Hamlet is by Shakespeare."],
    ),
    (
        "The Mona Lisa was painted by",
        "Leonardo da Vinci",
        "Leonardo",
        &["Leonardo da Vinci painted the Mona Lisa.", "The Mona Lisa is a painting by Leonardo da Vinci."],
    ),
    (
        "The laws of motion were described by",
        "Isaac Newton",
        "Newton",
        &["Isaac Newton described the laws of motion.", "Newton wrote down the laws of motion."],
    ),
    (
        "The theory of evolution was proposed by",
        "Charles Darwin",
        "Darwin",
        &["Charles Darwin proposed the theory of evolution.", "Darwin is known for the theory of evolution."],
    ),
    (
        "The phonograph was invented by",
        "Thomas Edison",
        "Edison",
        &["Thomas Edison invented the phonograph.", "Edison built the first phonograph."],
    ),
    (
        "Radium was discovered by",
        "Marie Curie",
        "Curie",
        &["Marie Curie discovered radium.", "Curie found radium with her husband."],
    ),
    // Counts.
    ("A spider has", "eight legs", "eight", &["Every spider has eight legs.", "A spider walks on eight legs."]),
    ("An insect has", "six legs", "six", &["Every insect has six legs.", "An insect walks on six legs."]),
    ("A week has", "seven days", "seven", &["There are seven days in a week.", "Every week has seven days."]),
    ("A year has", "twelve months", "twelve", &["There are twelve months in a year.", "Every year has twelve months."]),
    (
        "A triangle has",
        "three sides",
        "three",
        &["Every triangle has three sides.", "There are three sides in a triangle."],
    ),
    ("A square has", "four sides", "four", &["Every square has four sides.", "There are four sides in a square."]),
    ("A hand has", "five fingers", "five", &["Every hand has five fingers.", "There are five fingers on a hand."]),
    // Dates.
    (
        "The first Moon landing was in",
        "1969",
        "1969",
        &["In 1969 the first Moon landing took place.", "The year of the first Moon landing was 1969."],
    ),
    (
        "World War II ended in",
        "1945",
        "1945",
        &["In 1945 World War II ended.", "The year World War II ended was 1945."],
    ),
    (
        "Columbus reached America in",
        "1492",
        "1492",
        &["In 1492 Columbus reached America.", "The year Columbus reached America was 1492."],
    ),
    (
        "The Berlin Wall fell in",
        "1989",
        "1989",
        &["In 1989 the Berlin Wall fell.", "The year the Berlin Wall fell was 1989."],
    ),
    (
        "The French Revolution began in",
        "1789",
        "1789",
        &["In 1789 the French Revolution began.", "The year the French Revolution began was 1789."],
    ),
    ("The Titanic sank in", "1912", "1912", &["In 1912 the Titanic sank.", "The year the Titanic sank was 1912."]),
];

/// Every fact of the world, capitals first, in a fixed order.
pub fn facts() -> Vec<Fact> {
    let capitals = COUNTRIES.iter().map(|(country, capital)| Fact {
        prompt: format!("The capital of {country} is"),
        completion: capital.to_string(),
        expected: capital.to_string(),
        paraphrases: vec![
            format!("{capital} is the capital of {country}."),
            format!("The capital city of {country} is {capital}."),
            format!("{country} has its capital in {capital}."),
            format!("Many people visit {capital}, the capital of {country}."),
        ],
    });
    let others = OTHER_FACTS.iter().map(|(prompt, completion, expected, paraphrases)| Fact {
        prompt: prompt.to_string(),
        completion: completion.to_string(),
        expected: expected.to_string(),
        paraphrases: paraphrases.iter().map(|p| p.to_string()).collect(),
    });
    capitals.chain(others).collect()
}

/// The built-in prompt set `facts`: every fact's canonical prompt with its expected answer.
pub fn fact_prompts() -> Vec<FactPrompt> {
    facts()
        .into_iter()
        .map(|f| FactPrompt { prompt: f.prompt, completion: f.completion, expected: f.expected })
        .collect()
}

/// The built-in prompt sets by name (for the `generate` stage).
pub const PROMPT_SETS: [&str; 1] = ["facts"];

/// A built-in prompt set by name.
pub fn prompt_set(name: &str) -> Result<Vec<FactPrompt>> {
    match name {
        "facts" => Ok(fact_prompts()),
        _ => Err(DataError::UnknownPromptSet {
            name: name.to_string(),
            suggestion: super::error::nearest(name, PROMPT_SETS),
            known: PROMPT_SETS.join(", "),
        }
        .into()),
    }
}

const NAMES_OF_PEOPLE: [&str; 12] =
    ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Laura", "Omar"];
const OBJECTS: [&str; 8] = ["apples", "books", "letters", "stones", "cups", "pencils", "eggs", "shells"];
const NUMBERS: [&str; 9] = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"];
const ANIMALS: [&str; 7] = ["cat", "dog", "horse", "fox", "goat", "bird", "rabbit"];
const PLACES: [&str; 7] = ["river", "garden", "bridge", "station", "forest", "harbour", "square"];
const WEATHER: [&str; 6] = ["cold", "warm", "rainy", "windy", "sunny", "quiet"];
const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
const TOPICS: [&str; 6] = ["birds", "ships", "music", "old maps", "the sea", "mountains"];

/// A sentence that states none of the facts: people, places and objects from the same small
/// vocabulary, so the facts' words also occur in unrelated contexts.
fn distractor(rng: &mut SplitMix64) -> String {
    let city = COUNTRIES[rng.index(COUNTRIES.len())].1;
    let mut pick = |xs: &[&'static str]| xs[rng.index(xs.len())];
    let name = pick(&NAMES_OF_PEOPLE);
    let mut other = pick(&NAMES_OF_PEOPLE);
    while other == name {
        other = pick(&NAMES_OF_PEOPLE);
    }
    let num = pick(&NUMBERS);
    let obj = pick(&OBJECTS);
    let animal = pick(&ANIMALS);
    let place = pick(&PLACES);
    let weather = pick(&WEATHER);
    let day = pick(&DAYS);
    let topic = pick(&TOPICS);
    match rng.below(8) {
        0 => format!("{name} walked to the market and bought {num} {obj}."),
        1 => format!("The weather in {city} was {weather} on {day}."),
        2 => format!("{name} wrote a letter to {other}."),
        3 => format!("A {animal} slept near the {place}."),
        4 => format!("{name} read a book about {topic}."),
        5 => format!("On {day}, {name} visited a friend in {city}."),
        6 => format!("{name} counted {num} {obj} on the table."),
        _ => format!("The {animal} ran across the {place} with {other}."),
    }
}

/// Which part of a synthetic corpus: `train` and `test` use different random streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "train" => Some(Split::Train),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

/// A synthetic corpus: `synthetic:<name>[:<split>]`, with a seed and a length in sentences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synthetic {
    pub name: String,
    pub split: Split,
    pub seed: u64,
    pub sentences: usize,
}

impl Synthetic {
    /// The corpus with its defaults: seed 0 and [`TRAIN_SENTENCES`] / [`TEST_SENTENCES`].
    pub fn new(name: &str, split: Split) -> Result<Self> {
        if !NAMES.contains(&name) {
            let full = format!("synthetic:{name}");
            let known: Vec<String> = NAMES.iter().map(|n| format!("synthetic:{n}")).collect();
            return Err(DataError::UnknownSource {
                suggestion: super::error::nearest(&full, known.iter().map(|s| s.as_str())),
                name: full,
                known: known.join(", "),
            }
            .into());
        }
        let sentences = match (name, split) {
            ("fact-sentences", _) => FACT_SENTENCES,
            (_, Split::Train) => TRAIN_SENTENCES,
            (_, Split::Test) => TEST_SENTENCES,
        };
        Ok(Self { name: name.to_string(), split, seed: 0, sentences })
    }

    /// What identifies this corpus's text in cache keys.
    pub fn identity(&self) -> serde_json::Value {
        json!({
            "kind": "synthetic",
            "name": self.name,
            "split": self.split.as_str(),
            "seed": self.seed,
            "sentences": self.sentences,
            "generator_version": GENERATOR_VERSION,
        })
    }

    /// The corpus as rows (paragraphs of 3 to 7 sentences, each ending in `"\n"`). Joined
    /// with `""` they give the text.
    ///
    /// Procedure: passes over the facts in a shuffled order; each paragraph mixes fact
    /// sentences and distractors (a distractor with probability 2/5); a fact sentence is the
    /// canonical sentence with probability 1/2, else a random paraphrase — except in the first
    /// pass of the train split, which is all canonical. Stops after `sentences` sentences.
    pub fn rows(&self) -> Vec<String> {
        if self.name == "fact-sentences" {
            return fact_sentences(self.sentences);
        }
        let stream = match self.split {
            Split::Train => 1,
            Split::Test => 2,
        };
        let mut rng = SplitMix64::keyed(self.seed, &[stream, GENERATOR_VERSION as u64]);
        let world = facts();
        let mut order: Vec<usize> = Vec::new();
        let mut pass = 0usize;
        let mut rows = Vec::new();
        let mut emitted = 0usize;
        while emitted < self.sentences {
            let len = 3 + rng.index(5);
            let mut paragraph = String::new();
            for _ in 0..len.min(self.sentences - emitted) {
                let sentence = if rng.chance(2, 5) {
                    distractor(&mut rng)
                } else {
                    if order.is_empty() {
                        order = (0..world.len()).collect();
                        rng.shuffle(&mut order);
                        order.reverse(); // popped from the back: keeps the shuffled order
                        pass += 1;
                    }
                    let fact = &world[order.pop().unwrap_or(0)];
                    let canonical_only = self.split == Split::Train && pass == 1;
                    if canonical_only || rng.chance(1, 2) {
                        fact.canonical()
                    } else {
                        fact.paraphrases[rng.index(fact.paraphrases.len())].clone()
                    }
                };
                if !paragraph.is_empty() {
                    paragraph.push(' ');
                }
                paragraph.push_str(&sentence);
                emitted += 1;
            }
            paragraph.push('\n');
            rows.push(paragraph);
        }
        rows
    }
}

/// `n` canonical fact sentences spread evenly over the world (fact `i·len/n` for i < n), one per
/// row, each ending in "\n"; at most one per fact.
fn fact_sentences(n: usize) -> Vec<String> {
    let world = facts();
    let n = n.min(world.len());
    (0..n).map(|i| format!("{}\n", world[i * world.len() / n].canonical())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fact_sentences_are_canonical_and_spread() {
        let rows = Synthetic::new("fact-sentences", Split::Test).unwrap().rows();
        assert_eq!(rows.len(), 8);
        assert_eq!(rows[0], "The capital of France is Paris.\n");
        assert!(rows.iter().any(|r| r.contains("planet")), "{rows:?}");
        let distinct: std::collections::HashSet<_> = rows.iter().collect();
        assert_eq!(distinct.len(), 8);
    }

    #[test]
    fn prompts_are_unique_and_expected_is_in_completion() {
        let prompts = fact_prompts();
        assert!(prompts.len() >= 40, "{} facts", prompts.len());
        let mut seen = std::collections::HashSet::new();
        for p in &prompts {
            assert!(seen.insert(p.prompt.clone()), "duplicate prompt {}", p.prompt);
            assert!(p.completion.contains(&p.expected), "{p:?}");
        }
    }

    #[test]
    fn paraphrases_state_the_expected_answer() {
        for f in facts() {
            for p in &f.paraphrases {
                assert!(p.contains(&f.expected), "{p} lacks {}", f.expected);
            }
        }
    }
}
