//! `eval-ppl`: perplexity of a model on a text source under an explicit protocol (chunks =
//! Wanda/SparseGPT, llama-cpp, rolling), echoed in the metrics next to the number.

use std::time::Instant;

use anyhow::Result;
use serde_json::{json, Map, Value as Json};

use crate::data::Protocol;
use crate::exec::{
    metric_list, typed_params, ArtifactType, FileHasher, InputDef, KindSchema, MetricDef, ParamDefault, ParamType,
    ReportContract, Role, Stage, StageContext,
};
use crate::stages::common::model_artifact as artifact;
use crate::stages::common::scoring;
use crate::stages::common::text_param;

pub static SCHEMA: KindSchema = KindSchema {
    kind: "eval-ppl",
    version: 2,
    help: "Perplexity (and bits per byte) on a text source under a named protocol.",
    inputs: &[InputDef { name: "input", ty: ArtifactType::Model, required: true, help: "the model to evaluate" }],
    params: Params::PARAMS,
    output: ArtifactType::Metrics,
};

crate::stage_params! {
    struct Params {
        data: Json = text_param::DATA,
        protocol: String {
            ty: ParamType::Enum(&Protocol::NAMES),
            default: ParamDefault::Json("\"chunks\""),
            help: "chunks = Wanda/SparseGPT windows; llama-cpp = second half of each chunk; rolling = strided; rpt-notebook = range(0, n-L, L) windows; texts = each row its own window (token-weighted)",
        },
        encode: String = text_param::ENCODE,
        min_row_chars: usize = text_param::MIN_ROW_CHARS,
        seq_len: usize {
            ty: ParamType::Int { min: Some(2), max: Some(1_048_576) },
            default: ParamDefault::Json("2048"),
            help: "window length in tokens",
        },
        stride: Option<usize> {
            ty: ParamType::Int { min: Some(1), max: Some(1_048_576) },
            default: ParamDefault::Optional,
            help: "rolling only: tokens between window starts",
        },
        batch: usize {
            ty: ParamType::Int { min: Some(1), max: Some(65_536) },
            default: ParamDefault::Json("1"),
            help: "windows per forward pass",
        },
        #[serde(default, deserialize_with = "text_param::de_max_windows")]
        max_windows: Option<usize> {
            ty: text_param::MAX_WINDOWS_TYPE,
            default: ParamDefault::Optional,
            help: "evaluate only the first N windows (\"all\": every window)",
        },
        bos: String {
            ty: ParamType::Enum(&["none", "stream-start", "window-start"]),
            default: ParamDefault::Json("\"stream-start\""),
            help: "where BOS goes: nowhere, once before the text (Wanda), or at each window start (llama.cpp)",
        },
    }
}

/// Its role for reports and every top-level metric `run` writes.
pub static REPORT: ReportContract = ReportContract { roles: &[Role::Perplexity], metrics: &METRICS };

/// What the scoring writes, and the throughput.
static METRICS: [MetricDef; 7] = metric_list(
    scoring::PPL_METRICS,
    [MetricDef { name: "tokens_per_second", always: true, help: "scoring throughput" }],
);

pub struct EvalPpl;

impl Stage for EvalPpl {
    fn schema(&self) -> &'static KindSchema {
        &SCHEMA
    }

    fn report(&self) -> &'static ReportContract {
        &REPORT
    }

    fn check(&self, params: &Map<String, Json>) -> Result<(), String> {
        let p: Params = typed_params(params)?;
        let protocol = Protocol::parse(&p.protocol, p.stride).map_err(|e| format!("{e:#}"))?;
        protocol.check_seq_len(p.seq_len).map_err(|e| format!("{e:#}"))?;
        text_param::protocol_encoding(&protocol, &p.encode, p.min_row_chars, &p.bos)?;
        text_param::source(&p.data)?;
        Ok(())
    }

    fn identity(&self, params: &Map<String, Json>, files: &FileHasher) -> Result<Option<Json>, String> {
        let p: Params = typed_params(params)?;
        text_param::identity(&p.data, files)
    }

    fn run(&self, ctx: &StageContext) -> Result<Json> {
        let p: Params = ctx.params()?;
        let device = artifact::device(ctx.device)?;
        let open = artifact::open_for_inference(ctx.input("input")?, &device)?;
        let protocol = Protocol::parse(&p.protocol, p.stride)?;
        let encoding =
            text_param::protocol_encoding(&protocol, &p.encode, p.min_row_chars, &p.bos).map_err(anyhow::Error::msg)?;
        let selection = scoring::TextSelection::Windows { protocol, encoding };
        let eval = scoring::select_windows(&open, &p.data, selection, p.seq_len, &p.bos, p.max_windows, ctx.base_dir)?;
        let windows = &eval.windows;

        ctx.progress.set_length(windows.len() as u64);
        let started = Instant::now();
        let mut per_window = Vec::with_capacity(windows.len());
        let mut fed = 0usize;
        let (mut last_log, mut nll_sum, mut scored) = (Instant::now(), 0.0f64, 0u64);
        for (b, batch) in windows.chunks(p.batch).enumerate() {
            ctx.check_cancelled()?;
            let done_before = per_window.len();
            per_window.extend(scoring::window_nlls(&open.model, batch)?);
            for (nll, n) in &per_window[done_before..] {
                (nll_sum, scored) = (nll_sum + nll, scored + n);
            }
            fed += batch.iter().map(|w| w.input_ids.len()).sum::<usize>();
            ctx.progress.set_detail(&format!("{:.0} tok/s", fed as f64 / started.elapsed().as_secs_f64()));
            ctx.progress.set_position(((b + 1) * p.batch).min(windows.len()) as u64);
            let (done, running_nll) = (per_window.len(), nll_sum / scored.max(1) as f64);
            tracing::debug!(
                instance = %ctx.instance, windows = done, of = windows.len(), running_nll, "eval-ppl batch"
            );
            if last_log.elapsed().as_secs() >= 10 {
                last_log = Instant::now();
                let tok_per_s = fed as f64 / started.elapsed().as_secs_f64();
                tracing::info!(
                    instance = %ctx.instance,
                    windows = done,
                    of = windows.len(),
                    running_nll,
                    tok_per_s,
                    "eval-ppl progress"
                );
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let mut metrics = eval.ppl_metrics(&open, &per_window)?;
        metrics["tokens_per_second"] = json!(fed as f64 / seconds.max(1e-9));
        tracing::info!(
            instance = %ctx.instance, ppl = %metrics["ppl"], nll = %metrics["nll"], tokens = %metrics["tokens"],
            windows = windows.len(), seconds, "eval-ppl done"
        );
        Ok(metrics)
    }
}
