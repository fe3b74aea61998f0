//! The GGUF reader: parses the header, metadata and tensor infos of a memory-mapped (or owned)
//! file and hands out bounds-checked slices of tensor data.
//!
//! ref: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>
//!
//! The file is untrusted input. Every length and count is capped before anything is allocated
//! (strings by a fixed limit, counts by the bytes left in the file), every size and offset is
//! computed with checked arithmetic, and every tensor's extent is checked against the file size
//! when the file is opened, so [`GgufFile::tensor_data`] never has to fail.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::GgufError;
use crate::types::GgmlType;
use crate::value::{type_id_name, Array, StringArray, Value, TYPE_ARRAY, TYPE_STRING};

/// Longest metadata key or tensor name accepted, in bytes.
pub const MAX_NAME_LEN: u64 = 1 << 20;
/// Longest string value accepted, in bytes.
pub const MAX_STRING_LEN: u64 = 64 << 20;
/// Deepest array nesting accepted (an array of scalars is depth 1).
pub const MAX_ARRAY_DEPTH: u32 = 8;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Data alignment when the file has no `general.alignment` key.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Most metadata keys, and most tensors, a file may have (Gemma 3's have 40
/// and 236): a parsed entry takes about ten times its bytes in memory, so
/// a crafted file of millions of tiny ones would take gigabytes.
pub const MAX_ENTRIES: u64 = 1 << 16;

/// Smallest encoded size of a key/value entry: key length (u64) + value type (u32) + 1-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest encoded size of a tensor info: name length + n_dims + one dim + type + offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// Shape, type and location of one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost first: `dims[0]` is the contiguous row length.
    pub dims: Vec<u64>,
    /// Storage format.
    pub ggml_type: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Product of `dims`.
    pub n_elements: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

/// Where the file's bytes live.
enum Backing {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file. Metadata and tensor infos are parsed into owned values when the file is
/// opened; tensor data stays in the memory map and is never copied.
pub struct GgufFile {
    data: Backing,
    path: Option<PathBuf>,
    version: u32,
    /// In file order.
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    /// In file order.
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_start: u64,
    alignment: u64,
}

impl fmt::Debug for GgufFile {
    // Not derived: the metadata holds the whole vocabulary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("data_start", &self.data_start)
            .field("alignment", &self.alignment)
            .field("file_size", &self.file_size())
            .finish()
    }
}

impl GgufFile {
    /// Maps the file at `path` read-only and parses it. Errors carry the path.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let io_err = |error| GgufError::Io {
            path: path.to_path_buf(),
            error,
        };
        // Only a regular file can be mapped: a directory or device would
        // fail with "No such device", and opening a FIFO would block.
        let meta = std::fs::metadata(path).map_err(io_err)?;
        if !meta.is_file() {
            return Err(io_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let file = File::open(path).map_err(io_err)?;
        // SAFETY: the file is opened read-only and we only ever read through the map. We do not
        // guard against another process truncating or rewriting the file while it is mapped
        // (that could change bytes under us or raise SIGBUS); model files are not expected to
        // change while loaded.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        let mut gguf = Self::parse(Backing::Mmap(mmap)).map_err(|e| GgufError::InFile {
            path: path.to_path_buf(),
            error: Box::new(e),
        })?;
        gguf.path = Some(path.to_path_buf());
        Ok(gguf)
    }

    /// Parses a GGUF file held in memory (same checks as [`GgufFile::open`]).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Backing::Owned(bytes))
    }

    fn parse(data: Backing) -> Result<Self, GgufError> {
        let header = parse_header(&data)?;
        Ok(GgufFile {
            data,
            path: None,
            version: header.version,
            metadata: header.metadata,
            key_index: header.key_index,
            tensors: header.tensors,
            tensor_index: header.tensor_index,
            data_start: header.data_start,
            alignment: header.alignment,
        })
    }

    /// The path given to [`GgufFile::open`], if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata entries, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The value of metadata key `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    fn integer<T: TryFrom<i128>>(&self, key: &str, expected: &'static str) -> Result<T, GgufError> {
        let v = self.require(key)?;
        let Some(i) = v.as_integer() else {
            return Err(wrong_type(key, expected, v));
        };
        T::try_from(i).map_err(|_| GgufError::OutOfRange {
            key: key.to_string(),
            value: i.to_string(),
            expected,
        })
    }

    /// Metadata key `key` as a u32: any integer type is accepted if the value fits.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.integer(key, "u32")
    }

    /// Metadata key `key` as a u64: any integer type is accepted if the value fits.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.integer(key, "u64")
    }

    /// Metadata key `key` as an f32: an F32, or an F64 rounded to f32.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        match self.require(key)? {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            v => Err(wrong_type(key, "f32", v)),
        }
    }

    /// Metadata key `key` as a bool.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(wrong_type(key, "bool", v)),
        }
    }

    /// Metadata key `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            v => Err(wrong_type(key, "string", v)),
        }
    }

    /// Metadata key `key` as an array (of any element type).
    pub fn get_array(&self, key: &str) -> Result<&Array, GgufError> {
        match self.require(key)? {
            Value::Array(a) => Ok(a),
            v => Err(wrong_type(key, "array", v)),
        }
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of tensor `t`: a slice of the mapped file, bounds-checked when it was opened.
    ///
    /// # Panics
    /// If `t` does not lie inside this file, which can only happen when it came from another
    /// file or was built by hand.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let range = self.data_start.checked_add(t.offset).and_then(|start| {
            let end = start.checked_add(t.n_bytes)?;
            Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
        });
        match range.and_then(|r| self.data.get(r)) {
            Some(bytes) => bytes,
            None => panic!(
                "tensor_data: tensor '{}' (offset {}, {} bytes) is not inside this file",
                t.name, t.offset, t.n_bytes
            ),
        }
    }

    /// Tell the kernel that this process will not read bytes `range` of
    /// `t`'s data again (a copy of them lives elsewhere): their mapped pages
    /// leave the resident set. A hint only; reading them later still works
    /// (the pages are read back from the file). No effect on an in-memory
    /// file.
    pub fn release(&self, t: &TensorInfo, range: std::ops::Range<usize>) {
        if let Backing::Mmap(m) = &self.data {
            let base = (self.data_start + t.offset) as usize;
            let end = range.end.min(t.n_bytes as usize);
            if range.start >= end {
                return;
            }
            let start = base + range.start;
            let len = (end - range.start).min(m.len().saturating_sub(start));
            // SAFETY: the mapping is read-only and shared with the file, so
            // MADV_DONTNEED only drops this process's page table entries; a
            // later access faults the same bytes back in from the file. No
            // reference is invalidated.
            let _ =
                unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
        }
    }

    /// Alignment of the data section and of every tensor offset, in bytes.
    pub fn data_alignment(&self) -> usize {
        // Came from a u32, so it fits.
        self.alignment as usize
    }

    /// Absolute file offset of the data section; a tensor's data starts at
    /// `data_start() + offset`.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// Size of the file in bytes.
    pub fn file_size(&self) -> u64 {
        self.data.len() as u64
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &Value) -> GgufError {
    GgufError::WrongType {
        key: key.to_string(),
        expected,
        found: found.type_name(),
    }
}

