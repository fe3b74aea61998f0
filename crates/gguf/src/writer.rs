//! The GGUF v3 writer.
//!
//! Layout written (the same as llama.cpp's `gguf_write_to_buf` and gguf-py's `GGUFWriter`):
//! header, metadata, tensor infos, zero padding to the alignment, then each tensor's data
//! followed by zero padding to the alignment (the last tensor included).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::GgufError;
use crate::reader::{tensor_size, DEFAULT_ALIGNMENT, MAX_NAME_LEN};
use crate::types::GgmlType;
use crate::value::{Array, Value};

/// Builds a GGUF v3 file in memory or on disk.
#[derive(Clone, Debug, Default)]
pub struct GgufWriter {
    kvs: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

#[derive(Clone, Debug)]
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    data: Vec<u8>,
}

impl GgufWriter {
    /// An empty file. Data is aligned to 32 bytes unless a `general.alignment` u32 is added.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds metadata key `key`, or replaces its value (keeping its position) if already present.
    ///
    /// A `general.alignment` value that is a nonzero power-of-two `U32` sets the data alignment.
    /// Any other `general.alignment` value is written as given (handy for producing invalid
    /// files in tests) and the data is aligned to 32 bytes.
    pub fn add_kv(&mut self, key: &str, value: Value) {
        match self.kvs.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.kvs.push((key.to_string(), value)),
        }
    }

    /// Adds a tensor with shape `dims` (innermost first) whose encoded bytes are `data`.
    /// Fails if the name is taken or too long, the shape is invalid for the type, or `data`
    /// is not exactly the size the shape and type need.
    pub fn add_tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        ggml_type: GgmlType,
        data: Vec<u8>,
    ) -> Result<(), GgufError> {
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufError::DuplicateTensor(name.to_string()));
        }
        if name.len() as u64 > MAX_NAME_LEN {
            return Err(GgufError::TooLarge {
                what: "tensor name length".into(),
                len: name.len() as u64,
                max: MAX_NAME_LEN,
            });
        }
        let (_, n_bytes) = tensor_size(name, dims, ggml_type)?;
        if data.len() as u64 != n_bytes {
            return Err(GgufError::DataSize {
                name: name.to_string(),
                expected: n_bytes,
                actual: data.len() as u64,
            });
        }
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ggml_type,
            data,
        });
        Ok(())
    }

    /// The data alignment the file will use.
    fn alignment(&self) -> usize {
        match self.kvs.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, Value::U32(a))) if a.is_power_of_two() => *a as usize,
            _ => DEFAULT_ALIGNMENT as usize,
        }
    }

    /// Header, metadata, tensor infos and the padding up to the data section.
    fn header(&self) -> Vec<u8> {
        let align = self.alignment();
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        put_u64(&mut out, self.tensors.len());
        put_u64(&mut out, self.kvs.len());
        for (key, value) in &self.kvs {
            put_str(&mut out, key);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            put_u64(&mut out, offset);
            offset += t.data.len() + padding(t.data.len(), align);
        }
        out.resize(out.len() + padding(out.len(), align), 0);
        out
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment();
        let mut out = self.header();
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            out.resize(out.len() + padding(t.data.len(), align), 0);
        }
        out
    }

    /// Writes the file to `path`, streaming the tensor data rather than building it in memory.
    pub fn write_to_path(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        self.write_to(File::create(path)?)
    }

    /// Writes the file to `out` (an opened file, say), streaming the tensor data.
    pub fn write_to(&self, out: impl Write) -> std::io::Result<()> {
        let align = self.alignment();
        let mut w = BufWriter::new(out);
        w.write_all(&self.header())?;
        let zeros = vec![0u8; align];
        for t in &self.tensors {
            w.write_all(&t.data)?;
            w.write_all(&zeros[..padding(t.data.len(), align)])?;
        }
        w.flush()
    }
}

/// Zero bytes needed after `len` bytes to reach a multiple of `align` (a power of two).
fn padding(len: usize, align: usize) -> usize {
    len.wrapping_neg() & (align - 1)
}

fn put_u64(out: &mut Vec<u8>, x: usize) {
    out.extend_from_slice(&(x as u64).to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(a) => put_array(out, a),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// Element type, count, elements. Nested arrays repeat the same encoding per element.
fn put_array(out: &mut Vec<u8>, a: &Array) {
    out.extend_from_slice(&a.elem_type_id().to_le_bytes());
    put_u64(out, a.len());
    fn each<T: Copy, const N: usize>(out: &mut Vec<u8>, v: &[T], to_le: fn(T) -> [u8; N]) {
        v.iter().for_each(|&x| out.extend_from_slice(&to_le(x)));
    }
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => each(out, v, i8::to_le_bytes),
        Array::U16(v) => each(out, v, u16::to_le_bytes),
        Array::I16(v) => each(out, v, i16::to_le_bytes),
        Array::U32(v) => each(out, v, u32::to_le_bytes),
        Array::I32(v) => each(out, v, i32::to_le_bytes),
        Array::F32(v) => each(out, v, f32::to_le_bytes),
        Array::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        Array::String(v) => v.iter().for_each(|s| put_str(out, s)),
        Array::Array(v) => v.iter().for_each(|a| put_array(out, a)),
        Array::U64(v) => each(out, v, u64::to_le_bytes),
        Array::I64(v) => each(out, v, i64::to_le_bytes),
        Array::F64(v) => each(out, v, f64::to_le_bytes),
    }
}
