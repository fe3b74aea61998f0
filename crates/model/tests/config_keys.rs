//! Hyper-parameters the metadata gives in forms the real file does not use: each read as
//! llama.cpp reads it, or refused naming the key.

#[path = "common/tiny.rs"]
mod tiny;

use gemma3_gguf::{Array, GgufFile, GgufWriter, Value};
use gemma3_model::{Config, ModelError};
use tiny::{tiny_metadata, TinySpec};

/// The tiny model's metadata (6 layers) with `edit` applied.
fn config(edit: impl FnOnce(&mut GgufWriter)) -> Result<Config, ModelError> {
    let mut w = GgufWriter::new();
    tiny_metadata(&mut w, &TinySpec::default(), "gemma3");
    edit(&mut w);
    Config::from_gguf(&GgufFile::from_bytes(w.to_bytes()).expect("a valid GGUF"))
}

fn globals(c: &Config) -> Vec<usize> {
    (0..c.n_layers).filter(|&l| c.is_global(l)).collect()
}

#[test]
fn the_sliding_window_pattern_as_a_period_or_one_bool_per_layer() {
    assert_eq!(
        globals(&config(|_| {}).unwrap()),
        [5],
        "llama.cpp's default: every 6th"
    );
    let period = config(|w| w.add_kv("gemma3.attention.sliding_window_pattern", Value::U32(2)));
    assert_eq!(globals(&period.unwrap()), [1, 3, 5]);
    // gguf-py's `add_sliding_window_pattern`: true for a sliding-window layer.
    let swa = [true, false, true, true, false, true];
    let per_layer = config(|w| {
        let v = Value::Array(Array::Bool(swa.to_vec()));
        w.add_kv("gemma3.attention.sliding_window_pattern", v)
    });
    assert_eq!(globals(&per_layer.unwrap()), [1, 4]);
    let short = config(|w| {
        let v = Value::Array(Array::Bool(swa[..5].to_vec()));
        w.add_kv("gemma3.attention.sliding_window_pattern", v)
    });
    let e = short.unwrap_err().to_string();
    assert!(
        e.contains("sliding_window_pattern") && e.contains("5 entries for 6 layers"),
        "{e}"
    );
}

#[test]
fn rope_scaling_is_linear_when_the_type_is_absent() {
    let factor = |w: &mut GgufWriter| w.add_kv("gemma3.rope.scaling.factor", Value::F32(8.0));
    assert_eq!(config(factor).unwrap().rope_scale_global, 8.0);
    let typed = config(|w| {
        factor(w);
        w.add_kv("gemma3.rope.scaling.type", Value::String("linear".into()));
    });
    assert_eq!(typed.unwrap().rope_scale_global, 8.0);
    let none = config(|w| {
        factor(w);
        w.add_kv("gemma3.rope.scaling.type", Value::String("none".into()));
    });
    assert_eq!(none.unwrap().rope_scale_global, 1.0);
    // llama.cpp reads a factor of 0 as no scaling.
    let zero = config(|w| w.add_kv("gemma3.rope.scaling.factor", Value::F32(0.0)));
    assert_eq!(zero.unwrap().rope_scale_global, 1.0);
    assert_eq!(config(|_| {}).unwrap().rope_scale_global, 1.0);
}

#[test]
fn optional_keys_of_another_type_or_out_of_range_are_refused() {
    let refused = |key: &str, v: Value| {
        let e = config(|w| w.add_kv(key, v)).unwrap_err().to_string();
        assert!(e.contains(key), "{key}: {e}");
    };
    refused("gemma3.attention.sliding_window", Value::F32(8.0));
    refused("gemma3.attention.sliding_window", Value::String("8".into()));
    refused(
        "gemma3.attention.layer_norm_rms_epsilon",
        Value::String("1e-6".into()),
    );
    refused("gemma3.rope.freq_base", Value::U32(10000));
    refused("gemma3.attention.query_pre_attn_scalar", Value::U32(256));
    refused("gemma3.attention.query_pre_attn_scalar", Value::F32(0.0));
    refused("gemma3.attention.query_pre_attn_scalar", Value::F32(-4.0));
    refused(
        "gemma3.attention.query_pre_attn_scalar",
        Value::F32(f32::NAN),
    );
    refused("gemma3.rope.scaling.type", Value::U32(1));
    // In range, the scalar sets the attention scale.
    let c = config(|w| w.add_kv("gemma3.attention.query_pre_attn_scalar", Value::F32(16.0)));
    assert_eq!(c.unwrap().attn_scale, 0.25);
}
