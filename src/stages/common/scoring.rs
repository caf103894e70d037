//! Shared by the stages that read a text source through a model: the evaluation windows, the
//! summed NLL of each window, and the perplexity metrics with the protocol echoed next to them
//! (`eval-ppl`, `hook-residuals`, `perturb`).

use std::path::Path;

use anyhow::{Context as _, Result};
use candle_core::{DType, Tensor, D};
use serde_json::{json, Map, Value as Json};

use super::model_artifact::OpenModel;
use crate::analysis::perplexity::NllSum;
use crate::data::{self, Bos, Encoding, Protocol, Source, TokenStream, Window, WindowOptions};
use crate::exec::MetricDef;
use crate::model::Model;

/// A text source cut into windows for one model's tokenizer.
pub struct EvalWindows {
    pub source: Source,
    pub stream: TokenStream,
    pub windows: Vec<Window>,
    pub protocol: Protocol,
    pub opts: WindowOptions,
    /// How the text was prepared, echoed in the `protocol` object (encode, min_row_chars, texts).
    pub prep: Map<String, Json>,
}

/// How the analysis stages take their texts: the windows of a perplexity protocol, or the
/// notebooks' per-text rows.
#[derive(Clone, Copy, Debug)]
pub enum TextSelection {
    Windows {
        protocol: Protocol,
        encoding: Encoding,
    },
    /// The first `count` rows longer than `longer_than` characters (stripped), each cut to
    /// `chars` characters, tokenised with the tokenizer's special tokens, truncated to seq_len.
    Rows {
        longer_than: usize,
        chars: usize,
        count: usize,
    },
}

/// The windows of `selection` over `data` (a relative `path` resolved against `base`): the
/// source tokenised with the model's tokenizer (once per process) and cut as the protocol says.
pub fn select_windows(
    open: &OpenModel,
    data: &Json,
    selection: TextSelection,
    seq_len: usize,
    bos: &str,
    max_windows: Option<usize>,
    base: &Path,
) -> Result<EvalWindows> {
    let tok = open.tokenizer()?;
    let source = Source::from_value(data)?.with_base_dir(base);
    let hub = data::HubOptions::from_env();
    let opts = WindowOptions { seq_len, bos: Bos::parse(bos)?, bos_id: tok.bos_id, max_windows };
    let mut prep = Map::new();
    let (protocol, texts) = match selection {
        TextSelection::Windows { protocol: Protocol::Texts, encoding } => {
            let min_chars = match encoding {
                Encoding::PerRow { min_chars } => min_chars.max(1),
                Encoding::Joined => 1,
            };
            prep.insert("min_row_chars".into(), json!(min_chars));
            (Protocol::Texts, data::stripped_rows(&source, &hub, min_chars)?)
        }
        TextSelection::Windows { protocol, encoding } => {
            let stream = data::encoded_stream(&source, &hub, tok.inner(), &open.tokenizer_id, encoding)?;
            prep.insert("encode".into(), json!(encoding.name()));
            if let Encoding::PerRow { min_chars } = encoding {
                prep.insert("min_row_chars".into(), json!(min_chars));
            }
            let windows = data::windows(protocol, &stream.ids, &opts)?;
            tracing::info!(
                data = %source.display_name(), tokens = stream.ids.len(), bytes = stream.bytes, windows = windows.len(),
                seq_len, protocol = ?protocol, encode = %encoding.name(), "data ready"
            );
            return Ok(EvalWindows { source, stream, windows, protocol, opts, prep });
        }
        TextSelection::Rows { longer_than, chars, count } => {
            prep.insert("texts".into(), json!({ "longer_than": longer_than, "chars": chars, "count": count }));
            (Protocol::Texts, data::long_rows(&source, &hub, longer_than, chars, count)?)
        }
    };
    // Per-text windows: each text tokenised with the tokenizer's own special tokens.
    let mut encoded = Vec::with_capacity(texts.len());
    for t in &texts {
        encoded.push(tok.encode(t, crate::model::Bos::AsTokenizer)?);
    }
    let windows = data::text_windows(&encoded, &opts)?;
    let ids: Vec<u32> = windows.iter().flat_map(|w| w.input_ids.iter().copied()).collect();
    let stream = TokenStream { ids: ids.into(), bytes: texts.iter().map(String::len).sum() };
    tracing::info!(
        data = %source.display_name(), texts = texts.len(), tokens = stream.ids.len(), windows = windows.len(), seq_len,
        "data ready (one window per text)"
    );
    Ok(EvalWindows { source, stream, windows, protocol, opts, prep })
}

/// The metrics [`EvalWindows::ppl_metrics`] writes, for the report contracts of the kinds that
/// score windows with it.
pub const PPL_METRICS: [MetricDef; 6] = [
    MetricDef { name: "ppl", always: true, help: "perplexity: exp of the mean token negative log-likelihood" },
    MetricDef { name: "nll", always: true, help: "mean negative log-likelihood per scored token (nats)" },
    MetricDef { name: "tokens", always: true, help: "tokens scored" },
    MetricDef { name: "windows", always: true, help: "windows (or texts) evaluated" },
    MetricDef {
        name: "bits_per_byte",
        always: true,
        help: "total NLL in bits over the UTF-8 bytes of the scored text (tokenizer-independent)",
    },
    MetricDef {
        name: "protocol",
        always: true,
        help: "the protocol echoed: name, data, seq_len, stride, bos, preparation",
    },
];

