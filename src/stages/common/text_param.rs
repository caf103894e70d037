//! The text parameters several stages share: `data = …` (its definition, its check, and its
//! contribution to the cache key: the source's identity, name+split+revision or content hash),
//! `encode` / `min_row_chars`, and the analysis stages' [`TextParams`] group.

use std::path::Path;

use serde_json::{json, Value as Json};

use super::scoring::TextSelection;
use crate::data::{Encoding, Protocol, Source};
use crate::exec::{FileHasher, ParamDef, ParamDefault, ParamType};

pub const DATA: ParamDef = ParamDef {
    name: "data",
    ty: ParamType::Either(&[ParamType::Str, ParamType::Table]),
    default: ParamDefault::Required,
    help: "text source: \"wikitext-2-raw-v1:test\", \"synthetic:facts:test\", { path = \"file\" }",
};

/// `max_windows`: a count, or "all".
pub const MAX_WINDOWS_TYPE: ParamType =
    ParamType::Either(&[ParamType::Int { min: Some(1), max: None }, ParamType::Enum(&["all"])]);

/// Reads a `max_windows` value: absent or "all" → no limit.
pub fn de_max_windows<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    use serde::{de::Error as _, Deserialize as _};
    match Option::<Json>::deserialize(d)? {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) if s == "all" => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .map(|n| Some(n as usize))
            .ok_or_else(|| D::Error::custom(format!("max_windows: a count ≥ 1 or \"all\", not {v}"))),
    }
}

/// How rows become a token stream (eval-ppl, finetune and the analysis stages' windows).
pub const ENCODE: ParamDef = ParamDef {
    name: "encode",
    ty: ParamType::Enum(&["joined", "per-row"]),
    default: ParamDefault::Json("\"joined\""),
    help: "joined = rows joined and tokenised once (Wanda); per-row = each row stripped and tokenised alone, ids concatenated (the RPT notebooks)",
};
pub const MIN_ROW_CHARS: ParamDef = ParamDef {
    name: "min_row_chars",
    ty: ParamType::UINT,
    default: ParamDefault::Json("0"),
    help: "with encode = \"per-row\" or protocol \"texts\": skip rows shorter than this many characters after stripping (notebooks: 20)",
};

/// The encoding that `encode` and `min_row_chars` name.
pub fn encoding(encode: &str, min_row_chars: usize) -> Result<Encoding, String> {
    let e = Encoding::parse(encode, min_row_chars).map_err(|e| format!("{e:#}"))?;
    if e == Encoding::Joined && min_row_chars > 0 {
        return Err("min_row_chars applies to encode = \"per-row\" and to protocol \"texts\" (rows joined into one text are not filtered)".into());
    }
    Ok(e)
}

/// As [`encoding`] for a perplexity protocol: `texts` reads rows one by one whatever `encode`
/// says, so `min_row_chars` always applies to it; `rpt-notebook` takes no window-start BOS.
pub fn protocol_encoding(
    protocol: &Protocol,
    encode: &str,
    min_row_chars: usize,
    bos: &str,
) -> Result<Encoding, String> {
    if *protocol == Protocol::RptNotebook && bos == "window-start" {
        return Err(
            "protocol \"rpt-notebook\" takes bos = \"none\" (the notebooks) or \"stream-start\", not \"window-start\""
                .into(),
        );
    }
    if *protocol == Protocol::Texts {
        return Ok(Encoding::PerRow { min_chars: min_row_chars });
    }
    encoding(encode, min_row_chars)
}

