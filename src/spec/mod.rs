//! The TOML pipeline language: parsing with source spans, profiles and `--set` overrides, sweep
//! expansion, `$variable` substitution, parameter typing and input resolution. Knows nothing of
//! models; the stage kinds it accepts come in as a [`schema::Catalog`].
//!
//! The result is a [`Pipeline`]: a flat list of stage instances with fully resolved parameters
//! and the instances each one reads.

pub mod diag;
pub mod executor;
mod expand;
pub mod node;
mod overrides;
pub mod params;
pub mod schema;

use std::path::{Path, PathBuf};

use serde_json::{Map, Value as Json};

pub use diag::{Diagnostic, Source, Span, SpecErrors};
use node::Node;
use schema::Catalog;

/// Profiles and `--set` overrides given on the command line.
#[derive(Clone, Debug, Default)]
pub struct SpecOptions {
    pub profiles: Vec<String>,
    /// `path=value` strings.
    pub sets: Vec<String>,
}

/// A resolved pipeline: every instance with its final parameters.
#[derive(Debug)]
pub struct Pipeline {
    pub name: String,
    pub seed: i64,
    pub description: String,
    pub file: PathBuf,
    pub options: SpecOptions,
    /// Names of all profiles the file defines.
    pub profiles: Vec<String>,
    pub instances: Vec<Instance>,
    /// Texts that spans point into (the file, then each `--set`).
    pub sources: Vec<Source>,
    /// The file's `[executor.slurm]` table, if any (never part of a key).
    pub slurm: Option<executor::SlurmSettings>,
}

/// One stage instance: a top-level stage, or a template stage at one sweep point.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Stable, readable name: `baseline`, `level[sparsity=0.1].tuned`.
    pub name: String,
    pub kind: String,
    /// Resolved parameters: schema defaults ← `[defaults.<kind>]` ← stage table ← overrides.
    pub params: Map<String, Json>,
    pub inputs: Vec<InputRef>,
    /// Where the stage is defined (its `kind` value).
    pub span: Span,
    /// Where each parameter written in the stage's table (or set on it by a profile or `--set`)
    /// has its value: errors about a parameter point there.
    pub param_spans: Vec<(String, Span)>,
    pub sweep: Option<SweepPoint>,
}

#[derive(Debug, Clone)]
pub struct InputRef {
    pub slot: String,
    /// Index into `Pipeline::instances`.
    pub target: usize,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct SweepPoint {
    pub sweep: String,
    pub template: String,
    /// Position of the point in the sweep's order.
    pub index: usize,
    pub values: Vec<(String, Json)>,
}

impl Instance {
    /// Where an error message about this instance points: the value of the parameter it starts
    /// with (`"data: cannot read …"`), when the stage's table wrote it, else the stage's `kind`.
    pub fn span_of_error(&self, message: &str) -> &Span {
        let param = message.split_once(": ").map(|(p, _)| p);
        self.param_spans.iter().find(|(k, _)| Some(k.as_str()) == param).map_or(&self.span, |(_, s)| s)
    }
}

impl Pipeline {
    pub fn instance(&self, name: &str) -> Option<usize> {
        self.instances.iter().position(|i| i.name == name)
    }

    /// The pipeline file's folder: relative paths in its parameters resolve against it.
    pub fn base_dir(&self) -> PathBuf {
        match self.file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// Errors located in this pipeline's sources.
    pub fn errors(&self, diagnostics: Vec<Diagnostic>) -> SpecErrors {
        SpecErrors { sources: self.sources.clone(), diagnostics }
    }
}

/// Reads, checks and expands a pipeline file. Every problem found is reported, not just the first.
pub fn load(path: &Path, catalog: &Catalog, options: &SpecOptions) -> Result<Pipeline, SpecErrors> {
    let display = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return Err(SpecErrors {
                sources: vec![],
                diagnostics: vec![Diagnostic::new(format!("cannot read pipeline file `{display}`: {e}"), None)
                    .help("check the path; pipelines live in pipelines/*.toml")],
            })
        }
    };
    parse(&display, &text, catalog, options)
}

/// As [`load`], from text already in memory; `name` is used in locations.
pub fn parse(name: &str, text: &str, catalog: &Catalog, options: &SpecOptions) -> Result<Pipeline, SpecErrors> {
    let mut sources = vec![Source::new(name, text)];
    let doc = match toml::de::DeTable::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let span = e.span().map(|r| Span::new(0, r));
            let message = format!("invalid TOML: {}", e.message().trim());
            return Err(SpecErrors { sources, diagnostics: vec![Diagnostic::new(message, span)] });
        }
    };
    let mut root = Node::from_toml(&doc, 0);
    let mut diags = Vec::new();

    let mut sets = Vec::new();
    for set in &options.sets {
        sources.push(Source::new("--set", set.clone()));
        match parse_set(set, sources.len() - 1) {
            Ok(ov) => sets.push(ov),
            Err(d) => diags.push(d),
        }
    }
    let file_stem = Path::new(name).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let pipeline = expand::build(&mut root, catalog, options, sets, &file_stem, &mut diags);
    let slurm = executor::read(&root, catalog, &mut diags);
    if !diags.is_empty() {
        return Err(SpecErrors { sources, diagnostics: diags });
    }
    let (name_, seed, description, profiles, instances) = pipeline.expect("no diagnostics means a pipeline");
    // The applied profiles in file order (the order they are applied in), each once: the same
    // run whatever the command-line order, so the same session file name.
    let mut options = options.clone();
    options.profiles = profiles.iter().filter(|p| options.profiles.contains(p)).cloned().collect();
    Ok(Pipeline {
        name: name_,
        seed,
        description,
        file: PathBuf::from(name),
        options,
        profiles,
        instances,
        sources,
        slurm,
    })
}

/// `path=value`; the value is read as TOML when it parses (numbers, booleans, arrays, quoted
/// strings, inline tables) and as a plain string otherwise (`builtin:tiny-bitnet`).
fn parse_set(arg: &str, source: usize) -> Result<overrides::Override, Diagnostic> {
    let whole = Span::new(source, 0..arg.len());
    let Some(eq) = arg.find('=') else {
        return Err(Diagnostic::at(&whole, format!("`--set {arg}` has no `=`"))
            .help("write --set path=value, e.g. --set defaults.finetune.steps=20"));
    };
    let path = arg[..eq].trim();
    let raw = &arg[eq + 1..];
    let value_span = Span::new(source, eq + 1..arg.len());
    let value = match toml::de::DeTable::parse(&format!("v = {raw}")) {
        Ok(doc) if doc.get_ref().len() == 1 => {
            let n = Node::from_toml(&doc, source);
            let mut v = n.get("v").expect("parsed key").value.clone();
            reanchor(&mut v, &value_span);
            v
        }
        _ => Node { val: node::Val::Str(raw.to_string()), span: value_span },
    };
    Ok(overrides::Override { path: path.to_string(), path_span: Span::new(source, 0..eq), value })
}

/// Points every span of a `--set` value at the value's text.
fn reanchor(node: &mut Node, span: &Span) {
    node.span = span.clone();
    match &mut node.val {
        node::Val::Array(items) => items.iter_mut().for_each(|n| reanchor(n, span)),
        node::Val::Table(entries) => entries.iter_mut().for_each(|e| {
            e.key_span = span.clone();
            reanchor(&mut e.value, span)
        }),
        _ => {}
    }
}
