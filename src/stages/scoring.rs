//! Shared by the stages that read a text source through a model: the evaluation windows, the
//! summed NLL of each window, and the perplexity metrics with the protocol echoed next to them
//! (`eval-ppl`, `hook-residuals`, `perturb`).

use anyhow::{Context as _, Result};
use candle_core::{DType, Tensor, D};
use serde_json::{json, Value as Json};

use super::model_artifact::OpenModel;
use crate::analysis::perplexity::NllSum;
use crate::data::{self, Bos, Protocol, Source, TokenStream, Window, WindowOptions};
use crate::model::Model;

/// A text source cut into windows for one model's tokenizer.
pub struct EvalWindows {
    pub source: Source,
    pub stream: TokenStream,
    pub windows: Vec<Window>,
    pub protocol: Protocol,
    pub opts: WindowOptions,
}

/// Tokenises `data` with the model's tokenizer (once per process) and cuts the stream into the
/// windows of `protocol`.
pub fn eval_windows(
    open: &OpenModel,
    data: &Json,
    protocol: Protocol,
    seq_len: usize,
    bos: &str,
    max_windows: Option<usize>,
) -> Result<EvalWindows> {
    let tok = open.tokenizer()?;
    let source = Source::from_value(data)?;
    let stream = data::token_stream(&source, &data::HubOptions::from_env(), tok.inner(), &open.tokenizer_id, false)?;
    let opts = WindowOptions { seq_len, bos: Bos::parse(bos)?, bos_id: tok.bos_id, max_windows };
    let windows = data::windows(protocol, &stream.ids, &opts)?;
    Ok(EvalWindows { source, stream, windows, protocol, opts })
}

impl EvalWindows {
    /// The `protocol` object of the perplexity metrics (eval-ppl's shape).
    pub fn protocol_json(&self, open: &OpenModel) -> Json {
        let stride = match self.protocol {
            Protocol::Rolling { stride } => Some(stride),
            _ => None,
        };
        json!({
            "name": self.protocol.name(),
            "seq_len": self.opts.seq_len,
            "stride": stride,
            "bos": self.opts.bos.as_str(),
            "max_windows": self.opts.max_windows,
            "data": self.source.display_name(),
            "stream_tokens": self.stream.ids.len(),
            "text_bytes": self.stream.bytes,
            "model_dtype": open.settings.dtype,
            "quantization": open.settings.quantization,
        })
    }

    /// `ppl`, `nll`, `tokens`, `windows`, `bits_per_byte` and `protocol` for `sum` over these windows.
    pub fn ppl_metrics(&self, open: &OpenModel, sum: &NllSum) -> Result<Json> {
        let bits_per_byte = match data::token_bytes(open.tokenizer()?.inner()) {
            Ok(table) => json!(sum.bits_per_byte(data::scored_bytes(&self.windows, &table))),
            Err(_) => Json::Null, // not a byte-level tokenizer: bytes per token unknown
        };
        Ok(json!({
            "ppl": sum.perplexity(),
            "nll": sum.mean(),
            "tokens": sum.tokens,
            "windows": self.windows.len(),
            "bits_per_byte": bits_per_byte,
            "protocol": self.protocol_json(open),
        }))
    }
}

/// Summed NLL (nats) and scored-token count of each window. Windows of equal length are stacked
/// into one forward pass.
pub fn window_nlls(model: &Model, windows: &[Window]) -> Result<Vec<(f64, u64)>> {
    let same_len = windows.iter().all(|w| w.input_ids.len() == windows[0].input_ids.len());
    if !same_len {
        return windows.iter().map(|w| window_nlls(model, std::slice::from_ref(w)).map(|v| v[0])).collect();
    }
    let ids = window_ids(model, windows)?;
    let logits = model.forward(&ids).context("forward pass")?; // [b, t, vocab] f32
    nlls_of_logits(&logits, windows)
}

/// The ids of equal-length windows as a `[b, t]` tensor on the model's device.
pub fn window_ids(model: &Model, windows: &[Window]) -> Result<Tensor> {
    let t = windows[0].input_ids.len();
    let ids: Vec<u32> = windows.iter().flat_map(|w| w.input_ids.iter().copied()).collect();
    Ok(Tensor::from_vec(ids, (windows.len(), t), model.device())?)
}

/// Summed NLL and scored-token count of each window from the logits `[b, t, vocab]` of a forward
/// pass over them (row i = window i).
pub fn nlls_of_logits(logits: &Tensor, windows: &[Window]) -> Result<Vec<(f64, u64)>> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let mut out = Vec::with_capacity(windows.len());
    for (i, w) in windows.iter().enumerate() {
        let pos = w.logit_positions();
        let rows = logp.get(i)?.narrow(0, pos.start, pos.len())?; // [scored, vocab]
        let targets = Tensor::new(w.target_ids(), logits.device())?.unsqueeze(1)?;
        let picked = rows.gather(&targets, 1)?.squeeze(1)?.to_dtype(DType::F64)?;
        let nll = -picked.sum_all()?.to_scalar::<f64>()?;
        out.push((nll, w.scored() as u64));
    }
    Ok(out)
}
