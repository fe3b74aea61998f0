//! The error type.

use std::path::PathBuf;

/// Everything that can go wrong reading or writing a GGUF file. Messages name the file, key,
/// tensor or byte offset involved.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("cannot read model file {}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error: in the message, and so not also the error's source,
        /// which printing the chain (`anyhow`'s `{:#}`) would repeat.
        error: std::io::Error,
    },
    /// A parse error in a named file (added by [`crate::GgufFile::open`]); see [`GgufError::inner`].
    #[error("model file {}: {error}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        error: Box<GgufError>,
    },
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file (the first four bytes are not \"GGUF\")")]
    BadMagic,
    /// A GGUF version other than 2 or 3.
    #[error("unsupported GGUF version {0} (this reader handles versions 2 and 3)")]
    UnsupportedVersion(u32),
    /// The file ended in the middle of a field.
    #[error("file truncated while reading {what} at byte {offset}")]
    Truncated {
        /// The field being read.
        what: String,
        /// Where the field starts.
        offset: u64,
    },
    /// A metadata value (or array element) type id outside 0..=12.
    #[error("metadata key '{key}' has unknown value type {ty}")]
    BadValueType {
        /// The key.
        key: String,
        /// The type id found.
        ty: u32,
    },
    /// A bool stored as a byte other than 0 or 1.
    #[error("metadata key '{key}' holds a bool byte of {byte} (must be 0 or 1)")]
    BadBool {
        /// The key.
        key: String,
        /// The byte found.
        byte: u8,
    },
    /// A string that is not valid UTF-8.
    #[error("{what} is not valid UTF-8")]
    BadUtf8 {
        /// The string.
        what: String,
    },
    /// A length or count above a hard limit (or above what the rest of the file can hold).
    #[error("{what} is {len}, above the limit of {max}")]
    TooLarge {
        /// The length or count.
        what: String,
        /// Its value.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Arrays nested deeper than 8 levels.
    #[error("metadata key '{key}' nests arrays deeper than 8 levels")]
    Depth {
        /// The key.
        key: String,
    },
    /// `general.alignment` is zero or not a power of two.
    #[error("general.alignment is {0}; it must be a nonzero power of two")]
    BadAlignment(u64),
    /// A tensor's data does not lie inside the file.
    #[error(
        "tensor '{name}' data spans bytes {start}..{end}, past the end of the file ({file_size} bytes)"
    )]
    TensorOutOfBounds {
        /// The tensor.
        name: String,
        /// Absolute start offset.
        start: u64,
        /// Absolute end offset (exclusive).
        end: u64,
        /// The file's size.
        file_size: u64,
    },
    /// Two tensors' data share bytes (llama.cpp's loader refuses this too).
    #[error("tensors '{first}' and '{second}' share bytes of the file ({second} starts at {start}, before {first} ends at {end})")]
    OverlappingTensors {
        /// The tensor that starts first.
        first: String,
        /// The one that starts inside it.
        second: String,
        /// Where `second` starts (absolute).
        start: u64,
        /// Where `first` ends (absolute, exclusive).
        end: u64,
    },
    /// A tensor offset that is not a multiple of the data alignment.
    #[error("tensor '{name}' offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        /// The tensor.
        name: String,
        /// Its offset relative to the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// A ggml type id this crate does not know.
    #[error("tensor '{name}' has unknown ggml type {id}")]
    UnknownType {
        /// The tensor.
        name: String,
        /// The type id found.
        id: u32,
    },
    /// A shape GGUF or the tensor's type does not allow.
    #[error("tensor '{name}' has invalid shape {dims}: {why}")]
    BadDims {
        /// The tensor.
        name: String,
        /// The shape, as text.
        dims: String,
        /// What is wrong with it.
        why: String,
    },
    /// Two tensors with the same name.
    #[error("tensor '{0}' appears more than once")]
    DuplicateTensor(String),
    /// Two metadata entries with the same key.
    #[error("metadata key '{0}' appears more than once")]
    DuplicateKey(String),
    /// A metadata key that a getter asked for is absent.
    #[error("metadata key '{0}' is missing")]
    MissingKey(String),
    /// A metadata value of a type the getter cannot convert.
    #[error("metadata key '{key}' has type {found}, expected {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// What the getter accepts.
        expected: &'static str,
        /// The value's type.
        found: String,
    },
    /// An integer metadata value that does not fit the getter's type (e.g. a negative count).
    #[error("metadata key '{key}' value {value} does not fit in {expected}")]
    OutOfRange {
        /// The key.
        key: String,
        /// The value, as text.
        value: String,
        /// The getter's type.
        expected: &'static str,
    },
    /// A size or offset computation overflowed `u64`.
    #[error("size overflow computing {what}")]
    Overflow {
        /// The computation.
        what: String,
    },
    /// Tensor data handed to the writer has the wrong length for its shape and type.
    #[error("tensor '{name}' needs {expected} bytes of data, got {actual}")]
    DataSize {
        /// The tensor.
        name: String,
        /// Bytes its shape and type need.
        expected: u64,
        /// Bytes given.
        actual: u64,
    },
}

impl GgufError {
    /// The underlying error without the file-path wrapper that [`crate::GgufFile::open`] adds,
    /// so callers can match on what went wrong.
    pub fn inner(&self) -> &GgufError {
        match self {
            GgufError::InFile { error, .. } => error.inner(),
            e => e,
        }
    }
}