impl EvalWindows {
    /// The `protocol` object of the perplexity metrics (eval-ppl's shape).
    pub fn protocol_json(&self, open: &OpenModel) -> Json {
        let stride = match self.protocol {
            Protocol::Rolling { stride } => Some(stride),
            _ => None,
        };
        let mut j = json!({
            "name": self.protocol.name(),
            "seq_len": self.opts.seq_len,
            "stride": stride,
            "bos": if self.protocol == Protocol::Texts { "as-tokenizer" } else { self.opts.bos.as_str() },
            "max_windows": self.opts.max_windows,
            "data": self.source.display_name(),
            "stream_tokens": self.stream.ids.len(),
            "text_bytes": self.stream.bytes,
            "model_dtype": open.settings.dtype,
            "quantization": open.settings.quantization,
        });
        j.as_object_mut().expect("object").extend(self.prep.clone());
        j
    }

    /// The summed NLL as the protocol weighs it: for `texts`, each window's mean NLL weighted by
    /// its token count (input length, BOS included), as the sparsity notebook did; otherwise
    /// every scored token once.
    pub fn weighted(&self, per_window: &[(f64, u64)]) -> NllSum {
        let mut sum = NllSum::default();
        for ((nll, n), w) in per_window.iter().zip(&self.windows) {
            if self.protocol == Protocol::Texts {
                let len = w.input_ids.len() as u64;
                sum.add(nll / *n as f64 * len as f64, len);
            } else {
                sum.add(*nll, *n);
            }
        }
        sum
    }

