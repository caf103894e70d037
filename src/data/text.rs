//! The text of a source: the exact string that is tokenised.

/// A source's text, as built once and shared (see [`super::Source::text`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text {
    /// The string that is tokenised.
    pub text: String,
    /// How many rows (dataset rows, file lines, files or paragraphs) were joined into it.
    pub rows: usize,
}

impl Text {
    /// UTF-8 bytes of the text: the denominator of bits per byte.
    pub fn bytes(&self) -> usize {
        self.text.len()
    }
}
