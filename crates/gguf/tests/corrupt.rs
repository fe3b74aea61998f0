//! Malformed files give specific errors, never panics.
//!
//! Most files here are assembled field by field with [`Raw`] so that each corruption is
//! explicit; the rest patch bytes of a file made by [`GgufWriter`].

use gemma3_gguf::{Array, GgmlType, GgufError, GgufFile, GgufWriter, Value};

/// Little-endian byte builder for hand-made GGUF files.
#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    /// Magic, version, tensor count, kv count.
    fn header(version: u32, tensors: u64, kvs: u64) -> Self {
        Raw::default()
            .bytes(b"GGUF")
            .u32(version)
            .u64(tensors)
            .u64(kvs)
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn u8(self, x: u8) -> Self {
        self.bytes(&[x])
    }
    fn u32(self, x: u32) -> Self {
        self.bytes(&x.to_le_bytes())
    }
    fn u64(self, x: u64) -> Self {
        self.bytes(&x.to_le_bytes())
    }
    fn str(self, s: &str) -> Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    /// A tensor info: name, n_dims, dims, type, offset.
    fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Self {
        let mut r = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            r = r.u64(d);
        }
        r.u32(ty).u64(offset)
    }
    /// Zero padding up to a multiple of `align`, then `n` data bytes.
    fn data(mut self, align: usize, n: usize) -> Self {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self.0.resize(self.0.len() + n, 0xAB);
        self
    }
    fn parse(self) -> Result<GgufFile, GgufError> {
        GgufFile::from_bytes(self.0)
    }
}

