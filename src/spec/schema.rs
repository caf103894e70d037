//! What a stage kind accepts: its parameters, input slots and output artifact type. Declared once
//! per kind; the validator, `rpt-flow stages`, defaults and hashing all read these definitions.

use serde_json::Value as Json;

/// What a stage produces and what an input slot accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ArtifactType {
    /// A model directory in Hugging Face layout (config.json, model.safetensors, tokenizer files).
    Model,
    /// Only metrics (no files needed downstream).
    Metrics,
    /// Generated or prepared text.
    Text,
    /// Tensors of activations or statistics.
    Tensors,
}

impl ArtifactType {
    /// With an article where English wants one: "a model", "metrics".
    pub fn noun(self) -> &'static str {
        match self {
            ArtifactType::Model => "a model",
            other => other.name(),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ArtifactType::Model => "model",
            ArtifactType::Metrics => "metrics",
            ArtifactType::Text => "text",
            ArtifactType::Tensors => "tensors",
        }
    }
}

/// The type of a parameter value.
#[derive(Clone, Copy, Debug)]
pub enum ParamType {
    Bool,
    Int {
        min: Option<i64>,
        max: Option<i64>,
    },
    /// Integers are accepted and stored as floats.
    Float {
        min: Option<f64>,
        max: Option<f64>,
    },
    Str,
    /// One of these strings.
    Enum(&'static [&'static str]),
    List(&'static ParamType),
    /// Any table (checked by the stage itself).
    Table,
    /// Any one of these types (the first that fits).
    Either(&'static [ParamType]),
    /// Anything.
    Any,
}

impl ParamType {
    pub const INT: ParamType = ParamType::Int { min: None, max: None };
    pub const UINT: ParamType = ParamType::Int { min: Some(0), max: None };
    pub const FLOAT: ParamType = ParamType::Float { min: None, max: None };
    pub const FRACTION: ParamType = ParamType::Float { min: Some(0.0), max: Some(1.0) };

    /// Human description, e.g. "a float in [0, 1]", "one of \"a\", \"b\"".
    pub fn describe(&self) -> String {
        match self {
            ParamType::Bool => "a boolean".into(),
            ParamType::Int { min, max } => {
                format!("an integer{}", range_text(min.map(|x| x as f64), max.map(|x| x as f64)))
            }
            ParamType::Float { min, max } => format!("a number{}", range_text(*min, *max)),
            ParamType::Str => "a string".into(),
            ParamType::Enum(options) => {
                format!("one of {}", options.iter().map(|o| format!("\"{o}\"")).collect::<Vec<_>>().join(", "))
            }
            ParamType::List(inner) => format!("a list of {}", strip_article(&inner.describe())),
            ParamType::Table => "a table".into(),
            ParamType::Either(options) => options.iter().map(|o| o.describe()).collect::<Vec<_>>().join(" or "),
            ParamType::Any => "any value".into(),
        }
    }

    /// Short name for `rpt-flow stages`.
    pub fn short(&self) -> String {
        match self {
            ParamType::Bool => "bool".into(),
            ParamType::Int { .. } => "int".into(),
            ParamType::Float { .. } => "float".into(),
            ParamType::Str => "string".into(),
            ParamType::Enum(options) => options.join("|"),
            ParamType::List(inner) => format!("[{}]", inner.short()),
            ParamType::Table => "table".into(),
            ParamType::Either(options) => options.iter().map(|o| o.short()).collect::<Vec<_>>().join(" | "),
            ParamType::Any => "any".into(),
        }
    }
}

fn strip_article(s: &str) -> String {
    s.strip_prefix("an ").or_else(|| s.strip_prefix("a ")).map(|r| format!("{r}s")).unwrap_or_else(|| s.to_string())
}

fn range_text(min: Option<f64>, max: Option<f64>) -> String {
    match (min, max) {
        (Some(a), Some(b)) => format!(" in [{a}, {b}]"),
        (Some(a), None) => format!(" ≥ {a}"),
        (None, Some(b)) => format!(" ≤ {b}"),
        (None, None) => String::new(),
    }
}

/// The default of a parameter.
#[derive(Clone, Copy, Debug)]
pub enum Default {
    /// Must be given.
    Required,
    /// May be absent; then it is absent from the resolved parameters.
    Optional,
    /// The pipeline's `seed` (so changing `[pipeline] seed` reaches only stages that use one).
    PipelineSeed,
    /// This value, written as JSON.
    Json(&'static str),
}

impl Default {
    pub fn value(&self, pipeline_seed: i64) -> Option<Json> {
        match self {
            Default::Required | Default::Optional => None,
            Default::PipelineSeed => Some(Json::from(pipeline_seed)),
            Default::Json(s) => Some(serde_json::from_str(s).expect("stage default is valid JSON")),
        }
    }
    pub fn describe(&self) -> String {
        match self {
            Default::Required => "required".into(),
            Default::Optional => "optional".into(),
            Default::PipelineSeed => "pipeline seed".into(),
            Default::Json(s) => s.to_string(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ParamDef {
    pub name: &'static str,
    pub ty: ParamType,
    pub default: Default,
    pub help: &'static str,
}

/// A named input slot: its value in TOML is the name of another stage.
#[derive(Clone, Copy, Debug)]
pub struct InputDef {
    pub name: &'static str,
    pub ty: ArtifactType,
    pub required: bool,
    pub help: &'static str,
}

/// Everything the validator and planner need to know about a stage kind.
#[derive(Debug)]
pub struct KindSchema {
    pub kind: &'static str,
    /// Bump when the stage's results change for the same parameters; old cache entries then stop
    /// matching.
    pub version: u32,
    pub help: &'static str,
    pub inputs: &'static [InputDef],
    pub params: &'static [ParamDef],
    pub output: ArtifactType,
}

impl KindSchema {
    pub fn param(&self, name: &str) -> Option<&ParamDef> {
        self.params.iter().find(|p| p.name == name)
    }
    pub fn input(&self, name: &str) -> Option<&InputDef> {
        self.inputs.iter().find(|p| p.name == name)
    }
    /// Every key a stage table of this kind may hold.
    pub fn keys(&self) -> impl Iterator<Item = &'static str> + '_ {
        std::iter::once("kind").chain(self.inputs.iter().map(|i| i.name)).chain(self.params.iter().map(|p| p.name))
    }
}

/// The set of stage kinds a pipeline may use.
pub struct Catalog<'a> {
    pub kinds: Vec<&'a KindSchema>,
}

impl<'a> Catalog<'a> {
    pub fn get(&self, kind: &str) -> Option<&'a KindSchema> {
        self.kinds.iter().copied().find(|k| k.kind == kind)
    }
    pub fn names(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.kinds.iter().map(|k| k.kind)
    }
}

/// What a kind's results are to readers of a session (the report): where its instances sit in a
/// model's lineage and which tables and plots their metrics feed. Kinds declare their roles
/// (`Stage::report`); the executor records them per instance in the session file, so the report
/// finds "the perplexity measurements" or "the pruning steps" without knowing kind names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Makes a model from outside the graph: a lineage root, a row of the models table.
    Source,
    /// Derives a model by pruning its input: a sparsity level of the tables.
    Prune,
    /// Derives a model by training its input: "tuned" in the tables, the loss plot.
    Train,
    /// Perplexity of its input model: the perplexity tables and the sparsity plot.
    Perplexity,
    /// Text generated from its input model: the text column and the generation table.
    Generation,
    /// Residual-stream statistics and interventions: the residual tables and plots.
    Residuals,
    /// A perturbation followed through the layers: the perturbation table and growth plot.
    Perturbation,
    /// Multiple-choice task accuracy of its input model: the task columns of the tables.
    Tasks,
    /// Derives a model by replacing its attention (holographic): a row of the attention table.
    Swap,
    /// Forward speed and memory of its input model over sequence lengths: the speed table and
    /// its log-log plot.
    Speed,
    /// A network trained by equilibrium propagation or by its true gradient: the equilibrium
    /// table (loss, held-out perplexity, wall time, EP's cosine to the true gradient) and the
    /// loss curves of its methods.
    Equilibrium,
    /// A role this version does not know (a newer writer's).
    #[serde(other)]
    Unknown,
}

impl Role {
    pub const ALL: [Role; 11] = [
        Role::Source,
        Role::Prune,
        Role::Train,
        Role::Perplexity,
        Role::Generation,
        Role::Residuals,
        Role::Perturbation,
        Role::Tasks,
        Role::Swap,
        Role::Speed,
        Role::Equilibrium,
    ];

    /// The top-level metrics the report reads from an instance in this role: a kind declaring
    /// the role must declare each of them (a test checks), and the report reads no others.
    pub fn reads(self) -> &'static [&'static str] {
        match self {
            Role::Source => {
                &["arch", "dtype", "quantization", "parameters", "layers", "hidden_size", "ternary_zero_fraction"]
            }
            Role::Prune => &["sparsity", "target_sparsity", "ternary_zero_before", "ternary_zero_after"],
            Role::Train => &[
                "steps",
                "final_loss",
                "tokens_per_second",
                "seconds",
                "sparsity_after",
                "ternary_zero_after",
                "loss",
                "first_batch",
                "criticality",
            ],
            Role::Perplexity => &["ppl", "bits_per_byte", "tokens", "windows", "protocol"],
            Role::Generation => &["label", "outputs", "counts", "accuracy"],
            // Perplexity and generations under an intervention (and the clean baseline beside them).
            Role::Residuals => {
                &["layers", "windows", "tokens", "intervention", "ppl", "protocol", "label", "outputs", "counts"]
            }
            Role::Perturbation => &[
                "delta",
                "local_exponents",
                "lyapunov",
                "amplification",
                "lyapunov_from_embedding",
                "amplification_from_embedding",
                "peak_layer",
                "branching",
                "scale",
                "eps",
            ],
            Role::Tasks => &["task", "items", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "num_fewshot"],
            Role::Swap => &["attention", "window", "regions", "boundary_dim", "layers", "reach"],
            Role::Speed => &["attention", "device", "batch", "lengths", "max_position_embeddings"],
            Role::Equilibrium => &[
                "method",
                "data",
                "eval_data",
                "steps",
                "loss",
                "final_loss",
                "ppl",
                "unigram_ppl",
                "seconds",
                "cosine_mean",
            ],
            Role::Unknown => &[],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Prune => "prune",
            Role::Train => "train",
            Role::Perplexity => "perplexity",
            Role::Generation => "generation",
            Role::Residuals => "residuals",
            Role::Perturbation => "perturbation",
            Role::Tasks => "tasks",
            Role::Swap => "swap",
            Role::Speed => "speed",
            Role::Equilibrium => "equilibrium",
            Role::Unknown => "unknown",
        }
    }
}

/// One top-level metric a kind writes.
#[derive(Clone, Copy, Debug)]
pub struct MetricDef {
    pub name: &'static str,
    /// Written on every successful run (otherwise only in some configurations).
    pub always: bool,
    pub help: &'static str,
}

impl MetricDef {
    /// The same metric, written only in some configurations (e.g. a shared group a kind writes
    /// only when asked to).
    pub const fn sometimes(self) -> MetricDef {
        MetricDef { always: false, ..self }
    }
}

/// `a` then `b`, in a constant: a kind's metric list built from groups declared where shared
/// code writes them (`N` must be `A + B`).
pub const fn metric_list<const A: usize, const B: usize, const N: usize>(
    a: [MetricDef; A],
    b: [MetricDef; B],
) -> [MetricDef; N] {
    assert!(A + B == N, "metric_list: N must be A + B");
    let mut out = [MetricDef { name: "", always: false, help: "" }; N];
    let mut i = 0;
    while i < A {
        out[i] = a[i];
        i += 1;
    }
    while i < N {
        out[i] = b[i - A];
        i += 1;
    }
    out
}

/// Each metric of `group`, marked [`MetricDef::sometimes`].
pub const fn sometimes<const N: usize>(group: [MetricDef; N]) -> [MetricDef; N] {
    let mut out = group;
    let mut i = 0;
    while i < N {
        out[i] = group[i].sometimes();
        i += 1;
    }
    out
}

/// What a kind contributes to reports: its roles and every top-level metric it writes.
#[derive(Debug)]
pub struct ReportContract {
    pub roles: &'static [Role],
    pub metrics: &'static [MetricDef],
}

impl ReportContract {
    /// Metrics only, drawn by no table (the flat rows still carry them).
    pub const NONE: ReportContract = ReportContract { roles: &[], metrics: &[] };

    pub fn metric(&self, name: &str) -> Option<&MetricDef> {
        self.metrics.iter().find(|m| m.name == name)
    }
}
