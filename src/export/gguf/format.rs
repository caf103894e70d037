//! The GGUF container (version 3, little-endian): a header, typed metadata key/values, tensor
//! infos, then the tensor data, each tensor starting at a multiple of `general.alignment`.
//!
//! ```text
//! "GGUF" u32 version  u64 n_tensors  u64 n_kv
//! n_kv × { string key, u32 value_type, value }          string = u64 length + UTF-8 bytes
//! n_tensors × { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset }
//! padding to the alignment, then the data section (offsets are relative to its start)
//! ```
//!
//! `ne[0]` is the innermost (contiguous) dimension: a PyTorch `[out, in]` matrix is
//! `ne = [in, out]`, its bytes unchanged. Arrays are `u32 element_type, u64 count, elements`.
//! This module writes and reads exactly that; it knows nothing of models.

use anyhow::{bail, ensure, Context, Result};
use std::io::Write;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
/// `general.alignment`'s default, and what we write.
pub const ALIGNMENT: u64 = 32;

/// ggml tensor types this exporter writes (ids from ggml's `enum ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    /// 1.6875 bits per weight: 256-value blocks of 54 bytes (base-3 packing, fp16 scale).
    TQ1_0,
    /// 2.0625 bits per weight: 256-value blocks of 66 bytes (2 bits each, fp16 scale).
    TQ2_0,
}

impl GgmlType {
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 30,
            Self::TQ1_0 => 34,
            Self::TQ2_0 => 35,
        }
    }

    pub fn from_id(id: u32) -> Option<Self> {
        [Self::F32, Self::F16, Self::BF16, Self::TQ1_0, Self::TQ2_0].into_iter().find(|t| t.id() == id)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::TQ1_0 => "TQ1_0",
            Self::TQ2_0 => "TQ2_0",
        }
    }

    /// Values per block.
    pub fn block_size(self) -> u64 {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::TQ1_0 | Self::TQ2_0 => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::TQ1_0 => 54,
            Self::TQ2_0 => 66,
        }
    }

    /// Bytes of a tensor with these dims (`ne[0]` must be a multiple of the block size).
    pub fn nbytes(self, ne: &[u64]) -> Result<u64> {
        let row = *ne.first().context("a tensor needs at least one dimension")?;
        ensure!(
            row % self.block_size() == 0,
            "{} rows of {row} values: not a multiple of the block size {}",
            self.name(),
            self.block_size()
        );
        Ok(row / self.block_size() * self.type_size() * ne[1..].iter().product::<u64>())
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Element type id and the elements (all of that type).
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::Str(_) => 8,
            Self::Array(..) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }

    /// An array of strings.
    pub fn strings(v: impl IntoIterator<Item = String>) -> Self {
        Self::Array(8, v.into_iter().map(Self::Str).collect())
    }

    /// An array of i32.
    pub fn i32s(v: impl IntoIterator<Item = i32>) -> Self {
        Self::Array(5, v.into_iter().map(Self::I32).collect())
    }

    pub fn as_u32(&self) -> Option<u32> {
        match self {
            Self::U32(x) => Some(*x),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        match self {
            Self::U8(x) => w.write_all(&[*x]),
            Self::I8(x) => w.write_all(&x.to_le_bytes()),
            Self::U16(x) => w.write_all(&x.to_le_bytes()),
            Self::I16(x) => w.write_all(&x.to_le_bytes()),
            Self::U32(x) => w.write_all(&x.to_le_bytes()),
            Self::I32(x) => w.write_all(&x.to_le_bytes()),
            Self::F32(x) => w.write_all(&x.to_le_bytes()),
            Self::Bool(x) => w.write_all(&[*x as u8]),
            Self::Str(s) => write_str(w, s),
            Self::Array(ty, items) => {
                w.write_all(&ty.to_le_bytes())?;
                w.write_all(&(items.len() as u64).to_le_bytes())?;
                for it in items {
                    if it.type_id() != *ty {
                        return Err(std::io::Error::other(format!(
                            "GGUF array of type {ty} holds a value of type {}",
                            it.type_id()
                        )));
                    }
                    it.write(w)?;
                }
                Ok(())
            }
            Self::U64(x) => w.write_all(&x.to_le_bytes()),
            Self::I64(x) => w.write_all(&x.to_le_bytes()),
            Self::F64(x) => w.write_all(&x.to_le_bytes()),
        }
    }
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `ne[0]` innermost.
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    /// From the start of the data section; a multiple of the alignment.
    pub offset: u64,
}

impl TensorInfo {
    pub fn nbytes(&self) -> Result<u64> {
        self.ty.nbytes(&self.ne).with_context(|| format!("tensor {}", self.name))
    }
}

/// `x` rounded up to a multiple of `align`.
pub fn align_up(x: u64, align: u64) -> u64 {
    x.div_ceil(align) * align
}