/// Element count and byte size of a tensor with shape `dims` and type `ty`, checking that the
/// shape is one GGUF allows and that the row length is a whole number of blocks.
pub(crate) fn tensor_size(name: &str, dims: &[u64], ty: GgmlType) -> Result<(u64, u64), GgufError> {
    let bad = |why: String| GgufError::BadDims {
        name: name.to_string(),
        dims: format!("{dims:?}"),
        why,
    };
    if dims.is_empty() || dims.len() > MAX_DIMS as usize {
        return Err(bad(format!(
            "{} dimensions; GGUF allows 1 to {MAX_DIMS}",
            dims.len()
        )));
    }
    let n_elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| GgufError::Overflow {
            what: format!("the element count of tensor '{name}' with dims {dims:?}"),
        })?;
    let row = dims[0];
    let bs = ty.block_size();
    if !row.is_multiple_of(bs) {
        return Err(bad(format!(
            "row length {row} is not a multiple of the {ty} block size {bs}"
        )));
    }
    // n_elements is a multiple of the row length, hence of the block size.
    let n_bytes = ty
        .bytes_for(n_elements)
        .ok_or_else(|| GgufError::Overflow {
            what: format!("the byte size of tensor '{name}' with dims {dims:?}"),
        })?;
    Ok((n_elements, n_bytes))
}

