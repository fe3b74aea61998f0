//! Writer → reader round trips, typed getters, and opening files from disk.

use gemma3_gguf::{Array, GgmlType, GgufError, GgufFile, GgufWriter, Value};

/// Deterministic filler bytes for tensor data.
fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// One value of every type, including nested and empty arrays and an empty string.
fn all_values() -> Vec<(&'static str, Value)> {
    vec![
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(60000)),
        ("t.i16", Value::I16(-30000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.f32", Value::F32(1.5e-3)),
        ("t.bool_true", Value::Bool(true)),
        ("t.bool_false", Value::Bool(false)),
        ("t.string", Value::String("héllo <start_of_turn>".into())),
        ("t.empty_string", Value::String(String::new())),
        ("t.u64", Value::U64(u64::MAX)),
        ("t.i64", Value::I64(i64::MIN)),
        ("t.f64", Value::F64(-1e300)),
        ("a.u8", Value::Array(Array::U8(vec![0, 1, 255]))),
        ("a.i8", Value::Array(Array::I8(vec![-128, 127]))),
        ("a.u16", Value::Array(Array::U16(vec![1, 65535]))),
        ("a.i16", Value::Array(Array::I16(vec![-1, 2]))),
        ("a.u32", Value::Array(Array::U32(vec![7, u32::MAX]))),
        ("a.i32", Value::Array(Array::I32(vec![-7, 1, 3]))),
        (
            "a.f32",
            Value::Array(Array::F32(vec![0.5, -2.25, f32::MAX])),
        ),
        ("a.bool", Value::Array(Array::Bool(vec![true, false, true]))),
        (
            "a.string",
            Value::Array(Array::String(
                vec!["a".into(), String::new(), "ü".into()].into(),
            )),
        ),
        ("a.u64", Value::Array(Array::U64(vec![u64::MAX, 0]))),
        ("a.i64", Value::Array(Array::I64(vec![i64::MIN, i64::MAX]))),
        ("a.f64", Value::Array(Array::F64(vec![1.0, -0.0]))),
        ("a.empty_f32", Value::Array(Array::F32(vec![]))),
        ("a.empty_string", Value::Array(Array::String(vec![].into()))),
        ("a.empty_array", Value::Array(Array::Array(vec![]))),
        (
            "a.nested",
            Value::Array(Array::Array(vec![
                Array::I32(vec![1, 2]),
                Array::String(vec!["x".into()].into()),
                Array::Array(vec![Array::U8(vec![9]), Array::Bool(vec![])]),
                Array::F64(vec![]),
            ])),
        ),
    ]
}

/// (name, dims, type) for tensors of several types; sizes are deliberately not multiples of
/// the alignment so that padding is exercised.
fn tensor_specs() -> Vec<(&'static str, Vec<u64>, GgmlType)> {
    vec![
        ("norm.weight", vec![5], GgmlType::F32),
        ("f16.weight", vec![3, 2], GgmlType::F16),
        ("bf16.weight", vec![7], GgmlType::BF16),
        ("q4_0.weight", vec![64, 3], GgmlType::Q4_0),
        ("q5_0.weight", vec![32, 1, 2], GgmlType::Q5_0),
        ("q8_0.weight", vec![32, 2, 1, 3], GgmlType::Q8_0),
        ("q4_k.weight", vec![256, 2], GgmlType::Q4K),
        ("q6_k.weight", vec![512], GgmlType::Q6K),
    ]
}

/// (name, dims, type, data) of a tensor added to a writer.
type Written = (&'static str, Vec<u64>, GgmlType, Vec<u8>);

fn build(alignment: Option<u32>) -> (GgufWriter, Vec<Written>) {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", Value::String("gemma3".into()));
    if let Some(a) = alignment {
        w.add_kv("general.alignment", Value::U32(a));
    }
    for (k, v) in all_values() {
        w.add_kv(k, v);
    }
    let mut tensors = Vec::new();
    for (i, (name, dims, ty)) in tensor_specs().into_iter().enumerate() {
        let n: u64 = dims.iter().product();
        let data = bytes(ty.bytes_for(n).unwrap() as usize, i as u8);
        w.add_tensor(name, &dims, ty, data.clone()).unwrap();
        tensors.push((name, dims, ty, data));
    }
    (w, tensors)
}

fn check_round_trip(alignment: Option<u32>) {
    let (w, tensors) = build(alignment);
    let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
    let align = alignment.unwrap_or(32) as u64;

    assert_eq!(f.version(), 3);
    assert_eq!(f.data_alignment() as u64, align);
    assert_eq!(f.data_start() % align, 0);

    // Metadata: every entry, in order, with identical values.
    let mut expected = vec![(
        "general.architecture".to_string(),
        Value::String("gemma3".into()),
    )];
    if let Some(a) = alignment {
        expected.push(("general.alignment".into(), Value::U32(a)));
    }
    expected.extend(all_values().into_iter().map(|(k, v)| (k.to_string(), v)));
    assert_eq!(f.metadata(), &expected[..]);
    for (k, v) in &expected {
        assert_eq!(f.get(k), Some(v), "{k}");
    }

    // Tensors: infos and data bytes identical, offsets aligned, data inside the file.
    assert_eq!(f.tensors().len(), tensors.len());
    for (info, (name, dims, ty, data)) in f.tensors().iter().zip(&tensors) {
        assert_eq!(&info.name, name);
        assert_eq!(&info.dims, dims);
        assert_eq!(info.ggml_type, *ty);
        assert_eq!(info.n_elements, dims.iter().product::<u64>());
        assert_eq!(info.n_bytes, data.len() as u64);
        assert_eq!(info.offset % align, 0, "{name}");
        assert_eq!(f.tensor(name), Some(info));
        assert_eq!(f.tensor_data(info), &data[..], "{name}");
    }
    assert_eq!(f.tensor("nope"), None);
    assert_eq!(f.get("nope"), None);
}

#[test]
fn round_trip_default_alignment() {
    check_round_trip(None);
}

#[test]
fn round_trip_alignment_64() {
    check_round_trip(Some(64));
}

#[test]
fn round_trip_other_alignments() {
    for a in [1, 2, 8, 128, 4096] {
        check_round_trip(Some(a));
    }
}

#[test]
fn round_trip_no_tensors_no_metadata() {
    let f = GgufFile::from_bytes(GgufWriter::new().to_bytes()).unwrap();
    assert!(f.metadata().is_empty());
    assert!(f.tensors().is_empty());
}

#[test]
fn replacing_a_key_keeps_its_position() {
    let mut w = GgufWriter::new();
    w.add_kv("a", Value::U32(1));
    w.add_kv("b", Value::U32(2));
    w.add_kv("a", Value::U32(3));
    let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
    assert_eq!(
        f.metadata(),
        &[
            ("a".to_string(), Value::U32(3)),
            ("b".into(), Value::U32(2))
        ]
    );
}

#[test]
fn writer_rejects_bad_tensors() {
    let mut w = GgufWriter::new();
    w.add_tensor("t", &[4], GgmlType::F32, vec![0; 16]).unwrap();
    assert!(matches!(
        w.add_tensor("t", &[4], GgmlType::F32, vec![0; 16]),
        Err(GgufError::DuplicateTensor(n)) if n == "t"
    ));
    assert!(matches!(
        w.add_tensor("short", &[4], GgmlType::F32, vec![0; 15]),
        Err(GgufError::DataSize {
            expected: 16,
            actual: 15,
            ..
        })
    ));
    assert!(matches!(
        w.add_tensor("rows", &[33], GgmlType::Q8_0, vec![0; 34]),
        Err(GgufError::BadDims { .. })
    ));
    assert!(matches!(
        w.add_tensor("five", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4]),
        Err(GgufError::BadDims { .. })
    ));
    assert!(matches!(
        w.add_tensor("none", &[], GgmlType::F32, vec![]),
        Err(GgufError::BadDims { .. })
    ));
    assert!(matches!(
        w.add_tensor("huge", &[u64::MAX, 2], GgmlType::F32, vec![]),
        Err(GgufError::Overflow { .. })
    ));
}

#[test]
fn typed_getters() {
    let mut w = GgufWriter::new();
    w.add_kv("u8", Value::U8(7));
    w.add_kv("i64", Value::I64(1 << 40));
    w.add_kv("neg", Value::I32(-1));
    w.add_kv("u64big", Value::U64(u64::MAX));
    w.add_kv("f32", Value::F32(0.25));
    w.add_kv("f64", Value::F64(1e6));
    w.add_kv("b", Value::Bool(true));
    w.add_kv("s", Value::String("gemma3".into()));
    w.add_kv("arr", Value::Array(Array::String(vec!["x".into()].into())));
    let f = GgufFile::from_bytes(w.to_bytes()).unwrap();

    assert_eq!(f.get_u32("u8").unwrap(), 7);
    assert_eq!(f.get_u64("u8").unwrap(), 7);
    assert_eq!(f.get_u64("i64").unwrap(), 1 << 40);
    assert_eq!(f.get_u64("u64big").unwrap(), u64::MAX);
    assert_eq!(f.get_f32("f32").unwrap(), 0.25);
    assert_eq!(f.get_f32("f64").unwrap(), 1e6);
    assert!(f.get_bool("b").unwrap());
    assert_eq!(f.get_str("s").unwrap(), "gemma3");
    assert_eq!(
        f.get_array("arr")
            .unwrap()
            .as_strings()
            .map(|a| a.iter().collect::<Vec<_>>()),
        Some(vec!["x"])
    );

    // Missing, wrong type and out of range are distinct errors that name the key.
    let e = f.get_u32("absent").unwrap_err();
    assert!(matches!(&e, GgufError::MissingKey(k) if k == "absent"));
    assert_eq!(e.to_string(), "metadata key 'absent' is missing");

    let e = f.get_u32("s").unwrap_err();
    assert!(
        matches!(&e, GgufError::WrongType { key, expected: "u32", found } if key == "s" && found == "string")
    );
    assert_eq!(
        e.to_string(),
        "metadata key 's' has type string, expected u32"
    );

    let e = f.get_u32("neg").unwrap_err();
    assert!(matches!(&e, GgufError::OutOfRange { key, .. } if key == "neg"));
    assert_eq!(
        e.to_string(),
        "metadata key 'neg' value -1 does not fit in u32"
    );
    assert!(matches!(
        f.get_u32("i64"),
        Err(GgufError::OutOfRange { .. })
    ));
    assert!(matches!(
        f.get_u32("u64big"),
        Err(GgufError::OutOfRange { .. })
    ));

    let e = f.get_str("arr").unwrap_err();
    assert_eq!(
        e.to_string(),
        "metadata key 'arr' has type array of string, expected string"
    );
    assert!(matches!(f.get_f32("u8"), Err(GgufError::WrongType { .. })));
    assert!(matches!(f.get_bool("u8"), Err(GgufError::WrongType { .. })));
    assert!(matches!(f.get_array("s"), Err(GgufError::WrongType { .. })));
}

/// A path under the system temp dir that is unique to this process and test.
fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("gemma3-gguf-{}-{name}.gguf", std::process::id()))
}

