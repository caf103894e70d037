//! The `data = …` parameter that several stages share: its definition, its check, and its
//! contribution to the cache key (the source's identity: name+split+revision, or content hash).

use serde_json::{json, Value as Json};

use crate::data::Source;
use crate::exec::{ParamDef, ParamDefault, ParamType};

pub const DATA: ParamDef = ParamDef {
    name: "data",
    ty: ParamType::Either(&[ParamType::Str, ParamType::Table]),
    default: ParamDefault::Required,
    help: "text source: \"wikitext-2-raw-v1:test\", \"synthetic:facts:test\", { path = \"file\" }",
};

/// `seq_len`, `max_windows`, `bos` of the analysis stages, which read eval-ppl's `chunks` windows.
pub const WINDOW_SEQ_LEN: ParamDef = ParamDef {
    name: "seq_len",
    ty: ParamType::Int { min: Some(2), max: None },
    default: ParamDefault::Json("2048"),
    help: "window length in tokens (eval-ppl's `chunks` windows)",
};
pub const WINDOW_MAX: ParamDef = ParamDef {
    name: "max_windows",
    ty: ParamType::Int { min: Some(1), max: None },
    default: ParamDefault::Optional,
    help: "use only the first N windows",
};
pub const WINDOW_BOS: ParamDef = ParamDef {
    name: "bos",
    ty: ParamType::Enum(&["none", "stream-start", "window-start"]),
    default: ParamDefault::Json("\"stream-start\""),
    help: "where BOS goes, as in eval-ppl",
};

/// The source a `data` value names, with errors phrased for the validator.
pub fn source(data: &Json) -> Result<Source, String> {
    Source::from_value(data).map_err(|e| format!("data: {e:#}"))
}

/// Key material of a `data` value: `{ "data": <source identity> }`.
pub fn identity(data: &Json) -> Result<Option<Json>, String> {
    let id = source(data)?.identity().map_err(|e| format!("data: {e:#}"))?;
    Ok(Some(json!({ "data": id })))
}
