//! Evaluation windows for the perplexity protocols (notes/perplexity-protocols.md).
//!
//! A [`Window`] is what one forward pass sees: `input_ids`, and `targets`, the positions `j` of
//! `input_ids` whose token is scored — predicted by the logits at position `j - 1`. Perplexity
//! is `exp(mean NLL)` over all scored tokens of all windows.

use std::ops::Range;

use anyhow::{bail, Result};

use super::error::DataError;

/// Where a BOS token goes (`bos = "none" | "stream-start" | "window-start"` in pipelines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bos {
    /// No BOS is added or written.
    None,
    /// One BOS before the whole token stream, which is then cut into windows (what a Llama
    /// tokenizer does when the whole text is encoded once, as Wanda/SparseGPT do).
    StreamStart,
    /// Every window starts with BOS: for `chunks` and `rolling` a BOS is put before each
    /// window's `seq_len - 1` stream tokens; for `llama-cpp` it overwrites the window's first
    /// token (what llama.cpp does).
    WindowStart,
}

impl Bos {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => Bos::None,
            "stream-start" => Bos::StreamStart,
            "window-start" => Bos::WindowStart,
            _ => bail!("bos is \"none\", \"stream-start\" or \"window-start\", not \"{s}\""),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Bos::None => "none",
            Bos::StreamStart => "stream-start",
            Bos::WindowStart => "window-start",
        }
    }
}

/// A perplexity protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Wanda/SparseGPT: non-overlapping windows, tail dropped, every shifted position scored.
    Chunks,
    /// llama.cpp `llama-perplexity`: non-overlapping windows, tail dropped, second half scored.
    LlamaCpp,
    /// Strided windows (HF perplexity guide): every token scored exactly once, with at least
    /// `seq_len - stride` tokens of context after the first window; the tail is kept.
    Rolling { stride: usize },
    /// The RPT notebooks' loop: windows start at `range(0, n - seq_len, seq_len)`, so the last
    /// full window is dropped when `n` is a multiple of `seq_len`; otherwise as `Chunks`.
    RptNotebook,
    /// Each text (row) is its own window, tokenised with the tokenizer's default special tokens
    /// and truncated to `seq_len`; every position but the first scored; the perplexity weights
    /// each text's mean loss by its token count (the sparsity notebook's fact sentences).
    Texts,
}

impl Protocol {
    /// `chunks`, `llama-cpp` or `rolling` (which needs `stride`).
    pub fn parse(name: &str, stride: Option<usize>) -> Result<Self> {
        Ok(match (name, stride) {
            ("chunks", None) => Protocol::Chunks,
            ("llama-cpp", None) => Protocol::LlamaCpp,
            ("rpt-notebook", None) => Protocol::RptNotebook,
            ("texts", None) => Protocol::Texts,
            ("rolling", Some(stride)) => Protocol::Rolling { stride },
            ("rolling", None) => bail!("protocol \"rolling\" needs `stride`"),
            (_, Some(_)) if Self::NAMES.contains(&name) => bail!("`stride` applies only to protocol \"rolling\""),
            _ => bail!("protocol is one of {}, not \"{name}\"", Self::NAMES.join(", ")),
        })
    }

    pub const NAMES: [&'static str; 5] = ["chunks", "llama-cpp", "rolling", "rpt-notebook", "texts"];

    pub fn name(&self) -> &'static str {
        match self {
            Protocol::Chunks => "chunks",
            Protocol::LlamaCpp => "llama-cpp",
            Protocol::Rolling { .. } => "rolling",
            Protocol::RptNotebook => "rpt-notebook",
            Protocol::Texts => "texts",
        }
    }