/// Everything parsed from the front of the file.
struct Header {
    version: u32,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_start: u64,
    alignment: u64,
}

/// Description of the field being read, built only when an error needs it.
type What<'w> = &'w dyn Fn() -> String;

/// A little-endian reader over the file bytes. Invariant: `pos <= buf.len()`.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: What) -> Result<&'a [u8], GgufError> {
        let start = self.pos;
        let slice = usize::try_from(n)
            .ok()
            .and_then(|n| start.checked_add(n))
            .and_then(|end| Some((end, self.buf.get(start..end)?)));
        match slice {
            Some((end, bytes)) => {
                self.pos = end;
                Ok(bytes)
            }
            None => Err(GgufError::Truncated {
                what: what(),
                offset: start as u64,
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: What) -> Result<[u8; N], GgufError> {
        Ok(le_bytes(self.take(N as u64, what)?))
    }

    fn u8(&mut self, what: What) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: What) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: What) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A gguf-string: u64 length, then that many UTF-8 bytes.
    fn string(&mut self, max: u64, what: What) -> Result<String, GgufError> {
        self.str(max, what).map(str::to_owned)
    }

    /// A length-prefixed UTF-8 string of at most `max` bytes, borrowed from the buffer.
    fn str(&mut self, max: u64, what: What) -> Result<&'a str, GgufError> {
        let len_what = || format!("{} length", what());
        let len = self.u64(&len_what)?;
        if len > max {
            return Err(GgufError::TooLarge {
                what: len_what(),
                len,
                max,
            });
        }
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| GgufError::BadUtf8 { what: what() })
    }
}

/// Copies a slice of exactly `N` bytes into an array (callers guarantee the length).
fn le_bytes<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(bytes);
    a
}

fn parse_header(buf: &[u8]) -> Result<Header, GgufError> {
    let mut c = Cursor { buf, pos: 0 };
    let magic: [u8; 4] = c.array(&|| "the magic bytes".into())?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic);
    }
    let version = c.u32(&|| "the version".into())?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let tensor_count = c.u64(&|| "the tensor count".into())?;
    let kv_count = c.u64(&|| "the metadata key count".into())?;
    let kv_capacity = cap_count(
        kv_count,
        (c.remaining() / MIN_KV_BYTES).min(MAX_ENTRIES),
        "the metadata key count",
    )?;
    let tensor_capacity = cap_count(
        tensor_count,
        (c.remaining() / MIN_TENSOR_INFO_BYTES).min(MAX_ENTRIES),
        "the tensor count",
    )?;

    let mut metadata = Vec::with_capacity(kv_capacity);
    let mut key_index = HashMap::with_capacity(kv_capacity);
    for i in 0..kv_count {
        let key = c.string(MAX_NAME_LEN, &|| format!("metadata key {i}"))?;
        let ty = c.u32(&|| format!("the value type of metadata key '{key}'"))?;
        let value = read_value(&mut c, ty, &key)?;
        if key_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(GgufError::DuplicateKey(key));
        }
        metadata.push((key, value));
    }

    let alignment = match key_index.get("general.alignment").map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(Value::U32(a)) => return Err(GgufError::BadAlignment(u64::from(*a))),
        Some(v) => return Err(wrong_type("general.alignment", "u32", v)),
    };

    let mut tensors = Vec::with_capacity(tensor_capacity);
    let mut tensor_index = HashMap::with_capacity(tensor_capacity);
    for i in 0..tensor_count {
        let t = read_tensor_info(&mut c, i)?;
        if tensor_index.insert(t.name.clone(), tensors.len()).is_some() {
            return Err(GgufError::DuplicateTensor(t.name));
        }
        tensors.push(t);
    }

    // The data section starts at the first aligned offset after the tensor infos.
    let data_start = align_up(c.pos as u64, alignment).ok_or_else(|| GgufError::Overflow {
        what: "the start of the data section".into(),
    })?;
    let file_size = buf.len() as u64;
    let mut extents = Vec::with_capacity(tensors.len());
    for t in &tensors {
        if t.offset % alignment != 0 {
            return Err(GgufError::MisalignedTensor {
                name: t.name.clone(),
                offset: t.offset,
                alignment,
            });
        }
        let overflow = || GgufError::Overflow {
            what: format!("the file extent of tensor '{}'", t.name),
        };
        let start = data_start.checked_add(t.offset).ok_or_else(overflow)?;
        let end = start.checked_add(t.n_bytes).ok_or_else(overflow)?;
        if end > file_size {
            return Err(GgufError::TensorOutOfBounds {
                name: t.name.clone(),
                start,
                end,
                file_size,
            });
        }
        if end > start {
            extents.push((start, end, &t.name));
        }
    }
    // No two tensors' data share bytes: one tensor's data read as another's
    // had loaded and run without a word.
    extents.sort_unstable();
    for w in extents.windows(2) {
        let ((_, end, first), (start, _, second)) = (w[0], w[1]);
        if start < end {
            return Err(GgufError::OverlappingTensors {
                first: first.clone(),
                second: second.clone(),
                start,
                end,
            });
        }
    }

    Ok(Header {
        version,
        metadata,
        key_index,
        tensors,
        tensor_index,
        data_start,
        alignment,
    })
}

