//! The rows of a WikiText-style text file, exactly as the Hugging Face dataset has them.
//!
//! The `wikitext` dataset script (the one the hub's parquet files were converted from) reads each
//! file in Python text mode and yields one row per line: `row` itself (trailing `"\n"` included)
//! when `row.strip()` is non-empty, else `""`. [`hf_text_rows`] reproduces that, including
//! Python's universal newlines (`\r\n` and a lone `\r` end a line and read as `\n`) and Python's
//! definition of whitespace for `strip()`.

/// Splits file content into dataset rows as the HF `wikitext` script does.
///
/// Every row but possibly the last ends with `"\n"`; whitespace-only lines become `""`.
/// An empty input has no rows.
pub fn hf_text_rows(content: &str) -> Vec<String> {
    let normalised;
    let content = if content.contains('\r') {
        normalised = content.replace("\r\n", "\n").replace('\r', "\n");
        normalised.as_str()
    } else {
        content
    };
    content
        .split_inclusive('\n')
        .map(|line| if line.chars().all(py_isspace) { String::new() } else { line.to_string() })
        .collect()
}

/// Python's `str.isspace` for one character: Rust's `White_Space` plus U+001C..U+001F, which
/// Python counts (bidirectional classes B and S) and Unicode's `White_Space` does not.
pub(crate) fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`: leading and trailing whitespace (Python's definition) removed.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

/// Joins rows with `sep`, as Python's `sep.join(rows)`.
pub fn join_rows<S: AsRef<str>>(rows: &[S], sep: &str) -> String {
    let len = rows.iter().map(|r| r.as_ref().len()).sum::<usize>() + sep.len() * rows.len().saturating_sub(1);
    let mut out = String::with_capacity(len);
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push_str(sep);
        }
        out.push_str(row.as_ref());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_keep_newlines_and_blank_lines_become_empty() {
        let rows = hf_text_rows(" = T = \n \n a b \n\n last");
        assert_eq!(rows, vec![" = T = \n", "", " a b \n", "", " last"]);
    }

    #[test]
    fn universal_newlines_and_python_whitespace() {
        assert_eq!(hf_text_rows("a\r\nb\rc\n"), vec!["a\n", "b\n", "c\n"]);
        // U+001F is whitespace to Python's strip(), not to Rust's trim().
        assert_eq!(hf_text_rows("\u{1f} \n\u{a0}\nx\n"), vec!["", "", "x\n"]);
        assert!(hf_text_rows("").is_empty());
    }

    #[test]
    fn strip_is_python_strip() {
        assert_eq!(py_strip(" \u{1f} a b \n"), "a b");
        assert_eq!(py_strip("\u{a0}x\u{a0}"), "x");
        assert_eq!(py_strip(" \n "), "");
    }

    #[test]
    fn join_is_python_join() {
        assert_eq!(join_rows(&["a\n", "", "b"], "\n\n"), "a\n\n\n\n\nb");
        assert_eq!(join_rows::<&str>(&[], "\n\n"), "");
    }
}
