//! Hex encoding and serde of [`Key`].

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Key;

const HEX: &[u8; 16] = b"0123456789abcdef";

pub(super) fn encode(bytes: &[u8; 32]) -> String {
    let mut s = String::with_capacity(64);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xf) as usize] as char);
    }
    s
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Parses exactly 64 hex digits (either case).
pub(super) fn decode(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// Parses a directory or file name that must be the canonical (lowercase) hex of a key.
pub(super) fn parse_canonical(name: &str) -> Option<Key> {
    let key = Key::from_hex(name)?;
    (key.to_hex() == name).then_some(key)
}

impl std::str::FromStr for Key {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Key> {
        Key::from_hex(s).ok_or_else(|| anyhow::anyhow!("not a cache key (64 hex digits): {s:?}"))
    }
}

impl Serialize for Key {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        let s = String::deserialize(deserializer)?;
        Key::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid cache key {s:?}: expected 64 hex digits")))
    }
}
