//! Text sources as named in pipelines (`data = ...`), their identities and their text.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use super::{
    error::{nearest, DataError},
    file,
    hub::{HubOptions, WikiText, CONFIGS, SPLITS, WIKITEXT_REPO, WIKITEXT_REVISION},
    lines::{hf_text_rows, join_rows},
    synthetic::{self, Split, Synthetic},
    text::Text,
};

/// How WikiText rows are joined by default: the Wanda/SparseGPT protocol's `"\n\n".join(rows)`.
/// Local files are joined with it too (it only matters for a directory or the WikiText rule).
pub const DEFAULT_JOIN: &str = "\n\n";

/// How a local file becomes rows (`rows = ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowMode {
    /// `rows = "wikitext"`: one row per line, exactly as the HF `wikitext` dataset reads its
    /// files (see [`hf_text_rows`]), so that a WikiText file read this way, joined with
    /// `"\n\n"`, equals the hub split. The default for WikiText's own file names
    /// ([`is_wikitext_file_name`]); opt-in for any other file.
    WikiText,
    /// `rows = "file"`: the whole file is one row, its content unchanged. The default.
    File,
}

impl RowMode {
    /// The values `rows` accepts.
    pub const NAMES: [&'static str; 3] = ["file", "wikitext", "lines"];

    /// `"lines"` is the WikiText rule's first name, still accepted.
    pub fn parse(s: &str) -> Option<RowMode> {
        match s {
            "file" => Some(RowMode::File),
            "wikitext" | "lines" => Some(RowMode::WikiText),
            _ => None,
        }
    }

    /// The name in the source's identity. The WikiText rule keeps its first name, `"lines"`, so
    /// the keys of stages reading a WikiText file did not change when it was renamed.
    fn as_str(self) -> &'static str {
        match self {
            RowMode::WikiText => "lines",
            RowMode::File => "file",
        }
    }

    /// The default for a local path: the WikiText rule for WikiText's own files, else as-is.
    pub fn default_for(path: &Path) -> RowMode {
        match path.file_name().and_then(|n| n.to_str()) {
            Some(name) if is_wikitext_file_name(name) => RowMode::WikiText,
            _ => RowMode::File,
        }
    }
}

/// The file names of the WikiText releases (`wiki.train.raw`, `wiki.valid.raw`, `wiki.test.raw`
/// and their `.tokens` twins, in WikiText-2 and WikiText-103 alike): `wiki.<anything>.raw` or
/// `wiki.<anything>.tokens`.
pub fn is_wikitext_file_name(name: &str) -> bool {
    name.strip_prefix("wiki.")
        .and_then(|rest| rest.strip_suffix(".raw").or_else(|| rest.strip_suffix(".tokens")))
        .is_some_and(|middle| !middle.is_empty())
}

/// A text source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local file, or a directory whose files are read in name order.
    File { path: PathBuf, rows: RowMode, join: String },
    /// A WikiText split from the hub, at the pinned revision.
    WikiText { wikitext: WikiText, join: String },
    /// A generated corpus.
    Synthetic(Synthetic),
}

const TABLE_KEYS: [&str; 6] = ["path", "name", "rows", "join", "seed", "sentences"];

impl Source {
    /// Every source name that a string may hold.
    pub fn known_names() -> Vec<String> {
        let mut names = Vec::new();
        for config in CONFIGS {
            for split in SPLITS {
                names.push(format!("{config}:{split}"));
            }
        }
        for name in synthetic::NAMES {
            names.push(format!("synthetic:{name}"));
            names.push(format!("synthetic:{name}:train"));
            names.push(format!("synthetic:{name}:test"));
        }
        names
    }