#[test]
fn write_to_path_and_open() {
    let (w, tensors) = build(Some(64));
    let path = temp_path("roundtrip");
    w.write_to_path(&path).unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk, w.to_bytes(), "streamed file equals to_bytes()");

    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.path(), Some(path.as_path()));
    assert_eq!(f.file_size(), on_disk.len() as u64);
    for (name, _, _, data) in &tensors {
        assert_eq!(f.tensor_data(f.tensor(name).unwrap()), &data[..]);
    }
    drop(f);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn open_errors_name_the_file() {
    let missing = temp_path("does-not-exist");
    let e = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(&e, GgufError::Io { path, .. } if path == &missing));
    assert!(e
        .to_string()
        .starts_with(&format!("cannot read model file {}: ", missing.display())));
    // The OS error is said once along the chain, as `gemma3` prints it ("{:#}").
    let mut chain = e.to_string();
    let mut next = std::error::Error::source(&e);
    while let Some(s) = next {
        chain += &format!(": {s}");
        next = s.source();
    }
    assert_eq!(chain.matches("os error").count(), 1, "{chain}");

    let path = temp_path("truncated");
    let mut b = GgufWriter::new().to_bytes();
    b.truncate(10);
    std::fs::write(&path, &b).unwrap();
    let e = GgufFile::open(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "model file {}: file truncated while reading the tensor count at byte 8",
            path.display()
        )
    );
    assert!(matches!(e.inner(), GgufError::Truncated { offset: 8, .. }));

    // An empty file is an error, not a panic.
    std::fs::write(&path, b"").unwrap();
    assert!(GgufFile::open(&path).is_err());
    std::fs::remove_file(&path).unwrap();
}
