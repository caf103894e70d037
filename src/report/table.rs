//! A table with a title and caption lines, rendered as aligned GitHub markdown (readable on a
//! terminal as it is), and the number formats every table shares.

/// A rendered table: everything is text already.
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    /// Shape and ordinal, e.g. `pruning-sweep#1`; tables of two sessions with the same id are
    /// put side by side by a comparison.
    pub id: String,
    pub title: String,
    /// Lines above the table: model (key prefix), device, dtype, protocol.
    pub notes: Vec<String>,
    pub columns: Vec<String>,
    /// Right-aligned (numeric) columns.
    pub numeric: Vec<bool>,
    /// How many leading columns identify a row (matched across sessions in a comparison).
    pub key_columns: usize,
    pub rows: Vec<Vec<String>>,
    /// Lines below the table: definitions and rules.
    pub footnotes: Vec<String>,
}

impl Table {
    /// The table as the session file stores it (cells as printed).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "title": self.title,
            "notes": self.notes,
            "columns": self.columns,
            "rows": self.rows,
            "footnotes": self.footnotes,
        })
    }

    pub fn new(id: impl Into<String>, title: impl Into<String>, columns: &[(&str, bool)]) -> Table {
        Table {
            id: id.into(),
            title: title.into(),
            notes: Vec::new(),
            columns: columns.iter().map(|(c, _)| c.to_string()).collect(),
            numeric: columns.iter().map(|(_, n)| *n).collect(),
            key_columns: 1,
            rows: Vec::new(),
            footnotes: Vec::new(),
        }
    }

    /// Adds a row; a `|` inside a cell is escaped so the markdown table keeps its columns.
    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.columns.len(), "row width in table {}", self.id);
        self.rows.push(row.into_iter().map(|c| if c.contains('|') { c.replace('|', "\\|") } else { c }).collect());
    }

    /// The table alone (header, separator, rows), columns padded to equal width.
    pub fn grid(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut w: Vec<usize> = self.columns.iter().map(|c| width(c).max(3)).collect();
        for r in &self.rows {
            for (j, c) in r.iter().enumerate() {
                w[j] = w[j].max(width(c));
            }
        }
        let cell = |j: usize, s: &str| {
            let pad = " ".repeat(w[j] - width(s));
            if self.numeric[j] {
                format!("{pad}{s}")
            } else {
                format!("{s}{pad}")
            }
        };
        let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
        let mut out = line(self.columns.iter().enumerate().map(|(j, c)| cell(j, c)).collect());
        let seps = (0..w.len())
            .map(|j| if self.numeric[j] { format!("{}:", "-".repeat(w[j] - 1)) } else { "-".repeat(w[j]) })
            .collect();
        out.push_str(&line(seps));
        for r in &self.rows {
            out.push_str(&line(r.iter().enumerate().map(|(j, c)| cell(j, c)).collect()));
        }
        out
    }

    /// `## title`, notes, the grid, footnotes.
    pub fn markdown(&self) -> String {
        let mut out = format!("## {}\n\n", self.title);
        for n in &self.notes {
            out.push_str(&format!("{n}  \n"));
        }
        if !self.notes.is_empty() {
            out.push('\n');
        }
        out.push_str(&self.grid());
        if !self.footnotes.is_empty() {
            out.push('\n');
            for f in &self.footnotes {
                out.push_str(&format!("{f}  \n"));
            }
        }
        out
    }
}

/// Perplexity-like magnitudes: four significant figures, no exponent below 10⁶.
pub fn ppl(x: f64) -> String {
    if !x.is_finite() {
        return if x.is_nan() { "NaN".into() } else { "inf".into() };
    }
    let a = x.abs();
    if a >= 1e6 {
        format!("{x:.3e}")
    } else if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 10.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// Four significant figures for any magnitude (`0.001234`, `1.234e-6`, `12.35`).
pub fn sig(x: f64) -> String {
    if !x.is_finite() {
        return if x.is_nan() { "NaN".into() } else { "inf".into() };
    }
    if x == 0.0 {
        return "0".into();
    }
    let a = x.abs();
    if !(1e-4..1e6).contains(&a) {
        return format!("{x:.3e}");
    }
    let digits = (3 - a.log10().floor() as i32).max(0) as usize;
    format!("{x:.digits$}")
}

/// A fraction as a percentage with at most two decimals and no trailing zeros: `10%`, `12.5%`.
pub fn pct(frac: f64) -> String {
    format!("{}%", trim(&format!("{:.2}", frac * 100.0)))
}

/// A fraction as a percentage number (no sign): `12.34`.
pub fn pct_num(frac: f64) -> String {
    format!("{:.2}", frac * 100.0)
}

/// A change in percent with its sign: `+12.3`, `-4.0`.
pub fn signed(x: f64) -> String {
    if !x.is_finite() {
        return ppl(x);
    }
    format!("{x:+.1}")
}

fn trim(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

/// A JSON scalar as a cell.
pub fn cell(v: Option<&serde_json::Value>) -> String {
    match v {
        None | Some(serde_json::Value::Null) => "—".into(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => match n.as_i64() {
            Some(i) => i.to_string(),
            None => sig(n.as_f64().unwrap_or(f64::NAN)),
        },
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(ppl(9.65234), "9.652");
        assert_eq!(ppl(512.34), "512.3");
        assert_eq!(ppl(12345.6), "12346");
        assert_eq!(sig(0.00123456), "0.001235");
        assert_eq!(sig(1.5e-7), "1.500e-7");
        assert_eq!(sig(3.0), "3.000");
        assert_eq!(pct(0.1), "10%");
        assert_eq!(pct(0.125), "12.5%");
        assert_eq!(pct(0.0), "0%");
        assert_eq!(signed(12.34), "+12.3");
        assert_eq!(signed(-4.0), "-4.0");
    }

    #[test]
    fn grid_pads_and_aligns() {
        let mut t = Table::new("t", "T", &[("a", false), ("bb", true)]);
        t.push(vec!["x".into(), "1.5".into()]);
        assert_eq!(t.grid(), "| a   |  bb |\n| --- | --: |\n| x   | 1.5 |\n");
    }
}