    /// A named source: `wikitext-2-raw-v1:<split>`, `wikitext-2-v1:<split>` (split = `test`,
    /// `validation` or `train`), `synthetic:<name>` (its train split) or
    /// `synthetic:<name>:<train|test>`.
    pub fn parse_name(name: &str) -> Result<Self> {
        let unknown = || {
            let known = Self::known_names();
            DataError::UnknownSource {
                name: name.to_string(),
                suggestion: nearest(name, known.iter().map(|s| s.as_str())),
                known: known.join(", "),
            }
        };
        if let Some(rest) = name.strip_prefix("synthetic:") {
            let (corpus, split) = match rest.split_once(':') {
                Some((c, s)) => (c, Split::parse(s).ok_or_else(unknown)?),
                None => (rest, Split::Train),
            };
            return Ok(Source::Synthetic(Synthetic::new(corpus, split)?));
        }
        let (config, split) = name.split_once(':').ok_or_else(unknown)?;
        if !CONFIGS.contains(&config) || !SPLITS.contains(&split) {
            return Err(unknown().into());
        }
        Ok(Source::WikiText {
            wikitext: WikiText { config: config.to_string(), split: split.to_string() },
            join: DEFAULT_JOIN.to_string(),
        })
    }

    /// A pipeline's `data = ...` value: a name (string), or a table
    /// `{ path = "...", rows = "file" | "wikitext", join = "\n\n" }` (`rows` defaults to
    /// [`RowMode::default_for`] the path),
    /// `{ name = "wikitext-2-raw-v1:train", join = " " }` or
    /// `{ name = "synthetic:facts:test", seed = 1, sentences = 500 }`.
    pub fn from_value(value: &Value) -> Result<Self> {
        let invalid = |reason: String| DataError::Invalid { value: value.to_string(), reason };
        let table = match value {
            Value::String(name) => return Self::parse_name(name),
            Value::Object(table) => table,
            _ => return Err(invalid("expected a name or a table with `path` or `name`".into()).into()),
        };
        for key in table.keys() {
            if !TABLE_KEYS.contains(&key.as_str()) {
                let hint = nearest(key, TABLE_KEYS).map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default();
                return Err(invalid(format!("unknown key `{key}`{hint}; keys: {}", TABLE_KEYS.join(", "))).into());
            }
        }
        let string = |key: &str| -> Result<Option<String>> {
            match table.get(key) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(invalid(format!("`{key}` must be a string, not {other}")).into()),
            }
        };
        let integer = |key: &str| -> Result<Option<u64>> {
            match table.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| invalid(format!("`{key}` must be a non-negative integer, not {v}")).into()),
            }
        };
        let only = |allowed: &[&str], what: &str| -> Result<()> {
            match table.keys().find(|k| !allowed.contains(&k.as_str())) {
                Some(k) => Err(invalid(format!("`{k}` does not apply to {what}")).into()),
                None => Ok(()),
            }
        };
        let join = string("join")?;
        match (string("path")?, string("name")?) {
            (Some(path), None) => {
                only(&["path", "rows", "join"], "a local file")?;
                let rows = match string("rows")?.as_deref() {
                    None => RowMode::default_for(Path::new(&path)),
                    Some(name) => RowMode::parse(name).ok_or_else(|| {
                        let hint = nearest(name, RowMode::NAMES)
                            .map(|s| format!(" (did you mean \"{s}\"?)"))
                            .unwrap_or_default();
                        invalid(format!(
                            "`rows` is \"file\" (each file as it is, the default) or \"wikitext\" (one row per \
                             line by the WikiText dataset's rule, the default for wiki.*.raw files), not \
                             \"{name}\"{hint}"
                        ))
                    })?,
                };
                Ok(Source::File {
                    path: PathBuf::from(path),
                    rows,
                    join: join.unwrap_or_else(|| DEFAULT_JOIN.to_string()),
                })
            }
            (None, Some(name)) => match Self::parse_name(&name)? {
                Source::WikiText { wikitext, .. } => {
                    only(&["name", "join"], "a WikiText source")?;
                    Ok(Source::WikiText { wikitext, join: join.unwrap_or_else(|| DEFAULT_JOIN.to_string()) })
                }
                Source::Synthetic(mut s) => {
                    only(&["name", "seed", "sentences"], "a synthetic source")?;
                    if let Some(seed) = integer("seed")? {
                        s.seed = seed;
                    }
                    if let Some(n) = integer("sentences")? {
                        s.sentences = usize::try_from(n).context("`sentences` is too large")?;
                    }
                    Ok(Source::Synthetic(s))
                }
                Source::File { .. } => unreachable!("names never parse to files"),
            },
            _ => Err(invalid("a table needs exactly one of `path` and `name`".into()).into()),
        }
    }

    /// Makes a relative local path relative to `base` (e.g. the pipeline file's directory).
    pub fn with_base_dir(mut self, base: &Path) -> Self {
        if let Source::File { path, .. } = &mut self {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        self
    }

    /// A short human-readable name, for logs and reports.
    pub fn display_name(&self) -> String {
        match self {
            Source::File { path, .. } => path.display().to_string(),
            Source::WikiText { wikitext, .. } => wikitext.name(),
            Source::Synthetic(s) => format!("synthetic:{}:{}", s.name, s.split.as_str()),
        }
    }

    /// What identifies the source's text in cache keys: for local files the blake3 of their
    /// contents (not their path), for hub data the repo, revision, config and split, for
    /// synthetic corpora the generator version and parameters; plus how rows are joined.
    pub fn identity(&self) -> Result<Value> {
        Ok(match self {
            Source::File { path, rows, join } => json!({
                "kind": "file",
                "blake3": file::source_digest(path)?,
                "dir": path.is_dir(),
                "rows": rows.as_str(),
                "join": join,
            }),
            Source::WikiText { wikitext, join } => json!({
                "kind": "hub",
                "repo": WIKITEXT_REPO,
                "revision": WIKITEXT_REVISION,
                "config": wikitext.config,
                "split": wikitext.split,
                "join": join,
            }),
            Source::Synthetic(s) => s.identity(),
        })
    }

    /// The source's rows (before joining), reading the hub through `hub`.
    pub fn rows_with(&self, hub: &HubOptions) -> Result<Vec<String>> {
        match self {
            Source::File { path, rows, .. } => {
                let mut out = Vec::new();
                for f in file::list_files(path)? {
                    let content = file::read_text(&f)?;
                    match rows {
                        RowMode::WikiText => out.extend(hf_text_rows(&content)),
                        RowMode::File => out.push(content),
                    }
                }
                Ok(out)
            }
            Source::WikiText { wikitext, .. } => wikitext.rows(hub),
            Source::Synthetic(s) => Ok(s.rows()),
        }
    }

    fn join(&self) -> &str {
        match self {
            Source::File { join, .. } | Source::WikiText { join, .. } => join,
            Source::Synthetic(_) => "",
        }
    }

    /// The text (memoised per process by identity), reading the hub as the environment says
    /// ([`HubOptions::from_env`]).
    pub fn text(&self) -> Result<Arc<Text>> {
        self.text_with(&HubOptions::from_env())
    }

    /// The text: the rows joined with the source's `join` string. Memoised per process by
    /// [`Source::identity`].
    pub fn text_with(&self, hub: &HubOptions) -> Result<Arc<Text>> {
        static MEMO: OnceLock<Mutex<HashMap<String, Arc<Text>>>> = OnceLock::new();
        let key = self.identity()?.to_string();
        let memo = MEMO.get_or_init(Default::default);
        if let Some(text) = memo.lock().unwrap().get(&key) {
            return Ok(text.clone());
        }
        let rows = self.rows_with(hub).with_context(|| format!("reading data `{}`", self.display_name()))?;
        let text = Arc::new(Text { text: join_rows(&rows, self.join()), rows: rows.len() });
        tracing::debug!(data = %self.display_name(), rows = text.rows, bytes = text.bytes(), "data read");
        memo.lock().unwrap().insert(key, text.clone());
        Ok(text)
    }
}