/// Checks a count against the most entries the rest of the file could hold; returns it as a
/// capacity that is safe to allocate.
fn cap_count(count: u64, max: u64, what: &str) -> Result<usize, GgufError> {
    if count > max {
        return Err(GgufError::TooLarge {
            what: format!("{what} (more elements than bytes left in the file: is it truncated?)"),
            len: count,
            max,
        });
    }
    usize::try_from(count).map_err(|_| GgufError::Overflow {
        what: what.to_string(),
    })
}

/// Rounds `x` up to a multiple of `align` (a power of two).
fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

fn read_tensor_info(c: &mut Cursor, i: u64) -> Result<TensorInfo, GgufError> {
    let name = c.string(MAX_NAME_LEN, &|| format!("tensor info {i} name"))?;
    let n_dims = c.u32(&|| format!("the dimension count of tensor '{name}'"))?;
    if !(1..=MAX_DIMS).contains(&n_dims) {
        return Err(GgufError::BadDims {
            name,
            dims: format!("with {n_dims} dimensions"),
            why: format!("GGUF allows 1 to {MAX_DIMS}"),
        });
    }
    let mut dims = Vec::with_capacity(MAX_DIMS as usize);
    for d in 0..n_dims {
        dims.push(c.u64(&|| format!("dimension {d} of tensor '{name}'"))?);
    }
    let id = c.u32(&|| format!("the ggml type of tensor '{name}'"))?;
    let Some(ggml_type) = GgmlType::from_id(id) else {
        return Err(GgufError::UnknownType { name, id });
    };
    let offset = c.u64(&|| format!("the data offset of tensor '{name}'"))?;
    let (n_elements, n_bytes) = tensor_size(&name, &dims, ggml_type)?;
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
        n_elements,
        n_bytes,
    })
}

/// Reads one value of type `ty` belonging to metadata key `key`.
fn read_value(c: &mut Cursor, ty: u32, key: &str) -> Result<Value, GgufError> {
    let what = || format!("the value of metadata key '{key}'");
    Ok(match ty {
        0 => Value::U8(c.u8(&what)?),
        1 => Value::I8(i8::from_le_bytes(c.array(&what)?)),
        2 => Value::U16(u16::from_le_bytes(c.array(&what)?)),
        3 => Value::I16(i16::from_le_bytes(c.array(&what)?)),
        4 => Value::U32(u32::from_le_bytes(c.array(&what)?)),
        5 => Value::I32(i32::from_le_bytes(c.array(&what)?)),
        6 => Value::F32(f32::from_le_bytes(c.array(&what)?)),
        7 => Value::Bool(to_bool(c.u8(&what)?, key)?),
        TYPE_STRING => Value::String(c.string(MAX_STRING_LEN, &what)?),
        TYPE_ARRAY => Value::Array(read_array(c, key, 1)?),
        10 => Value::U64(u64::from_le_bytes(c.array(&what)?)),
        11 => Value::I64(i64::from_le_bytes(c.array(&what)?)),
        12 => Value::F64(f64::from_le_bytes(c.array(&what)?)),
        _ => {
            return Err(GgufError::BadValueType {
                key: key.to_string(),
                ty,
            })
        }
    })
}

