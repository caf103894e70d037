//! `eval-ppl`: perplexity of a model on a text source under an explicit protocol (chunks =
//! Wanda/SparseGPT, llama-cpp, rolling), echoed in the metrics next to the number.

use std::time::Instant;

use anyhow::{Context as _, Result};
use candle_core::{DType, Tensor, D};
use serde::Deserialize;
use serde_json::{json, Map, Value as Json};

use super::model_artifact as artifact;
use crate::analysis::perplexity::NllSum;
use crate::data::{self, Bos, Protocol, Source, Window, WindowOptions};
use crate::exec::{
    typed_params, ArtifactType, FileHasher, InputDef, KindSchema, ParamDef, ParamDefault, ParamType, Stage,
    StageContext,
};
use crate::model::Model;

pub static SCHEMA: KindSchema = KindSchema {
    kind: "eval-ppl",
    version: 1,
    help: "Perplexity (and bits per byte) on a text source under a named protocol.",
    inputs: &[InputDef { name: "input", ty: ArtifactType::Model, required: true, help: "the model to evaluate" }],
    params: &[
        ParamDef {
            name: "data",
            ty: ParamType::Either(&[ParamType::Str, ParamType::Table]),
            default: ParamDefault::Required,
            help: "text source: \"wikitext-2-raw-v1:test\", \"synthetic:facts:test\", { path = \"file\" }",
        },
        ParamDef {
            name: "protocol",
            ty: ParamType::Enum(&["chunks", "llama-cpp", "rolling"]),
            default: ParamDefault::Json("\"chunks\""),
            help: "chunks = Wanda/SparseGPT windows; llama-cpp = second half of each chunk; rolling = strided",
        },
        ParamDef {
            name: "seq_len",
            ty: ParamType::Int { min: Some(2), max: None },
            default: ParamDefault::Json("2048"),
            help: "window length in tokens",
        },
        ParamDef {
            name: "stride",
            ty: ParamType::Int { min: Some(1), max: None },
            default: ParamDefault::Optional,
            help: "rolling only: tokens between window starts",
        },
        ParamDef {
            name: "batch",
            ty: ParamType::Int { min: Some(1), max: None },
            default: ParamDefault::Json("1"),
            help: "windows per forward pass",
        },
        ParamDef {
            name: "max_windows",
            ty: ParamType::Int { min: Some(1), max: None },
            default: ParamDefault::Optional,
            help: "evaluate only the first N windows",
        },
        ParamDef {
            name: "bos",
            ty: ParamType::Enum(&["none", "stream-start", "window-start"]),
            default: ParamDefault::Json("\"stream-start\""),
            help: "where BOS goes: nowhere, once before the text (Wanda), or at each window start (llama.cpp)",
        },
    ],
    output: ArtifactType::Metrics,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    data: Json,
    protocol: String,
    seq_len: usize,
    stride: Option<usize>,
    batch: usize,
    max_windows: Option<usize>,
    bos: String,
}

pub struct EvalPpl;

impl Stage for EvalPpl {
    fn schema(&self) -> &'static KindSchema {
        &SCHEMA
    }

    fn check(&self, params: &Map<String, Json>) -> Result<(), String> {
        let p: Params = typed_params(params)?;
        Protocol::parse(&p.protocol, p.stride).map_err(|e| format!("{e:#}"))?;
        Source::from_value(&p.data).map_err(|e| format!("data: {e:#}"))?;
        Ok(())
    }

    fn identity(&self, params: &Map<String, Json>, _files: &FileHasher) -> Result<Option<Json>, String> {
        let p: Params = typed_params(params)?;
        let src = Source::from_value(&p.data).map_err(|e| format!("data: {e:#}"))?;
        Ok(Some(json!({ "data": src.identity().map_err(|e| format!("data: {e:#}"))? })))
    }

    fn run(&self, ctx: &StageContext) -> Result<Json> {
        let p: Params = ctx.params()?;
        let device = artifact::device(ctx.device)?;
        let open = artifact::open(ctx.input("input")?, &device)?;
        let tok = open.tokenizer()?;
        let source = Source::from_value(&p.data)?;
        let stream =
            data::token_stream(&source, &data::HubOptions::from_env(), tok.inner(), &open.tokenizer_id, false)?;
        let protocol = Protocol::parse(&p.protocol, p.stride)?;
        let opts = WindowOptions {
            seq_len: p.seq_len,
            bos: Bos::parse(&p.bos)?,
            bos_id: tok.bos_id,
            max_windows: p.max_windows,
        };
        let windows = data::windows(protocol, &stream.ids, &opts)?;

        ctx.progress.set_length(windows.len() as u64);
        let started = Instant::now();
        let mut sum = NllSum::default();
        let mut fed = 0usize;
        for (b, batch) in windows.chunks(p.batch).enumerate() {
            ctx.check_cancelled()?;
            for (nll, n) in window_nlls(&open.model, batch)? {
                sum.add(nll, n);
            }
            fed += batch.iter().map(|w| w.input_ids.len()).sum::<usize>();
            ctx.progress.set_position(((b + 1) * p.batch).min(windows.len()) as u64);
        }
        let seconds = started.elapsed().as_secs_f64();
        let bits_per_byte = match data::token_bytes(tok.inner()) {
            Ok(table) => json!(sum.bits_per_byte(data::scored_bytes(&windows, &table))),
            Err(_) => Json::Null, // not a byte-level tokenizer: bytes per token unknown
        };
        Ok(json!({
            "ppl": sum.perplexity(),
            "nll": sum.mean(),
            "tokens": sum.tokens,
            "windows": windows.len(),
            "bits_per_byte": bits_per_byte,
            "tokens_per_second": fed as f64 / seconds.max(1e-9),
            "protocol": {
                "name": p.protocol,
                "seq_len": p.seq_len,
                "stride": p.stride,
                "bos": p.bos,
                "max_windows": p.max_windows,
                "data": source.display_name(),
                "stream_tokens": stream.ids.len(),
                "text_bytes": stream.bytes,
                "model_dtype": open.settings.dtype,
                "quantization": open.settings.quantization,
            },
        }))
    }
}

/// Summed NLL (nats) and scored-token count of each window. Windows of equal length are stacked
/// into one forward pass.
fn window_nlls(model: &Model, windows: &[Window]) -> Result<Vec<(f64, u64)>> {
    let same_len = windows.iter().all(|w| w.input_ids.len() == windows[0].input_ids.len());
    if !same_len {
        return windows.iter().map(|w| window_nlls(model, std::slice::from_ref(w)).map(|v| v[0])).collect();
    }
    let t = windows[0].input_ids.len();
    let ids: Vec<u32> = windows.iter().flat_map(|w| w.input_ids.iter().copied()).collect();
    let ids = Tensor::from_vec(ids, (windows.len(), t), model.device())?;
    let logits = model.forward(&ids).context("forward pass")?; // [b, t, vocab] f32
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let mut out = Vec::with_capacity(windows.len());
    for (i, w) in windows.iter().enumerate() {
        let pos = w.logit_positions();
        let rows = logp.get(i)?.narrow(0, pos.start, pos.len())?; // [scored, vocab]
        let targets = Tensor::new(w.target_ids(), model.device())?.unsqueeze(1)?;
        let picked = rows.gather(&targets, 1)?.squeeze(1)?.to_dtype(DType::F64)?;
        let nll = -picked.sum_all()?.to_scalar::<f64>()?;
        out.push((nll, w.scored() as u64));
    }
    Ok(out)
}
