//! Checks against the real Gemma 3 270M file, when it is present.
//!
//! The model is read from `$GEMMA3_MODEL`, else `~/.cache/gemma3/gemma-3-270m-q4_k_m.gguf`. If
//! neither exists the test prints a note and passes, so machines without the model still pass.
//!
//! Provenance of the expected figures: reported by `gguf.GGUFReader` from the Python `gguf`
//! package, version 0.19.0, on the file with sha256
//! a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
//! (kv_count, tensor count, metadata values, tensor shapes and types, `data_offset` and each
//! tensor's absolute `data_offset`).

use std::path::PathBuf;

use gemma3_gguf::{GgmlType, GgufFile};

fn model_path() -> Option<PathBuf> {
    let path = match std::env::var_os("GEMMA3_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            PathBuf::from(std::env::var_os("HOME")?).join(".cache/gemma3/gemma-3-270m-q4_k_m.gguf")
        }
    };
    path.exists().then_some(path)
}

#[test]
fn real_gemma3_270m_file() {
    let Some(path) = model_path() else {
        // Like every model test: a missing model fails, unless skipping is asked for.
        assert!(
            std::env::var("GEMMA3_SKIP_MODEL_TESTS").as_deref() == Ok("1"),
            "model file not found: run `gemma3 pull` or set GEMMA3_MODEL (or GEMMA3_SKIP_MODEL_TESTS=1 to skip)"
        );
        eprintln!(
            "note: skipping real_gemma3_270m_file: set GEMMA3_MODEL or put the model at \
             ~/.cache/gemma3/gemma-3-270m-q4_k_m.gguf"
        );
        return;
    };
    let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));

    assert_eq!(f.version(), 3);
    assert_eq!(f.tensors().len(), 236);
    assert_eq!(f.metadata().len(), 33);
    assert_eq!(f.data_alignment(), 32);

    assert_eq!(f.get_str("general.architecture").unwrap(), "gemma3");
    assert_eq!(f.get_u32("gemma3.block_count").unwrap(), 18);
    assert_eq!(f.get_u32("gemma3.embedding_length").unwrap(), 640);
    assert_eq!(f.get_u32("gemma3.context_length").unwrap(), 32768);
    assert_eq!(f.get_u32("gemma3.attention.sliding_window").unwrap(), 512);
    assert_eq!(f.get_f32("gemma3.rope.freq_base").unwrap(), 1_000_000.0);

    let tokens = f
        .get_array("tokenizer.ggml.tokens")
        .unwrap()
        .as_strings()
        .expect("tokens are strings");
    assert_eq!(tokens.len(), 262144);
    assert_eq!(tokens.get(105), Some("<start_of_turn>"));
    assert_eq!(tokens.get(106), Some("<end_of_turn>"));

    // (name, dims, type, absolute file offset)
    let expected = [
        (
            "token_embd.weight",
            vec![640, 262144],
            GgmlType::Q8_0,
            6527680,
        ),
        ("output_norm.weight", vec![640], GgmlType::F32, 6525120),
        (
            "blk.0.attn_q.weight",
            vec![640, 1024],
            GgmlType::Q5_0,
            185270464,
        ),
        (
            "blk.0.ffn_down.weight",
            vec![2048, 640],
            GgmlType::Q6K,
            185896128,
        ),
    ];
    for (name, dims, ty, abs_offset) in expected {
        let t = f.tensor(name).unwrap_or_else(|| panic!("missing {name}"));
        assert_eq!(t.dims, dims, "{name}");
        assert_eq!(t.ggml_type, ty, "{name}");
        assert_eq!(f.data_start() + t.offset, abs_offset, "{name}");
        assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes, "{name}");
    }
    // The python reader's data_offset is the start of the data section.
    assert_eq!(f.data_start(), 6525120);

    // Every tensor's data lies inside the file (checked at open; tensor_data would panic).
    let total: u64 = f
        .tensors()
        .iter()
        .map(|t| f.tensor_data(t).len() as u64)
        .sum();
    assert!(total <= f.file_size());
}