    /// Whether this protocol scores tokens with windows of `seq_len` (at least 2): `rolling`
    /// needs `stride` in `1..seq_len`, `llama-cpp` (the second half of each window scored,
    /// `seq_len − 1 − seq_len/2` tokens) at least 3.
    pub fn check_seq_len(&self, seq_len: usize) -> Result<()> {
        match *self {
            Protocol::Rolling { stride } if stride == 0 || stride >= seq_len => bail!(
                "rolling: stride must be in 1..={} for seq_len {seq_len} (a stride of seq_len would leave \
                 the first token of every window unscored; use protocol \"chunks\" for \
                 non-overlapping windows), not {stride}",
                seq_len.saturating_sub(1)
            ),
            Protocol::LlamaCpp if seq_len < 3 => bail!(
                "llama-cpp scores the second half of each window (seq_len − 1 − seq_len/2 tokens): \
                 seq_len {seq_len} leaves none; use seq_len 3 or more (llama.cpp's default is 512)"
            ),
            _ => Ok(()),
        }
    }
}

/// Settings shared by all protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowOptions {
    /// Tokens per window (the model's input length), at least 2.
    pub seq_len: usize,
    pub bos: Bos,
    /// The BOS token id; required unless `bos` is [`Bos::None`].
    pub bos_id: Option<u32>,
    /// Keep only the first this-many windows.
    pub max_windows: Option<usize>,
}

/// One forward pass of an evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub input_ids: Vec<u32>,
    /// Positions in `input_ids` whose tokens are scored (always `>= 1`).
    pub targets: Range<usize>,
}

impl Window {
    /// How many tokens this window scores.
    pub fn scored(&self) -> usize {
        self.targets.len()
    }

    /// The positions whose logits are scored: `targets` shifted left by one.
    pub fn logit_positions(&self) -> Range<usize> {
        self.targets.start - 1..self.targets.end - 1
    }

    /// The scored token ids.
    pub fn target_ids(&self) -> &[u32] {
        &self.input_ids[self.targets.clone()]
    }
}

/// The windows of `protocol` over `tokens`.
pub fn windows(protocol: Protocol, tokens: &[u32], opts: &WindowOptions) -> Result<Vec<Window>> {
    match protocol {
        Protocol::Chunks => chunks(tokens, opts),
        Protocol::LlamaCpp => llama_cpp(tokens, opts),
        Protocol::Rolling { stride } => rolling(tokens, opts, stride),
        Protocol::RptNotebook => rpt_notebook(tokens, opts),
        Protocol::Texts => bail!("protocol \"texts\" windows texts, not a token stream (see text_windows)"),
    }
}

/// `rpt-notebook`: the notebooks' `for i in range(0, n - L, L)` over the stream (BOS policies as
/// in [`chunks`]); every position but the first scored. It differs from `chunks` only when `n` is
/// a multiple of `L`: then the last full window is dropped.
pub fn rpt_notebook(tokens: &[u32], opts: &WindowOptions) -> Result<Vec<Window>> {
    let bos_id = check(opts)?;
    let l = opts.seq_len;
    if let (Bos::WindowStart, Some(_)) = (opts.bos, bos_id) {
        bail!("protocol \"rpt-notebook\" takes bos = \"none\" or \"stream-start\"");
    }
    let stream = with_stream_bos(tokens, opts.bos, bos_id);
    let n = stream.len();
    let count = n.saturating_sub(1) / l; // #{i in range(0, n - l, l)}
    let out = (0..count).map(|k| Window { input_ids: stream[k * l..(k + 1) * l].to_vec(), targets: 1..l }).collect();
    finish(out, opts, "rpt-notebook", n, l + 1)
}

/// `texts`: one window per text (already tokenised, special tokens included), truncated to
/// `seq_len`; texts of fewer than two tokens score nothing and are left out.
pub fn text_windows(texts: &[Vec<u32>], opts: &WindowOptions) -> Result<Vec<Window>> {
    let out: Vec<Window> = texts
        .iter()
        .filter(|t| t.len() >= 2)
        .map(|t| {
            let ids = t[..t.len().min(opts.seq_len)].to_vec();
            let n = ids.len();
            Window { input_ids: ids, targets: 1..n }
        })
        .collect();
    finish(out, opts, "texts", texts.iter().map(Vec::len).max().unwrap_or(0), 2)
}