fn to_bool(byte: u8, key: &str) -> Result<bool, GgufError> {
    match byte {
        0 => Ok(false),
        1 => Ok(true),
        byte => Err(GgufError::BadBool {
            key: key.to_string(),
            byte,
        }),
    }
}

/// Smallest encoded size of one element of value type `ty`, or `None` for an unknown type.
fn min_elem_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        TYPE_STRING => 8,    // u64 length
        TYPE_ARRAY => 4 + 8, // element type + count
        _ => return None,
    })
}

/// Reads an array (element type, count, elements) at nesting level `depth` (1 = outermost).
fn read_array(c: &mut Cursor, key: &str, depth: u32) -> Result<Array, GgufError> {
    if depth > MAX_ARRAY_DEPTH {
        return Err(GgufError::Depth {
            key: key.to_string(),
        });
    }
    let ty = c.u32(&|| format!("the array element type of metadata key '{key}'"))?;
    let count = c.u64(&|| format!("the array length of metadata key '{key}'"))?;
    let Some(min_bytes) = min_elem_bytes(ty) else {
        return Err(GgufError::BadValueType {
            key: key.to_string(),
            ty,
        });
    };
    let n = cap_count(
        count,
        c.remaining() / min_bytes,
        &format!("the array length of metadata key '{key}'"),
    )?;
    let what = || {
        format!(
            "the {} array elements of metadata key '{key}'",
            type_id_name(ty)
        )
    };
    Ok(match ty {
        0 => Array::U8(c.take(count, &what)?.to_vec()),
        1 => Array::I8(read_vec(c, n, &what, i8::from_le_bytes)?),
        2 => Array::U16(read_vec(c, n, &what, u16::from_le_bytes)?),
        3 => Array::I16(read_vec(c, n, &what, i16::from_le_bytes)?),
        4 => Array::U32(read_vec(c, n, &what, u32::from_le_bytes)?),
        5 => Array::I32(read_vec(c, n, &what, i32::from_le_bytes)?),
        6 => Array::F32(read_vec(c, n, &what, f32::from_le_bytes)?),
        7 => Array::Bool(
            c.take(count, &what)?
                .iter()
                .map(|&b| to_bool(b, key))
                .collect::<Result<_, _>>()?,
        ),
        TYPE_STRING => {
            let mut v = StringArray::with_capacity(n);
            for i in 0..n {
                v.push(c.str(MAX_STRING_LEN, &|| {
                    format!("string {i} of metadata key '{key}'")
                })?);
            }
            Array::String(v)
        }
        TYPE_ARRAY => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_array(c, key, depth + 1)?);
            }
            Array::Array(v)
        }
        10 => Array::U64(read_vec(c, n, &what, u64::from_le_bytes)?),
        11 => Array::I64(read_vec(c, n, &what, i64::from_le_bytes)?),
        12 => Array::F64(read_vec(c, n, &what, f64::from_le_bytes)?),
        // min_elem_bytes rejected every other id above.
        _ => {
            return Err(GgufError::BadValueType {
                key: key.to_string(),
                ty,
            })
        }
    })
}

/// Reads `n` fixed-size little-endian elements.
fn read_vec<T, const N: usize>(
    c: &mut Cursor,
    n: usize,
    what: What,
    from_le: fn([u8; N]) -> T,
) -> Result<Vec<T>, GgufError> {
    let len = (n as u64)
        .checked_mul(N as u64)
        .ok_or_else(|| GgufError::Overflow { what: what() })?;
    let bytes = c.take(len, what)?;
    Ok(bytes
        .chunks_exact(N)
        .map(|chunk| from_le(le_bytes(chunk)))
        .collect())
}
