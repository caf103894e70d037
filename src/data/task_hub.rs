//! The downstream tasks researchers compare with lm-evaluation-harness, read from the hub's
//! dataset repos (parquet) at pinned revisions and formatted as the harness's 0.4.9 task configs
//! do: ARC-Easy and ARC-Challenge, HellaSwag (with its preprocessing), PIQA, WinoGrande (partial
//! scoring) and MMLU (57 subjects, its description and A–D prompt, first-n few-shot examples from
//! `dev`). docs/tasks.md names the revisions and files.

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value as Json};

use super::hub::{dataset_file, HubOptions};
use super::lines::py_strip;
use super::parquet_io::read_rows;
use super::tasks::{Fewshot, McItem, McTask, Scoring};

/// A task's dataset: repo, pinned revision, and the parquet files of its evaluated and few-shot
/// splits.
#[derive(Clone, Copy, Debug)]
pub struct HubDataset {
    pub repo: &'static str,
    pub revision: &'static str,
    pub eval_file: &'static str,
    pub fewshot_file: &'static str,
}

/// The hub tasks by name (`mmlu:<subject>` selects one MMLU subject).
pub const NAMES: [&str; 6] = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "mmlu"];

const ARC: &str = "allenai/ai2_arc";
const ARC_REV: &str = "210d026faf9955653af8916fad021475a3f00453";
const MMLU: &str = "cais/mmlu";
const MMLU_REV: &str = "c30699e8356da336a370243923dbaf21066bb9fe";

/// The dataset of a hub task name (`None` for an unknown one).
pub fn dataset(name: &str) -> Option<HubDataset> {
    let d = |repo, revision, eval_file, fewshot_file| Some(HubDataset { repo, revision, eval_file, fewshot_file });
    match name.split_once(':').map_or(name, |(n, _)| n) {
        "arc_easy" => d(ARC, ARC_REV, "ARC-Easy/test-00000-of-00001.parquet", "ARC-Easy/train-00000-of-00001.parquet"),
        "arc_challenge" => {
            d(ARC, ARC_REV, "ARC-Challenge/test-00000-of-00001.parquet", "ARC-Challenge/train-00000-of-00001.parquet")
        }
        "hellaswag" => d(
            "Rowan/hellaswag",
            "218ec52e09a7e7462a5400043bb9a69a41d06b76",
            "data/validation-00000-of-00001.parquet",
            "data/train-00000-of-00001.parquet",
        ),
        "piqa" => {
            d("baber/piqa", "142f6d7367fd9877f0fb3b5734ea6a545f54cdd1", "piqa_validation.parquet", "piqa_train.parquet")
        }
        "winogrande" => d(
            "allenai/winogrande",
            "01e74176c63542e6b0bcb004dcdea22d94fb67b5",
            "winogrande_xl/validation-00000-of-00001.parquet",
            "winogrande_xl/train-00000-of-00001.parquet",
        ),
        "mmlu" => d(MMLU, MMLU_REV, "all/test-00000-of-00001.parquet", "all/dev-00000-of-00001.parquet"),
        _ => None,
    }
}

/// Checks a hub task name: one of [`NAMES`], or `mmlu:<subject>`.
pub fn check_name(name: &str) -> Result<()> {
    match name.split_once(':') {
        Some(("mmlu", subject)) if MMLU_SUBJECTS.iter().any(|(s, _)| *s == subject) => Ok(()),
        Some(("mmlu", subject)) => bail!(
            "`{subject}` is not an MMLU subject{}",
            super::error::nearest(subject, MMLU_SUBJECTS.iter().map(|(s, _)| *s))
                .map(|n| format!(" (did you mean `{n}`?)"))
                .unwrap_or_default()
        ),
        None if NAMES.contains(&name) => Ok(()),
        _ => bail!(
            "task `{name}` is not known: the hub tasks are {}, and mmlu:<subject>{}",
            NAMES.join(", "),
            super::error::nearest(name, NAMES).map(|n| format!(" (did you mean `{n}`?)")).unwrap_or_default()
        ),
    }
}