fn err(r: Raw) -> GgufError {
    match r.parse() {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

/// A small valid file with metadata of several types and three tensors. The last tensor's
/// data (8 × 4 bytes) ends exactly on a 32-byte boundary, so the file has no trailing padding
/// and every strict prefix is missing something the reader needs.
fn small_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", Value::String("gemma3".into()));
    w.add_kv("gemma3.block_count", Value::U32(18));
    w.add_kv("flag", Value::Bool(true));
    w.add_kv(
        "nested",
        Value::Array(Array::Array(vec![
            Array::String(vec!["ab".into(), String::new()].into()),
            Array::F32(vec![1.0]),
        ])),
    );
    w.add_kv(
        "tokens",
        Value::Array(Array::String(vec!["<pad>".into()].into())),
    );
    w.add_tensor("a", &[3], GgmlType::F32, vec![1; 12]).unwrap();
    w.add_tensor("q", &[32], GgmlType::Q8_0, vec![2; 34])
        .unwrap();
    w.add_tensor("b", &[8], GgmlType::F32, vec![3; 32]).unwrap();
    w.to_bytes()
}

#[test]
fn every_truncation_is_an_error() {
    let full = small_file();
    assert!(GgufFile::from_bytes(full.clone()).is_ok());
    for len in 0..full.len() {
        let r = std::panic::catch_unwind(|| GgufFile::from_bytes(full[..len].to_vec()));
        match r {
            Ok(Err(_)) => {}
            Ok(Ok(_)) => panic!("prefix of {len} of {} bytes parsed", full.len()),
            Err(_) => panic!("prefix of {len} bytes panicked"),
        }
    }
}

#[test]
fn every_single_byte_corruption_is_handled() {
    // Not asserting Err (many bytes are data or values), only that nothing panics.
    let full = small_file();
    for i in 0..full.len() {
        for x in [0x00, 0x01, 0x7F, 0xFF] {
            let mut b = full.clone();
            b[i] = x;
            let _ = GgufFile::from_bytes(b);
        }
    }
}

#[test]
fn truncated_message_names_field_and_offset() {
    // Header (24 bytes), then metadata key 0's length (8 bytes) claims 100 bytes; 20 follow.
    let e = err(Raw::header(3, 0, 1).u64(100).bytes(&[b'a'; 20]));
    assert_eq!(
        e.to_string(),
        "file truncated while reading metadata key 0 at byte 32"
    );
}

#[test]
fn bad_magic() {
    let mut b = small_file();
    b[0] = b'X';
    assert!(matches!(
        GgufFile::from_bytes(b).unwrap_err(),
        GgufError::BadMagic
    ));
}

#[test]
fn version_4_and_1_are_refused_and_2_is_accepted() {
    for v in [0, 1, 4, u32::MAX] {
        let mut b = small_file();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        let e = GgufFile::from_bytes(b).unwrap_err();
        assert!(
            matches!(e, GgufError::UnsupportedVersion(x) if x == v),
            "{e}"
        );
    }
    let mut b = small_file();
    b[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(GgufFile::from_bytes(b).unwrap().version(), 2);
}

#[test]
fn unknown_tensor_type() {
    let e = err(Raw::header(3, 1, 0)
        .tensor("blk.0.attn_q.weight", &[32], 99, 0)
        .data(32, 64));
    assert!(matches!(&e, GgufError::UnknownType { name, id: 99 } if name == "blk.0.attn_q.weight"));
    assert_eq!(
        e.to_string(),
        "tensor 'blk.0.attn_q.weight' has unknown ggml type 99"
    );
}

#[test]
fn tensor_past_end_of_file() {
    // 4 F32 = 16 bytes needed, 15 present.
    let e = err(Raw::header(3, 1, 0).tensor("t", &[4], 0, 0).data(32, 15));
    assert!(
        matches!(&e, GgufError::TensorOutOfBounds { name, start: 64, end: 80, file_size: 79 } if name == "t"),
        "{e}"
    );
    // An offset far past the end.
    let e = err(Raw::header(3, 1, 0)
        .tensor("t", &[4], 0, 1 << 40)
        .data(32, 16));
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");
    // An offset whose absolute position overflows u64.
    let e = err(Raw::header(3, 1, 0)
        .tensor("t", &[4], 0, u64::MAX - 31)
        .data(32, 16));
    assert!(matches!(e, GgufError::Overflow { .. }), "{e}");
}

/// Two tensors whose data share bytes (one read as the other's had loaded and run without a
/// word); tensors side by side, or one of none, are fine.
#[test]
fn overlapping_tensors() {
    let e = err(Raw::header(3, 2, 0)
        .tensor("a", &[16], 0, 0)
        .tensor("b", &[4], 0, 32)
        .data(32, 64));
    assert!(
        matches!(&e, GgufError::OverlappingTensors { first, second, .. } if first == "a" && second == "b"),
        "{e}"
    );
    let e = err(Raw::header(3, 2, 0)
        .tensor("a", &[4], 0, 0)
        .tensor("b", &[4], 0, 0)
        .data(32, 64));
    assert!(matches!(e, GgufError::OverlappingTensors { .. }), "{e}");
    let ok = Raw::header(3, 3, 0)
        .tensor("a", &[8], 0, 32)
        .tensor("b", &[8], 0, 0)
        .tensor("empty", &[0], 0, 0)
        .data(32, 64)
        .parse();
    assert!(ok.is_ok(), "{:?}", ok.err());
}

#[test]
fn misaligned_offset() {
    let e = err(Raw::header(3, 1, 0).tensor("t", &[4], 0, 4).data(32, 64));
    assert!(
        matches!(&e, GgufError::MisalignedTensor { name, offset: 4, alignment: 32 } if name == "t"),
        "{e}"
    );
}

#[test]
fn absurd_string_lengths() {
    // Key length.
    // (Trailing bytes so that the header's counts pass their own cap.)
    let e = err(Raw::header(3, 0, 1).u64(u64::MAX).bytes(&[0; 32]));
    assert!(
        matches!(&e, GgufError::TooLarge { len: u64::MAX, .. }),
        "{e}"
    );
    // String value length.
    let e = err(Raw::header(3, 0, 1).str("k").u32(8).u64(u64::MAX));
    assert!(
        matches!(&e, GgufError::TooLarge { len: u64::MAX, max, .. } if *max == 64 << 20),
        "{e}"
    );
    // Tensor name length.
    let e = err(Raw::header(3, 1, 0).u64(u64::MAX).bytes(&[0; 32]));
    assert!(
        matches!(e, GgufError::TooLarge { len: u64::MAX, .. }),
        "{e}"
    );
    // Under the cap but past the end of the file: truncation.
    let e = err(Raw::header(3, 0, 1).str("k").u32(8).u64(1000).bytes(b"abc"));
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
}

#[test]
fn absurd_counts() {
    // Array element count.
    let e = err(Raw::header(3, 0, 1)
        .str("k")
        .u32(9)
        .u32(4)
        .u64(u64::MAX)
        .u32(1));
    assert!(
        matches!(e, GgufError::TooLarge { len: u64::MAX, .. }),
        "{e}"
    );
    // An array of strings whose count exceeds remaining/8.
    let e = err(Raw::header(3, 0, 1).str("k").u32(9).u32(8).u64(3).u64(0));
    assert!(
        matches!(e, GgufError::TooLarge { len: 3, max: 1, .. }),
        "{e}"
    );
    // Header counts: more than the file could hold, or than any model has (65536) in a
    // file large enough for them (a parsed entry takes about ten times its bytes).
    let e = err(Raw::header(3, 0, 70_000).bytes(&vec![0; 70_000 * 13]));
    assert!(
        matches!(
            e,
            GgufError::TooLarge {
                len: 70_000,
                max: 65_536,
                ..
            }
        ),
        "{e}"
    );
    let e = err(Raw::header(3, 70_000, 0).bytes(&vec![0; 70_000 * 32]));
    assert!(
        matches!(
            e,
            GgufError::TooLarge {
                len: 70_000,
                max: 65_536,
                ..
            }
        ),
        "{e}"
    );
    let e = err(Raw::header(3, u64::MAX, 0));
    assert!(matches!(e, GgufError::TooLarge { .. }), "{e}");
    let e = err(Raw::header(3, 0, u64::MAX));
    assert!(matches!(e, GgufError::TooLarge { .. }), "{e}");
}

/// `depth` arrays nested inside each other, the innermost holding one u8.
fn nested(depth: usize) -> Value {
    let mut a = Array::U8(vec![1]);
    for _ in 1..depth {
        a = Array::Array(vec![a]);
    }
    Value::Array(a)
}

#[test]
fn nesting_depth() {
    let mut w = GgufWriter::new();
    w.add_kv("deep", nested(8));
    let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
    assert_eq!(f.get("deep"), Some(&nested(8)));

    let mut w = GgufWriter::new();
    w.add_kv("deeper", nested(9));
    let e = GgufFile::from_bytes(w.to_bytes()).unwrap_err();
    assert!(
        matches!(&e, GgufError::Depth { key } if key == "deeper"),
        "{e}"
    );
}

#[test]
fn bool_byte_2() {
    let e = err(Raw::header(3, 0, 1).str("b").u32(7).u8(2));
    assert!(
        matches!(&e, GgufError::BadBool { key, byte: 2 } if key == "b"),
        "{e}"
    );
    // Inside an array too.
    let e = err(Raw::header(3, 0, 1)
        .str("b")
        .u32(9)
        .u32(7)
        .u64(2)
        .u8(1)
        .u8(2));
    assert!(matches!(e, GgufError::BadBool { byte: 2, .. }), "{e}");
}

#[test]
fn n_dims_5_and_0() {
    for n in [0u32, 5, u32::MAX] {
        let e = err(Raw::header(3, 1, 0).str("t").u32(n).bytes(&[0; 64]));
        assert!(
            matches!(&e, GgufError::BadDims { name, .. } if name == "t"),
            "{e}"
        );
    }
}

#[test]
fn dims_product_overflows() {
    let e = err(Raw::header(3, 1, 0)
        .tensor("t", &[1 << 32, 1 << 32], 0, 0)
        .data(32, 16));
    assert!(matches!(e, GgufError::Overflow { .. }), "{e}");
    // The element count fits but the byte count does not.
    let e = err(Raw::header(3, 1, 0)
        .tensor("t", &[1 << 32, 1 << 31], 0, 0)
        .data(32, 16));
    assert!(matches!(e, GgufError::Overflow { .. }), "{e}");
}

#[test]
fn row_length_not_a_multiple_of_block_size() {
    let e = err(Raw::header(3, 1, 0)
        .tensor("t", &[33, 2], GgmlType::Q4_0.id(), 0)
        .data(32, 64));
    assert_eq!(
        e.to_string(),
        "tensor 't' has invalid shape [33, 2]: row length 33 is not a multiple of the Q4_0 block size 32"
    );
}

#[test]
fn bad_value_type() {
    let e = err(Raw::header(3, 0, 1).str("k").u32(13).u32(0));
    assert!(
        matches!(&e, GgufError::BadValueType { key, ty: 13 } if key == "k"),
        "{e}"
    );
    let e = err(Raw::header(3, 0, 1).str("k").u32(9).u32(99).u64(0));
    assert!(matches!(e, GgufError::BadValueType { ty: 99, .. }), "{e}");
}

#[test]
fn bad_utf8() {
    let e = err(Raw::header(3, 0, 1)
        .u64(2)
        .bytes(&[0xC3, 0x28])
        .bytes(&[0; 16]));
    assert!(matches!(e, GgufError::BadUtf8 { .. }), "{e}");
    let e = err(Raw::header(3, 0, 1).str("k").u32(8).u64(1).u8(0xFF));
    assert!(matches!(e, GgufError::BadUtf8 { .. }), "{e}");
}

#[test]
fn duplicates() {
    let e = err(Raw::header(3, 0, 2)
        .str("k")
        .u32(4)
        .u32(1)
        .str("k")
        .u32(4)
        .u32(2));
    assert!(matches!(&e, GgufError::DuplicateKey(k) if k == "k"), "{e}");
    let e = err(Raw::header(3, 2, 0)
        .tensor("t", &[4], 0, 0)
        .tensor("t", &[4], 0, 32)
        .data(32, 64));
    assert!(
        matches!(&e, GgufError::DuplicateTensor(t) if t == "t"),
        "{e}"
    );
}

#[test]
fn bad_alignment() {
    for a in [0u32, 3, 48] {
        let mut w = GgufWriter::new();
        w.add_kv("general.alignment", Value::U32(a));
        let e = GgufFile::from_bytes(w.to_bytes()).unwrap_err();
        assert!(
            matches!(e, GgufError::BadAlignment(x) if x == u64::from(a)),
            "{e}"
        );
    }
    let mut w = GgufWriter::new();
    w.add_kv("general.alignment", Value::U64(32));
    let e = GgufFile::from_bytes(w.to_bytes()).unwrap_err();
    assert!(matches!(e, GgufError::WrongType { .. }), "{e}");
}

/// A string array's elements are checked one by one, and the error names the bad one.
#[test]
fn bad_utf8_in_a_string_array() {
    let e = err(Raw::header(3, 0, 1)
        .str("tokens")
        .u32(9)
        .u32(8)
        .u64(3)
        .str("ok")
        .u64(2)
        .bytes(&[0xC3, 0x28])
        .str("never read"));
    assert!(
        matches!(&e, GgufError::BadUtf8 { what } if what.contains("string 1 of metadata key 'tokens'")),
        "{e}"
    );
}
