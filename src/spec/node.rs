//! An owned TOML tree in which every key and value remembers where it came from.

use serde_json::Value as Json;
use toml::de::{DeTable, DeValue};

use super::diag::Span;

#[derive(Clone, Debug)]
pub enum Val {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array(Vec<Node>),
    Table(Vec<Entry>),
}

#[derive(Clone, Debug)]
pub struct Node {
    pub val: Val,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub key: String,
    pub key_span: Span,
    pub value: Node,
}

impl Node {
    /// Converts a parsed document; entries keep their order of appearance in the source.
    pub fn from_toml(table: &toml::Spanned<DeTable<'_>>, source: usize) -> Node {
        Node { val: Val::Table(entries_of(table.get_ref(), source)), span: Span::new(source, table.span()) }
    }

    fn from_de(v: &toml::Spanned<DeValue<'_>>, source: usize) -> Node {
        let span = Span::new(source, v.span());
        let val = match v.get_ref() {
            DeValue::String(s) => Val::Str(s.to_string()),
            DeValue::Integer(i) => match i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()) {
                Ok(n) => Val::Int(n),
                Err(_) => Val::Str(i.as_str().to_string()),
            },
            DeValue::Float(x) => Val::Float(parse_toml_float(x.as_str())),
            DeValue::Boolean(b) => Val::Bool(*b),
            DeValue::Datetime(d) => Val::Datetime(d.to_string()),
            DeValue::Array(a) => Val::Array(a.iter().map(|x| Node::from_de(x, source)).collect()),
            DeValue::Table(t) => Val::Table(entries_of(t, source)),
        };
        Node { val, span }
    }

    pub fn as_table(&self) -> Option<&[Entry]> {
        match &self.val {
            Val::Table(t) => Some(t),
            _ => None,
        }
    }
    pub fn as_table_mut(&mut self) -> Option<&mut Vec<Entry>> {
        match &mut self.val {
            Val::Table(t) => Some(t),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match &self.val {
            Val::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.as_table()?.iter().find(|e| e.key == key)
    }

    /// Short description of the value's type for error messages.
    pub fn type_name(&self) -> &'static str {
        match self.val {
            Val::Str(_) => "a string",
            Val::Int(_) => "an integer",
            Val::Float(_) => "a float",
            Val::Bool(_) => "a boolean",
            Val::Datetime(_) => "a datetime",
            Val::Array(_) => "an array",
            Val::Table(_) => "a table",
        }
    }

    /// Plain JSON of the value (tables keep their source order).
    pub fn to_json(&self) -> Json {
        match &self.val {
            Val::Str(s) | Val::Datetime(s) => Json::String(s.clone()),
            Val::Int(i) => Json::from(*i),
            Val::Float(f) => serde_json::Number::from_f64(*f).map(Json::Number).unwrap_or(Json::Null),
            Val::Bool(b) => Json::Bool(*b),
            Val::Array(a) => Json::Array(a.iter().map(Node::to_json).collect()),
            Val::Table(t) => Json::Object(t.iter().map(|e| (e.key.clone(), e.value.to_json())).collect()),
        }
    }

    /// Display form used in instance names: `0.1`, `300`, `abc`.
    pub fn display(&self) -> String {
        match &self.val {
            Val::Str(s) | Val::Datetime(s) => s.clone(),
            Val::Int(i) => i.to_string(),
            Val::Float(f) => format_float(*f),
            Val::Bool(b) => b.to_string(),
            _ => self.to_json().to_string(),
        }
    }
}

fn entries_of(t: &DeTable<'_>, source: usize) -> Vec<Entry> {
    let mut entries: Vec<Entry> = t
        .iter()
        .map(|(k, v)| Entry {
            key: k.get_ref().to_string(),
            key_span: Span::new(source, k.span()),
            value: Node::from_de(v, source),
        })
        .collect();
    entries.sort_by_key(|e| e.key_span.range.start);
    entries
}

fn parse_toml_float(s: &str) -> f64 {
    match s {
        "inf" | "+inf" => f64::INFINITY,
        "-inf" => f64::NEG_INFINITY,
        "nan" | "+nan" | "-nan" => f64::NAN,
        _ => s.replace('_', "").parse().unwrap_or(f64::NAN),
    }
}

/// Shortest form that reads back as the same number: 0.1, 5e-4 → 0.0005, 1 → 1.
pub fn format_float(f: f64) -> String {
    let s = format!("{f}");
    if s.len() > 12 {
        format!("{f:e}")
    } else {
        s
    }
}