fn check(opts: &WindowOptions) -> Result<Option<u32>> {
    if opts.seq_len < 2 {
        bail!("seq_len must be at least 2, not {}", opts.seq_len);
    }
    match (opts.bos, opts.bos_id) {
        (Bos::None, _) => Ok(None),
        (_, Some(id)) => Ok(Some(id)),
        (bos, None) => bail!("bos = \"{}\" needs a BOS token id (the tokenizer has none)", bos.as_str()),
    }
}

fn with_stream_bos(tokens: &[u32], bos: Bos, bos_id: Option<u32>) -> Vec<u32> {
    match (bos, bos_id) {
        (Bos::StreamStart, Some(id)) => std::iter::once(id).chain(tokens.iter().copied()).collect(),
        _ => tokens.to_vec(),
    }
}

fn finish(mut windows: Vec<Window>, opts: &WindowOptions, what: &str, have: usize, need: usize) -> Result<Vec<Window>> {
    if windows.is_empty() {
        return Err(
            DataError::TooShort { what: format!("{what} windows of seq_len {}", opts.seq_len), have, need }.into()
        );
    }
    if let Some(max) = opts.max_windows {
        windows.truncate(max);
    }
    Ok(windows)
}

/// `chunks` (Wanda/SparseGPT): `n = len / seq_len` non-overlapping windows, the tail dropped;
/// every position but the first is scored (`seq_len - 1` per window). With
/// [`Bos::StreamStart`] the stream is BOS + tokens; with [`Bos::WindowStart`] each window is
/// BOS + the next `seq_len - 1` tokens (so every kept token is scored).
pub fn chunks(tokens: &[u32], opts: &WindowOptions) -> Result<Vec<Window>> {
    let bos_id = check(opts)?;
    let l = opts.seq_len;
    let mut out = Vec::new();
    if let (Bos::WindowStart, Some(id)) = (opts.bos, bos_id) {
        for piece in tokens.chunks_exact(l - 1) {
            let mut input_ids = Vec::with_capacity(l);
            input_ids.push(id);
            input_ids.extend_from_slice(piece);
            out.push(Window { input_ids, targets: 1..l });
        }
        return finish(out, opts, "chunks", tokens.len(), l - 1);
    }
    let stream = with_stream_bos(tokens, opts.bos, bos_id);
    for piece in stream.chunks_exact(l) {
        out.push(Window { input_ids: piece.to_vec(), targets: 1..l });
    }
    finish(out, opts, "chunks", stream.len(), l)
}

/// `llama-cpp` (`llama-perplexity`): `n = len / seq_len` non-overlapping windows, the tail
/// dropped; with [`Bos::WindowStart`] the first token of each window is overwritten with BOS;
/// the logits from position `seq_len / 2` on are scored, i.e. targets
/// `seq_len/2 + 1 .. seq_len`: `seq_len - 1 - seq_len/2` tokens per window (255 at 512).
/// (llama.cpp also refuses fewer than `2 * seq_len` tokens; here one window is enough.)
pub fn llama_cpp(tokens: &[u32], opts: &WindowOptions) -> Result<Vec<Window>> {
    let bos_id = check(opts)?;
    let l = opts.seq_len;
    Protocol::LlamaCpp.check_seq_len(l)?;
    let stream = with_stream_bos(tokens, opts.bos, bos_id);
    let mut out = Vec::new();
    for piece in stream.chunks_exact(l) {
        let mut input_ids = piece.to_vec();
        if let (Bos::WindowStart, Some(id)) = (opts.bos, bos_id) {
            input_ids[0] = id;
        }
        out.push(Window { input_ids, targets: l / 2 + 1..l });
    }
    finish(out, opts, "llama-cpp", stream.len(), l)
}

