//! Diagnostics with source locations, rendered like cargo: file:line:col, the source line, a caret
//! under the offending text, and a `help:` line.

use std::fmt;
use std::ops::Range;

/// A text that diagnostics point into: the pipeline file, or one `--set` argument.
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub text: String,
    line_starts: Vec<usize>,
}

impl Source {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Source {
        let text = text.into();
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Source { name: name.into(), text, line_starts }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let col = self.text[start..offset].chars().count() + 1;
        (line + 1, col)
    }

    fn line_text(&self, line: usize) -> &str {
        let start = self.line_starts[line - 1];
        let end = self.line_starts.get(line).copied().unwrap_or(self.text.len());
        self.text[start..end].trim_end_matches(['\n', '\r'])
    }
}

/// Where something came from: a byte range in one of the sources.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Span {
    pub source: usize,
    pub range: Range<usize>,
}

impl Span {
    pub fn new(source: usize, range: Range<usize>) -> Span {
        Span { source, range }
    }
}

/// One problem found in a pipeline.
#[derive(Clone, Debug)]
pub struct Diagnostic {
    pub message: String,
    pub span: Option<Span>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(message: impl Into<String>, span: Option<Span>) -> Diagnostic {
        Diagnostic { message: message.into(), span, help: None }
    }
    pub fn at(span: &Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic::new(message, Some(span.clone()))
    }
    pub fn help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }
    /// Adds "did you mean `x`?" when a candidate is close enough to `got`.
    pub fn suggest<'a>(self, got: &str, candidates: impl IntoIterator<Item = &'a str>) -> Diagnostic {
        match nearest(got, candidates) {
            Some(best) => self.help(format!("did you mean `{best}`?")),
            None => self,
        }
    }
}

/// The closest candidate by edit distance, if it is plausibly a misspelling.
pub fn nearest<'a>(got: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(f64, &str)> = None;
    for c in candidates {
        let score = strsim::jaro_winkler(got, c);
        let dist = strsim::levenshtein(got, c);
        let plausible = score >= 0.8 || dist <= 2.max(got.len() / 3);
        if plausible && best.is_none_or(|(s, _)| score > s) {
            best = Some((score, c));
        }
    }
    best.map(|(_, c)| c)
}

/// All problems of one pipeline, with the sources they point into.
#[derive(Debug)]
pub struct SpecErrors {
    pub sources: Vec<Source>,
    pub diagnostics: Vec<Diagnostic>,
}

impl SpecErrors {
    /// `file:line:col` of a diagnostic, if it has a location.
    pub fn location(&self, d: &Diagnostic) -> Option<String> {
        let span = d.span.as_ref()?;
        let src = self.sources.get(span.source)?;
        let (line, col) = src.line_col(span.range.start);
        Some(format!("{}:{}:{}", src.name, line, col))
    }
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            writeln!(f, "error: {}", d.message)?;
            if let Some(span) = &d.span {
                if let Some(src) = self.sources.get(span.source) {
                    let (line, col) = src.line_col(span.range.start);
                    writeln!(f, "  --> {}:{}:{}", src.name, line, col)?;
                    let text = src.line_text(line);
                    let width = line.to_string().len() + 1;
                    let end = span.range.end.max(span.range.start + 1);
                    let (end_line, end_col) = src.line_col(end);
                    let carets = if end_line == line { (end_col - col).max(1) } else { 1 };
                    writeln!(f, "{:width$} |", "")?;
                    writeln!(f, "{line:>width$} | {text}")?;
                    writeln!(f, "{:width$} | {}{}", "", " ".repeat(col - 1), "^".repeat(carets))?;
                }
            }
            if let Some(help) = &d.help {
                writeln!(f, "{:width$} = help: {help}", "", width = gutter_width(self, d))?;
            }
        }
        let n = self.diagnostics.len();
        // Named by the file read (a pipeline, or an executor config).
        let file = self.sources.first().map_or("pipeline", |s| s.name.as_str());
        write!(f, "{} error{} in {file}", n, if n == 1 { "" } else { "s" })
    }
}

fn gutter_width(errors: &SpecErrors, d: &Diagnostic) -> usize {
    d.span
        .as_ref()
        .and_then(|s| errors.sources.get(s.source).map(|src| src.line_col(s.range.start).0.to_string().len() + 1))
        .unwrap_or(1)
}

impl std::error::Error for SpecErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one_in_characters() {
        let s = Source::new("p.toml", "a = 1\nbé = \"x\"\n");
        assert_eq!(s.line_col(0), (1, 1));
        assert_eq!(s.line_col(6), (2, 1));
        // "bé = " : é is two bytes, one character
        assert_eq!(s.line_col(6 + "bé = ".len()), (2, 6));
    }

    #[test]
    fn nearest_finds_misspellings_only() {
        let kinds = ["load", "prune", "eval-ppl", "finetune"];
        assert_eq!(nearest("eval_ppl", kinds), Some("eval-ppl"));
        assert_eq!(nearest("prnue", kinds), Some("prune"));
        assert_eq!(nearest("zzzzzzzz", kinds), None);
    }
}