crate::stage_params! {
    /// The text parameters of the analysis stages (hook-residuals, perturb): which texts, as
    /// eval-ppl's windows or the notebooks' per-text rows. A stage's `Params` takes them as a
    /// group (`..text: TextParams`).
    group pub struct TextParams {
        pub data: Json = DATA,
        pub texts: String {
            ty: ParamType::Enum(&["windows", "rows"]),
            default: ParamDefault::Json("\"windows\""),
            help: "windows = eval-ppl's windows (protocol); rows = one text per long row (the criticality notebook)",
        },
        pub protocol: String {
            ty: ParamType::Enum(&["chunks", "rpt-notebook"]),
            default: ParamDefault::Json("\"chunks\""),
            help: "texts = windows: how the stream is cut, as in eval-ppl",
        },
        pub encode: String = ENCODE,
        pub min_row_chars: usize = MIN_ROW_CHARS,
        pub seq_len: usize {
            ty: ParamType::Int { min: Some(2), max: Some(1_048_576) },
            default: ParamDefault::Json("2048"),
            help: "window length in tokens (eval-ppl's `chunks` windows)",
        },
        #[serde(default, deserialize_with = "de_max_windows")]
        pub max_windows: Option<usize> {
            ty: MAX_WINDOWS_TYPE,
            default: ParamDefault::Optional,
            help: "use only the first N windows (\"all\": every window, for a profile that lifts a limit)",
        },
        pub bos: String {
            ty: ParamType::Enum(&["none", "stream-start", "window-start"]),
            default: ParamDefault::Json("\"stream-start\""),
            help: "where BOS goes, as in eval-ppl",
        },
        pub texts_longer_than: usize {
            ty: ParamType::UINT,
            default: ParamDefault::Json("100"),
            help: "texts = rows: take rows whose stripped length is more than this many characters",
        },
        pub text_chars: usize {
            ty: ParamType::Int { min: Some(1), max: None },
            default: ParamDefault::Json("500"),
            help: "texts = rows: cut each row to its first N characters (then tokenise with the tokenizer's special tokens, truncate to seq_len)",
        },
        pub max_texts: usize {
            ty: ParamType::Int { min: Some(1), max: None },
            default: ParamDefault::Json("20"),
            help: "texts = rows: the first N such rows",
        },
    }
}

impl TextParams {
    /// The stage's texts as windows over `open`'s tokenizer (a relative `path` against `base`).
    pub fn windows(
        &self,
        open: &super::model_artifact::OpenModel,
        base: &Path,
    ) -> anyhow::Result<super::scoring::EvalWindows> {
        let selection = self.selection().map_err(anyhow::Error::msg)?;
        super::scoring::select_windows(open, &self.data, selection, self.seq_len, &self.bos, self.max_windows, base)
    }

    /// Which texts the stage reads.
    pub fn selection(&self) -> Result<TextSelection, String> {
        let encoding = encoding(&self.encode, self.min_row_chars)?;
        match self.texts.as_str() {
            "rows" => {
                if self.max_windows.is_some() {
                    return Err(
                        "max_windows applies to texts = \"windows\"; use max_texts with texts = \"rows\"".into()
                    );
                }
                Ok(TextSelection::Rows {
                    longer_than: self.texts_longer_than,
                    chars: self.text_chars,
                    count: self.max_texts,
                })
            }
            _ => {
                let protocol = Protocol::parse(&self.protocol, None).map_err(|e| format!("{e:#}"))?;
                protocol_encoding(&protocol, &self.encode, self.min_row_chars, &self.bos)?;
                Ok(TextSelection::Windows { protocol, encoding })
            }
        }
    }
}

/// The source a `data` value names, with errors phrased for the validator.
pub fn source(data: &Json) -> Result<Source, String> {
    Source::from_value(data).map_err(|e| format!("data: {e:#}"))
}

/// The source a `data` value names, a relative `path` resolved against `base` (the pipeline
/// file's folder).
pub fn source_at(data: &Json, base: &Path) -> anyhow::Result<Source> {
    Ok(Source::from_value(data)?.with_base_dir(base))
}

/// Key material of a `data` value: `{ "data": <source identity> }` (a local file's identity is
/// its content, so where the path is written from does not matter).
pub fn identity(data: &Json, files: &FileHasher) -> Result<Option<Json>, String> {
    let id = source(data)?.with_base_dir(files.base_dir()).identity().map_err(|e| format!("data: {e:#}"))?;
    Ok(Some(json!({ "data": id })))
}