/// `rolling` (the HF perplexity guide's strided loop; `stride` in `1..seq_len`):
/// window `k` covers stream positions `b = k*stride .. e = min(b + seq_len, N)` and scores the
/// positions from `max(previous e, b + 1)` to `e`, stopping after the window that reaches `N`.
/// So every stream token but the first is scored exactly once, each with at least
/// `seq_len - stride` tokens of context (except in the first window); the tail is kept.
/// (The HF guide also allows `stride == seq_len`, which silently leaves every window's first
/// token unscored; that is refused here.) [`Bos::StreamStart`] puts BOS before the stream (so
/// the first text token is scored too). [`Bos::WindowStart`] puts BOS before every window,
/// which then covers `seq_len - 1` stream tokens, and every stream token is scored exactly once
/// (a window's first stream token is predicted from BOS alone when `stride == seq_len - 1`).
pub fn rolling(tokens: &[u32], opts: &WindowOptions, stride: usize) -> Result<Vec<Window>> {
    let bos_id = check(opts)?;
    let l = opts.seq_len;
    let (span, prefix) = match (opts.bos, bos_id) {
        (Bos::WindowStart, Some(id)) => (l - 1, Some(id)),
        _ => (l, None),
    };
    Protocol::Rolling { stride }.check_seq_len(l)?;
    let stream = with_stream_bos(tokens, opts.bos, bos_id);
    let n = stream.len();
    let first_scored = if prefix.is_some() { 0 } else { 1 };
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    while n > first_scored && begin < n {
        let end = (begin + span).min(n);
        let from = prev_end.max(begin + first_scored);
        let shift = usize::from(prefix.is_some());
        let mut input_ids = Vec::with_capacity(end - begin + shift);
        input_ids.extend(prefix);
        input_ids.extend_from_slice(&stream[begin..end]);
        out.push(Window { input_ids, targets: from - begin + shift..end - begin + shift });
        if end == n {
            break;
        }
        prev_end = end;
        begin += stride;
    }
    finish(out, opts, "rolling", n, first_scored + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(seq_len: usize, bos: Bos) -> WindowOptions {
        WindowOptions { seq_len, bos, bos_id: Some(99), max_windows: None }
    }

    fn stream(n: u32) -> Vec<u32> {
        (0..n).collect()
    }

    #[test]
    fn chunks_drop_the_tail_and_score_all_but_the_first() {
        // 10 tokens, seq_len 4: windows [0..4], [4..8]; tokens 8, 9 dropped; 3 scored each.
        let w = chunks(&stream(10), &opts(4, Bos::None)).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[1].input_ids, vec![4, 5, 6, 7]);
        assert_eq!(w.iter().map(Window::scored).sum::<usize>(), 6);
        assert_eq!(w[0].logit_positions(), 0..3);
        assert_eq!(w[0].target_ids(), &[1, 2, 3]);
    }

    #[test]
    fn rpt_notebook_drops_the_last_full_window() {
        // range(0, 12 - 4, 4) = [0, 4]: the third full window [8..12] is dropped.
        let w = rpt_notebook(&stream(12), &opts(4, Bos::None)).unwrap();
        assert_eq!(w.iter().map(|w| w.input_ids[0]).collect::<Vec<_>>(), vec![0, 4]);
        // range(0, 13 - 4, 4) = [0, 4, 8]: as chunks when n is not a multiple.
        let w = rpt_notebook(&stream(13), &opts(4, Bos::None)).unwrap();
        assert_eq!(w, chunks(&stream(13), &opts(4, Bos::None)).unwrap());
        assert!(rpt_notebook(&stream(4), &opts(4, Bos::None)).is_err(), "range(0, 0, 4) is empty");
        assert_eq!(rpt_notebook(&stream(5), &opts(4, Bos::None)).unwrap().len(), 1);
    }

    #[test]
    fn texts_are_their_own_windows() {
        let texts = vec![vec![99, 1, 2, 3, 4, 5], vec![99], vec![99, 7]];
        let w = text_windows(&texts, &opts(4, Bos::None)).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].input_ids, vec![99, 1, 2, 3]);
        assert_eq!(w[0].targets, 1..4);
        assert_eq!(w[1].target_ids(), &[7]);
    }

    #[test]
    fn chunks_bos_policies() {
        // stream-start: 99,0,1,...,9 = 11 tokens -> 2 windows, the first starts with BOS.
        let w = chunks(&stream(10), &opts(4, Bos::StreamStart)).unwrap();
        assert_eq!(w[0].input_ids, vec![99, 0, 1, 2]);
        assert_eq!(w[1].input_ids, vec![3, 4, 5, 6]);
        // window-start: 10 tokens in pieces of 3 -> 3 windows, each BOS + 3 tokens, 3 scored.
        let w = chunks(&stream(10), &opts(4, Bos::WindowStart)).unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(w[2].input_ids, vec![99, 6, 7, 8]);
        assert_eq!(w[2].target_ids(), &[6, 7, 8]);
    }

    #[test]
    fn llama_cpp_scores_the_second_half() {
        // seq_len 8: targets 5..8 = 3 tokens (8 - 1 - 4); 17 tokens -> 2 windows.
        let w = llama_cpp(&stream(17), &opts(8, Bos::WindowStart)).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[1].input_ids, vec![99, 9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(w[1].target_ids(), &[13, 14, 15]);
        assert_eq!(w[1].logit_positions(), 4..7);
        // At llama.cpp's default context of 512: 255 scored tokens per chunk.
        let w = llama_cpp(&stream(1100), &opts(512, Bos::None)).unwrap();
        assert_eq!((w.len(), w[0].scored()), (2, 255));
        assert_eq!(w[0].input_ids[0], 0, "bos = none leaves the first token");
        // The smallest window that scores a token, and the one below it refused.
        assert_eq!(llama_cpp(&stream(9), &opts(3, Bos::None)).unwrap()[0].scored(), 1);
        let e = llama_cpp(&stream(9), &opts(2, Bos::None)).unwrap_err();
        assert!(format!("{e:#}").contains("seq_len 3 or more"), "{e:#}");
    }

    #[test]
    fn rolling_scores_every_token_once() {
        // 10 tokens, seq_len 4, stride 2: windows [0,4) [2,6) [4,8) [6,10).
        let w = rolling(&stream(10), &opts(4, Bos::None), 2).unwrap();
        let spans: Vec<(Vec<u32>, Vec<u32>)> =
            w.iter().map(|w| (w.input_ids.clone(), w.target_ids().to_vec())).collect();
        assert_eq!(
            spans,
            vec![
                (vec![0, 1, 2, 3], vec![1, 2, 3]),
                (vec![2, 3, 4, 5], vec![4, 5]),
                (vec![4, 5, 6, 7], vec![6, 7]),
                (vec![6, 7, 8, 9], vec![8, 9]),
            ]
        );
        // A stride that does not divide: the last window is short and scores only new tokens.
        let w = rolling(&stream(9), &opts(4, Bos::None), 3).unwrap();
        assert_eq!(w.last().unwrap().input_ids, vec![6, 7, 8]);
        assert_eq!(w.last().unwrap().target_ids(), &[7, 8]);
        assert_eq!(w.iter().map(Window::scored).sum::<usize>(), 8);
    }

    #[test]
    fn rolling_with_bos_scores_the_first_token_too() {
        let w = rolling(&stream(5), &opts(4, Bos::WindowStart), 3).unwrap();
        assert_eq!(w[0].input_ids, vec![99, 0, 1, 2]);
        assert_eq!(w[0].target_ids(), &[0, 1, 2]);
        assert_eq!(w[1].input_ids, vec![99, 3, 4]);
        assert_eq!(w[1].target_ids(), &[3, 4]);
        let w = rolling(&stream(5), &opts(4, Bos::StreamStart), 3).unwrap();
        assert_eq!(w.iter().map(Window::scored).sum::<usize>(), 5);
        assert!(rolling(&stream(5), &opts(4, Bos::StreamStart), 4).is_err());
    }

    #[test]
    fn max_windows_and_errors() {
        let mut o = opts(4, Bos::None);
        o.max_windows = Some(1);
        assert_eq!(chunks(&stream(12), &o).unwrap().len(), 1);
        assert!(chunks(&stream(3), &opts(4, Bos::None)).is_err());
        assert!(rolling(&stream(10), &opts(4, Bos::None), 4).is_err());
        assert!(rolling(&stream(10), &opts(4, Bos::None), 0).is_err());
        let no_bos = WindowOptions { bos_id: None, ..opts(4, Bos::StreamStart) };
        assert!(chunks(&stream(10), &no_bos).is_err());
    }
}