    /// `ppl`, `nll`, `tokens`, `windows`, `bits_per_byte` and `protocol` for `sum` over these windows.
    /// `per_window` holds each window's summed NLL and scored tokens, in window order.
    pub fn ppl_metrics(&self, open: &OpenModel, per_window: &[(f64, u64)]) -> Result<Json> {
        let mut raw = NllSum::default();
        per_window.iter().for_each(|(nll, n)| raw.add(*nll, *n));
        let sum = self.weighted(per_window);
        let bits_per_byte = match data::token_bytes(open.tokenizer()?.inner()) {
            Ok(table) => json!(raw.bits_per_byte(data::scored_bytes(&self.windows, &table))),
            Err(_) => Json::Null, // not a byte-level tokenizer: bytes per token unknown
        };
        Ok(json!({
            "ppl": sum.perplexity(),
            "nll": sum.mean(),
            "tokens": raw.tokens,
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
    if scores_from_hidden(model, windows) {
        let h = model.forward_hidden(&ids, None).context("forward pass")?;
        return nlls_of_hidden(model, &h, windows);
    }
    let logits = model.forward(&ids).context("forward pass")?; // [b, t, vocab] f32
    nlls_of_logits(&logits, windows)
}

/// Whether [`nlls_of_hidden`] serves `model` on these (equal-length) windows: on CPU in f32, with
/// at least two positions per window.
pub fn scores_from_hidden(model: &Model, windows: &[Window]) -> bool {
    model.device().is_cpu() && model.dtype() == DType::F32 && windows.iter().all(|w| w.input_ids.len() >= 2)
}

/// [`nlls_of_logits`] from the final-norm hidden states `[b, t, hidden]` of the windows
/// ([`Model::forward_hidden`]), putting only the scored positions through the LM head: half of
/// each window under the llama.cpp protocol, where the head (vocab × hidden per position) is
/// ~30 % of the 2B model's forward on CPU. Where [`scores_from_hidden`] holds, the same bits as the
/// whole-window logits (tested): the f32 head is a gemm whose rows do not depend on the other
/// rows, for two rows or more.
pub fn nlls_of_hidden(model: &Model, h: &Tensor, windows: &[Window]) -> Result<Vec<(f64, u64)>> {
    windows
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let (rows, skip) = head_rows(w);
            let logits = model.logits(&h.get(i)?.narrow(0, rows.start, rows.len())?)?;
            nll_of_rows(&logits.narrow(0, skip, w.scored())?, w)
        })
        .collect()
}

/// The positions of `w` put through the LM head, and how many of them precede its scored ones:
/// its logit positions, with a neighbour when there is only one (one row takes the gemm's
/// matrix–vector path, which sums in another order). `w` has at least two positions.
fn head_rows(w: &Window) -> (std::ops::Range<usize>, usize) {
    let pos = w.logit_positions();
    match pos.len() {
        1 if pos.start > 0 => (pos.start - 1..pos.end, 1),
        1 => (pos.start..pos.end + 1, 0),
        _ => (pos, 0),
    }
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
    windows
        .iter()
        .enumerate()
        .map(|(i, w)| nll_of_rows(&logits.get(i)?.narrow(0, w.logit_positions().start, w.scored())?, w))
        .collect()
}

/// Summed NLL and scored-token count of `w` from the logits of its scored positions `[scored, vocab]`.
fn nll_of_rows(rows: &Tensor, w: &Window) -> Result<(f64, u64)> {
    let targets = w.target_ids();
    // The log-softmax of the scored rows, LOGP_ROWS at a time (row by row it is the same
    // computation), its picked values summed by one `sum_all` as before: the same bits.
    let mut picked: Vec<f64> = Vec::with_capacity(targets.len());
    for c0 in (0..targets.len()).step_by(LOGP_ROWS) {
        let n = LOGP_ROWS.min(targets.len() - c0);
        let logp = log_probs(&rows.narrow(0, c0, n)?)?;
        picked.extend(picked_log_probs(&logp, &targets[c0..c0 + n])?.to_vec1::<f64>()?);
    }
    let total = Tensor::new(picked, rows.device())?.sum_all()?.to_scalar::<f64>()?;
    Ok((-total, w.scored() as u64))
}

/// Scored rows whose log-probabilities exist at once. The log-softmax makes three temporaries the
/// size of its input: a whole 2048-token window of a 128k vocabulary would add ~3 GB in f32 beside
/// its 1 GB of logits; 256 rows add ~0.4 GB.
const LOGP_ROWS: usize = 256;

/// Log-softmax over the vocabulary of logits `[b, t, vocab]`, in f32.
pub fn log_probs(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?)
}

/// The summed log-probability (f64) of `targets` read at positions `start..start + len` of one
/// sequence's log-probabilities `[t, vocab]`.
pub fn summed_log_prob(logp: &Tensor, start: usize, targets: &[u32]) -> Result<f64> {
    let rows = logp.narrow(0, start, targets.len())?; // [scored, vocab]
    Ok(picked_log_probs(&rows, targets)?.sum_all()?.to_scalar::<f64>()?)
}

/// Row `i`'s log-probability of `targets[i]`, as f64, from log-probabilities `[len, vocab]`.
fn picked_log_probs(logp_rows: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let ids = Tensor::new(targets, logp_rows.device())?.unsqueeze(1)?;
    Ok(logp_rows.gather(&ids, 1)?.squeeze(1)?.to_dtype(DType::F64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The row-chunked scoring gives the bits of the whole-window log-softmax it replaced, on
    /// windows longer than a chunk and with scored ranges that start and end mid-chunk.
    #[test]
    fn chunked_scoring_equals_the_whole_window_log_softmax() {
        let (b, t, v) = (2, 2 * LOGP_ROWS + 37, 50);
        let logits = Tensor::randn(0f32, 3.0, (b, t, v), &Device::Cpu).unwrap();
        let ids = |seed: u32| (0..t as u32).map(|i| (i * 7 + seed) % v as u32).collect::<Vec<_>>();
        let windows =
            [Window { input_ids: ids(1), targets: 1..t }, Window { input_ids: ids(3), targets: LOGP_ROWS / 2..t - 5 }];
        let got = nlls_of_logits(&logits, &windows).unwrap();
        let logp = log_probs(&logits).unwrap();
        for (i, w) in windows.iter().enumerate() {
            let want = -summed_log_prob(&logp.get(i).unwrap(), w.logit_positions().start, w.target_ids()).unwrap();
            assert_eq!(got[i].0.to_bits(), want.to_bits(), "window {i}: {} vs {want}", got[i].0);
            assert_eq!(got[i].1, w.scored() as u64);
        }
    }

    /// Putting only the scored positions through the LM head gives the bits of the whole-window
    /// logits: the llama.cpp protocol's second half, all but the first position, a single
    /// scored position (first, middle and last: the head then takes a neighbour too), stacked
    /// windows and each window alone.
    #[test]
    fn scoring_only_the_scored_positions_gives_the_whole_window_bits() {
        use crate::model::{Arch, LoadOptions, ModelConfig};
        let cfg = ModelConfig::tiny(Arch::Bitnet, 300, 64, 96, 2, 4, 2);
        let opts =
            LoadOptions { dtype: DType::F32, device: Device::Cpu, quantization: None, pack_for_inference: false };
        let model = Model::random(&cfg, 7, &opts).unwrap();
        let t = 40;
        let ids = |seed: u32| (0..t as u32).map(|i| (i * 37 + seed) % 300).collect::<Vec<_>>();
        let windows = [
            Window { input_ids: ids(1), targets: t / 2 + 1..t },
            Window { input_ids: ids(2), targets: 1..t },
            Window { input_ids: ids(3), targets: 1..2 },
            Window { input_ids: ids(4), targets: 17..18 },
            Window { input_ids: ids(5), targets: t - 1..t },
        ];
        let logits = model.forward(&window_ids(&model, &windows).unwrap()).unwrap();
        let want = nlls_of_logits(&logits, &windows).unwrap();
        assert_eq!(window_nlls(&model, &windows).unwrap(), want, "stacked windows");
        for (i, w) in windows.iter().enumerate() {
            let one = window_nlls(&model, std::slice::from_ref(w)).unwrap();
            assert_eq!(one[0].0.to_bits(), want[i].0.to_bits(), "window {i} alone");
        }
    }
}
