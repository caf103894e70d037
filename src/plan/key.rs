//! Canonical encoding of key material and the key itself. Two parameter sets that mean the same
//! thing (key order, `0.1` vs `0.10`) encode to the same bytes.

use serde_json::Value as Json;

use crate::cache::Key;

/// Format tag: bump only if the encoding itself changes (every key changes with it).
pub const KEY_FORMAT: &str = "rpt-flow-key/1";

/// JSON with object keys sorted at every level and no whitespace. Numbers keep serde_json's
/// shortest round-trip form, so equal floats print equally.
pub fn canonical_json(v: &Json) -> String {
    let mut out = String::new();
    write(v, &mut out);
    out
}

fn write(v: &Json, out: &mut String) {
    match v {
        Json::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Json::String((*k).clone()).to_string());
                out.push(':');
                write(&map[*k], out);
            }
            out.push('}');
        }
        Json::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

pub fn key_of(material: &Json) -> Key {
    Key::of_bytes(canonical_json(material).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_and_float_spelling_do_not_matter() {
        let a: Json = serde_json::from_str(r#"{"b": 0.10, "a": {"y": 1, "x": [1, 2.50]}}"#).unwrap();
        let b = json!({"a": {"x": [1, 2.5], "y": 1}, "b": 0.1});
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&b), r#"{"a":{"x":[1,2.5],"y":1},"b":0.1}"#);
        assert_eq!(key_of(&a), key_of(&b));
    }

    #[test]
    fn different_values_give_different_keys() {
        assert_ne!(key_of(&json!({"s": 0.1})), key_of(&json!({"s": 0.15})));
        assert_ne!(key_of(&json!({"s": 1})), key_of(&json!({"s": 1.0})));
    }
}
