//! Running a plan: the `Stage` trait that stage kinds implement, the context they run in, the
//! registry of kinds, the executor, progress and session files. Names no concrete stage.

mod identity;
pub mod memory;
mod progress;
mod run;
mod session;
pub mod slurm;
pub mod threads;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Context as _, Result};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value as Json};

pub use crate::spec::schema::{
    metric_list, sometimes, ArtifactType, Default as ParamDefault, InputDef, KindSchema, MetricDef, ParamDef,
    ParamType, ReportContract, Role,
};
pub use identity::FileHasher;
pub use progress::{log_writer, LogWriter, Progress, StageProgress};
pub use run::{run, run_only, OnlyOutcome, RunOptions, RunOutcome};
pub use session::{session_path, Session};

use crate::cache::{Key, PartialDir};
use crate::spec::schema::Catalog;

/// A stage kind. Implementations live in `stages/` (and in tests).
pub trait Stage: Send + Sync {
    /// Parameters, inputs, output type, version and help: the one definition everything reads.
    fn schema(&self) -> &'static KindSchema;

    /// Extra key material known before running, e.g. the content hash of a local file a
    /// parameter names. Errors are reported as bad input (exit 2).
    fn identity(&self, _params: &Map<String, Json>, _files: &FileHasher) -> Result<Option<Json>, String> {
        Ok(None)
    }

    /// Checks resolved parameters beyond their types (typically: they deserialize into the
    /// stage's typed struct). Called by `validate` and before `run`.
    fn check(&self, _params: &Map<String, Json>) -> Result<(), String> {
        Ok(())
    }

    /// Computes the artifact: writes files into `ctx.out_dir` and returns the metrics object.
    fn run(&self, ctx: &StageContext) -> Result<Json>;

    /// True for a kind that needs the machine (the device's memory) to itself: with `--jobs`
    /// nothing else runs beside it. A fine-tune of the 2B model holds ~50–70 GB.
    fn runs_alone(&self) -> bool {
        false
    }

    /// Its roles for readers of sessions and every top-level metric `run` writes; the report
    /// reads instances by role, never by kind name. A kind with none appears in flat rows only.
    fn report(&self) -> &'static ReportContract {
        &ReportContract::NONE
    }
}

/// Deserializes resolved parameters into a stage's typed struct (use `deny_unknown_fields`).
pub fn typed_params<T: DeserializeOwned>(params: &Map<String, Json>) -> Result<T, String> {
    serde_json::from_value(Json::Object(params.clone())).map_err(|e| format!("invalid parameters: {e}"))
}

/// A committed output another stage reads.
#[derive(Clone, Debug)]
pub struct InputArtifact {
    pub slot: String,
    pub instance: String,
    pub kind: String,
    pub key: Key,
    /// The cache entry's directory (read-only).
    pub dir: PathBuf,
    pub metrics: Json,
}

/// Set by Ctrl-C; stages poll it in their loops and return [`Cancelled`].
#[derive(Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The error a stage returns when it stopped because of the cancellation flag.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Cancelled;

/// Everything a stage may use while running.
pub struct StageContext<'a> {
    pub pipeline: &'a str,
    pub instance: &'a str,
    pub key: Key,
    pub params: &'a Map<String, Json>,
    pub inputs: Vec<InputArtifact>,
    /// Where the artifact files go (a temporary directory committed atomically afterwards).
    pub out_dir: &'a Path,
    /// Resumable state for long stages (`cache/partial/<key>/`).
    pub partial: &'a PartialDir,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: &'a str,
    /// The pipeline file's folder: relative paths in parameters resolve against it.
    pub base_dir: &'a Path,
    pub progress: &'a StageProgress<'a>,
    pub cancel: &'a CancelFlag,
}

impl StageContext<'_> {
    pub fn params<T: DeserializeOwned>(&self) -> Result<T> {
        typed_params(self.params).map_err(|e| anyhow!("stage `{}`: {e}", self.instance))
    }
    pub fn input(&self, slot: &str) -> Result<&InputArtifact> {
        self.inputs
            .iter()
            .find(|i| i.slot == slot)
            .with_context(|| format!("stage `{}` has no input `{slot}`", self.instance))
    }
    /// `path` resolved against the pipeline file's folder (unchanged when absolute).
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.base_dir.join(path)
    }
    /// Returns `Err(Cancelled)` once Ctrl-C was pressed.
    pub fn check_cancelled(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            Err(Cancelled.into())
        } else {
            Ok(())
        }
    }
}

/// The stage kinds a binary knows.
#[derive(Default)]
pub struct Registry {
    stages: Vec<Box<dyn Stage>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }
    pub fn register(&mut self, stage: impl Stage + 'static) -> &mut Registry {
        assert!(self.get(stage.schema().kind).is_none(), "stage kind `{}` registered twice", stage.schema().kind);
        self.stages.push(Box::new(stage));
        self
    }
    pub fn get(&self, kind: &str) -> Option<&dyn Stage> {
        self.stages.iter().find(|s| s.schema().kind == kind).map(|s| s.as_ref())
    }
    pub fn catalog(&self) -> Catalog<'_> {
        Catalog { kinds: self.stages.iter().map(|s| s.schema()).collect() }
    }
    pub fn iter(&self) -> impl Iterator<Item = &dyn Stage> {
        self.stages.iter().map(|s| s.as_ref())
    }
    /// The roles a kind declares (none for a kind this registry does not know).
    pub fn roles(&self, kind: &str) -> Vec<Role> {
        self.get(kind).map(|s| s.report().roles.to_vec()).unwrap_or_default()
    }
}

/// Identifies external inputs for keys: the registry's kinds with a file hasher.
pub struct Identifier<'a> {
    pub registry: &'a Registry,
    pub files: &'a FileHasher,
}

impl crate::plan::Identity for Identifier<'_> {
    fn identity(&self, kind: &str, params: &Map<String, Json>) -> Result<Option<Json>, String> {
        let stage = self.registry.get(kind).ok_or_else(|| format!("unknown stage kind `{kind}`"))?;
        stage.check(params)?;
        stage.identity(params, self.files)
    }
}