/// What identifies a hub task's items in cache keys: the repo, revision and files (all pinned).
pub fn identity(name: &str) -> Result<Json> {
    check_name(name)?;
    let d = dataset(name).context("a checked name has a dataset")?;
    Ok(json!({
        "kind": "hub-task", "name": name, "repo": d.repo, "revision": d.revision,
        "eval_file": d.eval_file, "fewshot_file": d.fewshot_file, "format": "lm-evaluation-harness 0.4.9",
    }))
}

/// The task's items, fetched through the hub cache (few-shot examples only when asked for).
pub fn load(name: &str, hub: &HubOptions, with_fewshot: bool) -> Result<McTask> {
    check_name(name)?;
    let d = dataset(name).context("a checked name has a dataset")?;
    let rows = |file: &str| -> Result<Vec<Json>> {
        let path = dataset_file(hub, d.repo, d.revision, file)?;
        read_rows(&path).with_context(|| format!("reading {} of {}@{}", file, d.repo, &d.revision[..8]))
    };
    let eval = rows(d.eval_file)?;
    let pool = if with_fewshot { Some(rows(d.fewshot_file)?) } else { None };
    format(name, &eval, pool.as_deref())
}

/// Formats dataset rows as the harness's task config does.
pub fn format(name: &str, eval: &[Json], pool: Option<&[Json]>) -> Result<McTask> {
    let base = name.split_once(':').map_or(name, |(n, _)| n);
    let convert: fn(&Json) -> Result<McItem> = match base {
        "arc_easy" | "arc_challenge" => arc_item,
        "hellaswag" => hellaswag_item,
        "piqa" => piqa_item,
        "winogrande" => winogrande_item,
        "mmlu" => mmlu_item,
        _ => bail!("task `{name}` is not known"),
    };
    let subject = name.strip_prefix("mmlu:");
    let keep = |row: &&Json| subject.is_none_or(|s| row["subject"].as_str() == Some(s));
    let items = |rows: &[Json]| -> Result<Vec<(McItem, String)>> {
        rows.iter()
            .filter(keep)
            .enumerate()
            .map(|(i, r)| {
                let item = convert(r).with_context(|| format!("{name}: row {i}"))?;
                Ok((item, r["subject"].as_str().unwrap_or_default().to_string()))
            })
            .collect()
    };
    let eval = items(eval)?;
    if eval.is_empty() {
        bail!("{name}: the dataset has no items");
    }
    let pool = pool.map(items).transpose()?;
    let mmlu = base == "mmlu";
    let (items, subjects): (Vec<McItem>, Vec<String>) = eval.into_iter().unzip();
    let pool_subjects: Option<Vec<String>> = pool.as_ref().map(|p| p.iter().map(|(_, s)| s.clone()).collect());
    Ok(McTask {
        name: name.to_string(),
        items,
        fewshot_pool: pool.map(|p| p.into_iter().map(|(i, _)| i).collect()),
        description: String::new(),
        scoring: if base == "winogrande" { Scoring::Partial } else { Scoring::Continuation },
        // MMLU: each item's subject names its description and its few-shot examples (the first
        // n of that subject's `dev` rows, the harness's `first_n` sampler).
        subjects: mmlu.then_some(subjects),
        pool_subjects: if mmlu { pool_subjects } else { None },
        fewshot: if mmlu { Fewshot::FirstNOfSubject } else { Fewshot::Seeded },
    })
}

/// The description MMLU puts before a subject's items.
pub fn mmlu_description(subject: &str) -> String {
    format!("The following are multiple choice questions (with answers) about {}.\n\n", subject.replace('_', " "))
}

fn text(row: &Json, field: &str) -> Result<String> {
    row[field].as_str().map(str::to_string).with_context(|| format!("field `{field}` is not a string: {}", row[field]))
}

fn strings(v: &Json, what: &str) -> Result<Vec<String>> {
    v.as_array()
        .with_context(|| format!("`{what}` is not a list: {v}"))?
        .iter()
        .map(|x| x.as_str().map(str::to_string).with_context(|| format!("`{what}` holds a non-string: {x}")))
        .collect()
}