/// Set every tensor's offset (in order, each aligned); returns the data section's size.
pub fn assign_offsets(tensors: &mut [TensorInfo], align: u64) -> Result<u64> {
    let mut at = 0;
    for t in tensors.iter_mut() {
        t.offset = align_up(at, align);
        at = t.offset + t.nbytes()?;
    }
    Ok(at)
}

/// Write the header, metadata and tensor infos, padded to `align`; returns the bytes written
/// (the data section starts there).
pub fn write_header(w: &mut impl Write, kv: &[(String, Value)], tensors: &[TensorInfo], align: u64) -> Result<u64> {
    let mut buf = Vec::new();
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        write_str(&mut buf, k)?;
        buf.extend_from_slice(&v.type_id().to_le_bytes());
        v.write(&mut buf).with_context(|| format!("metadata {k}"))?;
    }
    for t in tensors {
        write_str(&mut buf, &t.name)?;
        buf.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
        for d in &t.ne {
            buf.extend_from_slice(&d.to_le_bytes());
        }
        buf.extend_from_slice(&t.ty.id().to_le_bytes());
        buf.extend_from_slice(&t.offset.to_le_bytes());
    }
    let len = align_up(buf.len() as u64, align);
    buf.resize(len as usize, 0);
    w.write_all(&buf)?;
    Ok(len)
}

/// A parsed GGUF file (header, metadata and tensor infos; the data stays in the caller's bytes).
#[derive(Debug, Clone)]
pub struct GgufFile {
    pub version: u32,
    pub kv: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Byte offset of the data section in the file.
    pub data_offset: u64,
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let Some(end) = end else { bail!("GGUF truncated at byte {} (wanted {n} more)", self.at) };
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).context("GGUF string is not UTF-8")
    }
    fn value(&mut self, ty: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(i8::from_le_bytes(self.arr()?)),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => match self.arr::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("GGUF bool holds {b}"),
            },
            8 => Value::Str(self.string()?),
            9 => {
                let ety = self.u32()?;
                let n = self.u64()?;
                ensure!(ety != 9, "GGUF nested arrays are not supported");
                ensure!(n <= (self.b.len() - self.at) as u64, "GGUF array of {n} elements cannot fit");
                let items = (0..n).map(|_| self.value(ety)).collect::<Result<Vec<_>>>()?;
                Value::Array(ety, items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            other => bail!("unknown GGUF value type {other}"),
        })
    }
}

impl GgufFile {
    /// Parse the header, metadata and tensor infos of `bytes` (a whole file), checking that
    /// every tensor lies, aligned, inside the data section.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut c = Cursor { b: bytes, at: 0 };
        ensure!(c.take(4)? == MAGIC, "not a GGUF file (bad magic)");
        let version = c.u32()?;
        ensure!(version == VERSION, "GGUF version {version}, expected {VERSION}");
        let n_tensors = c.u64()?;
        let n_kv = c.u64()?;
        let mut kv = Vec::new();
        for _ in 0..n_kv {
            let k = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty).with_context(|| format!("metadata {k}"))?;
            ensure!(!kv.iter().any(|(x, _): &(String, Value)| *x == k), "duplicate metadata key {k}");
            kv.push((k, v));
        }
        let alignment = match kv.iter().find(|(k, _)| k == "general.alignment") {
            None => ALIGNMENT,
            Some((_, v)) => {
                let a = v.as_u32().context("general.alignment must be a u32")? as u64;
                ensure!(a > 0 && a.is_power_of_two(), "general.alignment {a} is not a power of two");
                a
            }
        };
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()? as usize;
            ensure!((1..=4).contains(&nd), "tensor {name}: {nd} dimensions");
            let ne = (0..nd).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let id = c.u32()?;
            let ty = GgmlType::from_id(id).with_context(|| format!("tensor {name}: ggml type {id} not known here"))?;
            let offset = c.u64()?;
            ensure!(offset % alignment == 0, "tensor {name}: offset {offset} not aligned to {alignment}");
            ensure!(!tensors.iter().any(|t: &TensorInfo| t.name == name), "duplicate tensor {name}");
            tensors.push(TensorInfo { name, ne, ty, offset });
        }
        let data_offset = align_up(c.at as u64, alignment);
        let data_len = (bytes.len() as u64).saturating_sub(data_offset);
        for t in &tensors {
            let end = t.offset + t.nbytes()?;
            ensure!(
                end <= data_len,
                "tensor {}: bytes {}..{end} beyond the data section ({data_len})",
                t.name,
                t.offset
            );
        }
        Ok(Self { version, kv, tensors, alignment, data_offset })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's bytes within the file's `bytes`.
    pub fn tensor_data<'a>(&self, bytes: &'a [u8], name: &str) -> Result<&'a [u8]> {
        let t = self.tensor(name).with_context(|| format!("no tensor {name}"))?;
        let start = (self.data_offset + t.offset) as usize;
        Ok(&bytes[start..start + t.nbytes()? as usize])
    }
}
