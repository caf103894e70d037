//! Models that ship inside the binary (`builtin:<name>`): `tiny-bitnet`, a 0.86M-parameter
//! BitNet b1.58 trained by `pipelines/tiny-pretrain.toml` on the synthetic facts corpus
//! (regenerate with `scripts/update-tiny-bitnet.sh`; bump `version` when its files change).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde_json::Value as Json;

/// A model embedded in the binary: its files by name.
struct Builtin {
    name: &'static str,
    version: u32,
    files: &'static [(&'static str, &'static [u8])],
}

const BUILTINS: &[Builtin] = &[Builtin {
    name: "tiny-bitnet",
    version: 1,
    files: &[
        ("config.json", include_bytes!("../../../assets/tiny-bitnet/config.json")),
        ("model.safetensors", include_bytes!("../../../assets/tiny-bitnet/model.safetensors")),
        ("tokenizer.json", include_bytes!("../../../assets/tiny-bitnet/tokenizer.json")),
    ],
}];

/// Key material of a builtin, or None if there is no such builtin.
pub fn identity(name: &str) -> Option<Json> {
    BUILTINS.iter().find(|b| b.name == name).map(|b| serde_json::json!({ "builtin": b.name, "version": b.version }))
}

pub fn unknown(name: &str) -> String {
    let names: Vec<&str> = BUILTINS.iter().map(|b| b.name).collect();
    if names.is_empty() {
        format!("no builtin model `{name}`: this rpt-flow ships none yet")
    } else {
        format!("no builtin model `{name}`; builtins: {}", names.join(", "))
    }
}

/// Writes the builtin's files into `out` and returns the directory to load from.
pub fn materialise(name: &str, out: &Path) -> Result<PathBuf> {
    let Some(builtin) = BUILTINS.iter().find(|b| b.name == name) else { bail!("{}", unknown(name)) };
    for (file, bytes) in builtin.files {
        std::fs::write(out.join(file), bytes)?;
    }
    Ok(out.to_path_buf())
}