fn index(v: &Json, what: &str) -> Result<usize> {
    match v {
        Json::Number(n) => n.as_u64().map(|n| n as usize),
        Json::String(s) => s.parse().ok(),
        _ => None,
    }
    .with_context(|| format!("`{what}` is not an index: {v}"))
}

fn checked(text: String, choices: Vec<String>, gold: usize) -> Result<McItem> {
    if gold >= choices.len() {
        bail!("the gold index {gold} is not one of {} choices", choices.len());
    }
    Ok(McItem { text, choices, gold })
}

/// `Question: {{question}}\nAnswer:`; choices `choices.text`; gold `choices.label.index(answerKey)`.
fn arc_item(row: &Json) -> Result<McItem> {
    let choices = strings(&row["choices"]["text"], "choices.text")?;
    let labels = strings(&row["choices"]["label"], "choices.label")?;
    let key = text(row, "answerKey")?;
    let gold = labels.iter().position(|l| *l == key).with_context(|| format!("answerKey `{key}` is not a label"))?;
    checked(format!("Question: {}\nAnswer:", text(row, "question")?), choices, gold)
}

/// The harness's `utils.process_docs`: `activity_label: ctx_a Ctx_b`, preprocessed.
fn hellaswag_item(row: &Json) -> Result<McItem> {
    let ctx = format!("{} {}", text(row, "ctx_a")?, py_capitalize(&text(row, "ctx_b")?));
    let query = hellaswag_preprocess(&format!("{}: {ctx}", text(row, "activity_label")?));
    let choices = strings(&row["endings"], "endings")?.iter().map(|e| hellaswag_preprocess(e)).collect();
    checked(query, choices, index(&row["label"], "label")?)
}

/// strip; " [title]" → ". "; drop `[…]` (within a line, shortest); "  " → " ".
pub fn hellaswag_preprocess(s: &str) -> String {
    let s = py_strip(s).replace(" [title]", ". ");
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find([']', '\n']) {
            Some(close) if after.as_bytes()[close] == b']' => rest = &after[close + 1..],
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

/// Python's `str.capitalize`: the first character upper case, the rest lower case.
fn py_capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars.flat_map(char::to_lowercase)).collect(),
        None => String::new(),
    }
}

/// `Question: {{goal}}\nAnswer:`; choices `[sol1, sol2]`; gold `label`.
fn piqa_item(row: &Json) -> Result<McItem> {
    let choices = vec![text(row, "sol1")?, text(row, "sol2")?];
    checked(format!("Question: {}\nAnswer:", text(row, "goal")?), choices, index(&row["label"], "label")?)
}

/// Partial scoring: the choices are the sentence up to the blank with each option, the text is
/// what follows the blank (stripped); gold `answer` "1"/"2".
fn winogrande_item(row: &Json) -> Result<McItem> {
    let sentence = text(row, "sentence")?;
    let blank = sentence.find('_').context("the sentence has no blank `_`")?;
    let target = py_strip(&sentence[blank + 1..]).to_string();
    let choices = vec![
        format!("{}{}", &sentence[..blank], text(row, "option1")?),
        format!("{}{}", &sentence[..blank], text(row, "option2")?),
    ];
    let gold = match text(row, "answer")?.as_str() {
        "1" => 0,
        "2" => 1,
        other => bail!("answer `{other}` is not 1 or 2"),
    };
    checked(target, choices, gold)
}

/// `{{question.strip()}}\nA. …\nB. …\nC. …\nD. …\nAnswer:`; choices A–D; gold `answer`.
fn mmlu_item(row: &Json) -> Result<McItem> {
    let c = strings(&row["choices"], "choices")?;
    if c.len() != 4 {
        bail!("MMLU items have four choices, this one {}", c.len());
    }
    let text =
        format!("{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:", py_strip(&text(row, "question")?), c[0], c[1], c[2], c[3]);
    checked(text, ["A", "B", "C", "D"].map(String::from).to_vec(), index(&row["answer"], "answer")?)
}

