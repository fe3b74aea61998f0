//! GGUF reader and writer for gemma3-rs.
//!
//! [`GgufFile`] memory-maps a GGUF v2/v3 file, parses its metadata and tensor infos with every
//! length, count, offset and size checked (the file is untrusted input), and hands out tensor
//! data as slices of the map, never copied. [`GgufWriter`] builds GGUF v3 files, for tests and
//! tools.
//!
//! ref: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>
//!
//! ```no_run
//! use gemma3_gguf::GgufFile;
//! let f = GgufFile::open("gemma-3-270m-q4_k_m.gguf")?;
//! let n_layers = f.get_u32("gemma3.block_count")?;
//! let q = f.tensor("blk.0.attn_q.weight").expect("missing tensor");
//! let bytes: &[u8] = f.tensor_data(q); // q.n_bytes bytes of q.ggml_type blocks
//! # let _ = (n_layers, bytes);
//! # Ok::<(), gemma3_gguf::GgufError>(())
//! ```

mod error;
mod reader;
mod types;
mod value;
mod writer;

pub use error::GgufError;
pub use reader::{
    GgufFile, TensorInfo, DEFAULT_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_NAME_LEN,
    MAX_STRING_LEN,
};
pub use types::GgmlType;
pub use value::{Array, StringArray, StringArrayIter, Value};
pub use writer::GgufWriter;