/// The parquet schemas of the task datasets, as the hub's files have them (tests write files
/// in these shapes).
pub mod schemas {
    const STRINGS: &str = "(LIST) { repeated group list { optional binary element (STRING); } }";
    pub fn arc() -> String {
        format!(
            "message schema {{ optional binary id (STRING); optional binary question (STRING); \
             optional group choices {{ optional group text {STRINGS} optional group label {STRINGS} }} \
             optional binary answerKey (STRING); }}"
        )
    }
    pub fn hellaswag() -> String {
        format!(
            "message schema {{ optional int32 ind; optional binary activity_label (STRING); \
             optional binary ctx_a (STRING); optional binary ctx_b (STRING); optional binary ctx (STRING); \
             optional group endings {STRINGS} optional binary source_id (STRING); optional binary split (STRING); \
             optional binary split_type (STRING); optional binary label (STRING); }}"
        )
    }
    pub fn piqa() -> String {
        "message schema { optional binary goal (STRING); optional binary sol1 (STRING); \
         optional binary sol2 (STRING); optional int64 label; }"
            .to_string()
    }
    pub fn winogrande() -> String {
        "message schema { optional binary sentence (STRING); optional binary option1 (STRING); \
         optional binary option2 (STRING); optional binary answer (STRING); }"
            .to_string()
    }
    pub fn mmlu() -> String {
        format!(
            "message schema {{ optional binary question (STRING); optional binary subject (STRING); \
             optional group choices {STRINGS} optional int64 answer; }}"
        )
    }
}

/// The 57 MMLU subjects with the harness's category (stem, other, social_sciences, humanities).
pub const MMLU_SUBJECTS: [(&str, &str); 57] = [
    ("abstract_algebra", "stem"),
    ("anatomy", "stem"),
    ("astronomy", "stem"),
    ("business_ethics", "other"),
    ("clinical_knowledge", "other"),
    ("college_biology", "stem"),
    ("college_chemistry", "stem"),
    ("college_computer_science", "stem"),
    ("college_mathematics", "stem"),
    ("college_medicine", "other"),
    ("college_physics", "stem"),
    ("computer_security", "stem"),
    ("conceptual_physics", "stem"),
    ("econometrics", "social_sciences"),
    ("electrical_engineering", "stem"),
    ("elementary_mathematics", "stem"),
    ("formal_logic", "humanities"),
    ("global_facts", "other"),
    ("high_school_biology", "stem"),
    ("high_school_chemistry", "stem"),
    ("high_school_computer_science", "stem"),
    ("high_school_european_history", "humanities"),
    ("high_school_geography", "social_sciences"),
    ("high_school_government_and_politics", "social_sciences"),
    ("high_school_macroeconomics", "social_sciences"),
    ("high_school_mathematics", "stem"),
    ("high_school_microeconomics", "social_sciences"),
    ("high_school_physics", "stem"),
    ("high_school_psychology", "social_sciences"),
    ("high_school_statistics", "stem"),
    ("high_school_us_history", "humanities"),
    ("high_school_world_history", "humanities"),
    ("human_aging", "other"),
    ("human_sexuality", "social_sciences"),
    ("international_law", "humanities"),
    ("jurisprudence", "humanities"),
    ("logical_fallacies", "humanities"),
    ("machine_learning", "stem"),
    ("management", "other"),
    ("marketing", "other"),
    ("medical_genetics", "other"),
    ("miscellaneous", "other"),
    ("moral_disputes", "humanities"),
    ("moral_scenarios", "humanities"),
    ("nutrition", "other"),
    ("philosophy", "humanities"),
    ("prehistory", "humanities"),
    ("professional_accounting", "other"),
    ("professional_law", "humanities"),
    ("professional_medicine", "other"),
    ("professional_psychology", "social_sciences"),
    ("public_relations", "social_sciences"),
    ("security_studies", "social_sciences"),
    ("sociology", "social_sciences"),
    ("us_foreign_policy", "social_sciences"),
    ("virology", "other"),
    ("world_religions", "humanities"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    /// Expected strings are what the harness's `preprocess` (Python `re`) returns for them.
    fn hellaswag_text_is_preprocessed_as_the_harness_does() {
        assert_eq!(
            hellaswag_preprocess("  Making a cake [title] Mix the flour.  [step] Stir.  "),
            "Making a cake. Mix the flour.  Stir."
        );
        assert_eq!(hellaswag_preprocess("a [b\nc] d"), "a [b\nc] d", "`.` does not cross a line");
        assert_eq!(hellaswag_preprocess("x [a] [b] y"), "x  y", "one pass of the replacement, as Python's");
        assert_eq!(py_capitalize("tHE man"), "The man");
        let row = json!({
            "activity_label": "Baking cookies", "ctx_a": "A woman mixes dough.", "ctx_b": "she",
            "endings": ["puts it in the oven. [title] Wait.", "eats it"], "label": "0"
        });
        let item = hellaswag_item(&row).unwrap();
        assert_eq!(item.text, "Baking cookies: A woman mixes dough. She");
        assert_eq!(item.choices, ["puts it in the oven.. Wait.", "eats it"]);
    }

    #[test]
    fn dataset_rows_survive_parquet_in_the_hub_schemas() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                schemas::arc(),
                json!({"id": "q1", "question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]}, "answerKey": "B"}),
            ),
            (
                schemas::hellaswag(),
                json!({"ind": 4, "activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx": "A man cuts onions. he", "ctx_b": "he", "endings": ["cries.", "sings.", "", "runs."], "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"}),
            ),
            (
                schemas::piqa(),
                json!({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0}),
            ),
            (schemas::winogrande(), json!({"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "2"})),
            (
                schemas::mmlu(),
                json!({"question": "2+2?", "subject": "anatomy", "choices": ["1", "2", "3", "4"], "answer": 3}),
            ),
        ];
        for (i, (schema, row)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("{i}.parquet"));
            let empty = json!({"choices": {"text": [], "label": null}});
            let rows = if i == 0 { vec![row.clone(), empty.clone()] } else { vec![row.clone()] };
            crate::data::parquet_io::write_rows(&path, schema, &rows).unwrap();
            let back = read_rows(&path).unwrap();
            assert_eq!(back[0], *row, "{schema}");
            if i == 0 {
                assert_eq!(back[1]["choices"]["text"], json!([]), "an empty list stays one");
                assert!(back[1]["question"].is_null() && back[1]["choices"]["label"].is_null());
            }
        }
    }

    #[test]
    fn rows_become_the_harness_prompts() {
        let arc = json!({"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["1", "2"]}, "answerKey": "2"});
        assert_eq!(
            arc_item(&arc).unwrap(),
            McItem {
                text: "Question: Which is a gas?\nAnswer:".into(),
                choices: vec!["ice".into(), "steam".into()],
                gold: 1
            }
        );
        let w = json!({"sentence": "Ann gave Bea a gift because _ was kind.", "option1": "Ann", "option2": "Bea", "answer": "1"});
        let item = winogrande_item(&w).unwrap();
        assert_eq!((item.text.as_str(), item.gold), ("was kind.", 0));
        assert_eq!(item.choices, ["Ann gave Bea a gift because Ann", "Ann gave Bea a gift because Bea"]);
        let m = json!({"question": " What is 2+2? ", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1});
        let item = mmlu_item(&m).unwrap();
        assert_eq!(item.text, "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:");
        assert_eq!((item.choices.len(), item.gold), (4, 1));
        assert_eq!(
            mmlu_description("high_school_us_history"),
            "The following are multiple choice questions (with answers) about high school us history.\n\n"
        );
        assert!(
            check_name("mmlu:anatomy").is_ok()
                && check_name("mmlu:anatomi").unwrap_err().to_string().contains("`anatomy`")
        );
        assert!(check_name("arc-easy").unwrap_err().to_string().contains("`arc_easy`"));
    }
}
