//! A tiny synthetic Gemma 3 model written with `GgufWriter`: small dimensions, F32 weights
//! from a seeded PRNG, the tensor names and metadata keys of a real gemma3 GGUF (as
//! llama.cpp's converter writes them), and a toy SentencePiece vocabulary (specials, the 256
//! byte tokens, a few letters) so that the CLI can run it too.
//!
//! Also used by the CLI tests (`#[path]`-included), so it depends on `gemma3_gguf` and
//! `gemma3_model` only.

#![allow(dead_code)]

use gemma3_gguf::{Array, GgmlType, GgufWriter, Value};
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub struct TinySpec {
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub n_layers: usize,
    pub vocab: usize,
    pub sliding_window: usize,
    pub ctx_len: usize,
    pub rope_base_global: f32,
    pub rms_eps: f32,
    /// Write a separate `output.weight` instead of tying the head to the embedding.
    pub untied_output: bool,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            d_model: 64,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 32,
            d_ff: 96,
            // Layer 5 is global (every 6th, llama.cpp's gemma3 pattern), 0–4 are local.
            n_layers: 6,
            vocab: 300,
            sliding_window: 8,
            ctx_len: 2048,
            rope_base_global: 1_000_000.0,
            rms_eps: 1e-6,
            untied_output: false,
            seed: 1,
        }
    }
}

/// A tensor: GGUF dims (innermost first) and f32 values, row-major (rows = dims[1]).
#[derive(Clone, Debug)]
pub struct TinyTensor {
    pub dims: Vec<u64>,
    pub data: Vec<f32>,
}

/// SplitMix64 (the model's own, which seeds fine-tuning: the same draws).
pub use gemma3_model::train::Rng;

/// The weights by GGUF tensor name.
pub fn tiny_weights(s: &TinySpec) -> BTreeMap<String, TinyTensor> {
    let mut rng = Rng::new(s.seed);
    let mut t = BTreeMap::new();
    let q_dim = s.n_heads * s.head_dim;
    let kv_dim = s.n_kv_heads * s.head_dim;
    // (out, in) matrix, uniform with variance 1/in so activations stay O(1).
    let matrix = |rng: &mut Rng, cols: usize, rows: usize| {
        let a = (3.0 / cols as f32).sqrt();
        TinyTensor {
            dims: vec![cols as u64, rows as u64],
            data: (0..rows * cols).map(|_| rng.range(-a, a)).collect(),
        }
    };
    // GGUF norm weights hold Gemma's (1 + w).
    let norm = |rng: &mut Rng, n: usize| TinyTensor {
        dims: vec![n as u64],
        data: (0..n).map(|_| rng.range(0.5, 1.5)).collect(),
    };
    t.insert(
        "token_embd.weight".into(),
        matrix(&mut rng, s.d_model, s.vocab),
    );
    if s.untied_output {
        t.insert("output.weight".into(), matrix(&mut rng, s.d_model, s.vocab));
    }
    t.insert("output_norm.weight".into(), norm(&mut rng, s.d_model));
    for l in 0..s.n_layers {
        let n = |x: &str| format!("blk.{l}.{x}.weight");
        t.insert(n("attn_norm"), norm(&mut rng, s.d_model));
        t.insert(n("attn_q"), matrix(&mut rng, s.d_model, q_dim));
        t.insert(n("attn_k"), matrix(&mut rng, s.d_model, kv_dim));
        t.insert(n("attn_v"), matrix(&mut rng, s.d_model, kv_dim));
        t.insert(n("attn_q_norm"), norm(&mut rng, s.head_dim));
        t.insert(n("attn_k_norm"), norm(&mut rng, s.head_dim));
        t.insert(n("attn_output"), matrix(&mut rng, q_dim, s.d_model));
        t.insert(n("post_attention_norm"), norm(&mut rng, s.d_model));
        t.insert(n("ffn_norm"), norm(&mut rng, s.d_model));
        t.insert(n("ffn_gate"), matrix(&mut rng, s.d_model, s.d_ff));
        t.insert(n("ffn_up"), matrix(&mut rng, s.d_model, s.d_ff));
        t.insert(n("ffn_down"), matrix(&mut rng, s.d_ff, s.d_model));
        t.insert(n("post_ffw_norm"), norm(&mut rng, s.d_model));
    }
    t
}

/// The toy vocabulary: <pad> <eos> <bos> <unk> <start_of_turn> <end_of_turn>, the 256 byte
/// tokens, then "▁", letters and "▁"+letter pieces up to `vocab` tokens.
pub fn tiny_vocab(vocab: usize) -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens: Vec<String> = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    .map(String::from)
    .into();
    let mut types = vec![3, 3, 3, 2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let mut pieces = vec!["▁".to_string()];
    for c in 'a'..='z' {
        pieces.push(c.to_string());
        pieces.push(format!("▁{c}"));
    }
    for p in pieces {
        if tokens.len() >= vocab {
            break;
        }
        tokens.push(p);
        types.push(1);
    }
    while tokens.len() < vocab {
        tokens.push(format!("<unused{}>", tokens.len()));
        types.push(5);
    }
    let scores = (0..tokens.len()).map(|i| -(i as f32)).collect();
    (tokens, scores, types)
}

/// The metadata a gemma3 GGUF carries (llama.cpp convert_hf_to_gguf.py key names).
pub fn tiny_metadata(w: &mut GgufWriter, s: &TinySpec, arch: &str) {
    w.add_kv("general.architecture", Value::String(arch.into()));
    w.add_kv(
        "general.name",
        Value::String("tiny synthetic gemma3".into()),
    );
    let u = |x: usize| Value::U32(x as u32);
    let a = arch;
    w.add_kv(&format!("{a}.context_length"), u(s.ctx_len));
    w.add_kv(&format!("{a}.embedding_length"), u(s.d_model));
    w.add_kv(&format!("{a}.block_count"), u(s.n_layers));
    w.add_kv(&format!("{a}.feed_forward_length"), u(s.d_ff));
    w.add_kv(&format!("{a}.attention.head_count"), u(s.n_heads));
    w.add_kv(&format!("{a}.attention.head_count_kv"), u(s.n_kv_heads));
    w.add_kv(&format!("{a}.attention.key_length"), u(s.head_dim));
    w.add_kv(&format!("{a}.attention.value_length"), u(s.head_dim));
    w.add_kv(
        &format!("{a}.attention.layer_norm_rms_epsilon"),
        Value::F32(s.rms_eps),
    );
    w.add_kv(
        &format!("{a}.rope.freq_base"),
        Value::F32(s.rope_base_global),
    );
    w.add_kv(
        &format!("{a}.attention.sliding_window"),
        u(s.sliding_window),
    );
    let (tokens, scores, types) = tiny_vocab(s.vocab);
    w.add_kv("tokenizer.ggml.model", Value::String("llama".into()));
    w.add_kv(
        "tokenizer.ggml.tokens",
        Value::Array(Array::String(tokens.into())),
    );
    w.add_kv("tokenizer.ggml.scores", Value::Array(Array::F32(scores)));
    w.add_kv("tokenizer.ggml.token_type", Value::Array(Array::I32(types)));
    w.add_kv("tokenizer.ggml.bos_token_id", Value::U32(2));
    w.add_kv("tokenizer.ggml.eos_token_id", Value::U32(1));
    w.add_kv("tokenizer.ggml.unknown_token_id", Value::U32(3));
    w.add_kv("tokenizer.ggml.padding_token_id", Value::U32(0));
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A GGUF writer holding the tiny model (all tensors F32).
pub fn tiny_writer(s: &TinySpec) -> (GgufWriter, BTreeMap<String, TinyTensor>) {
    let weights = tiny_weights(s);
    let mut w = GgufWriter::new();
    tiny_metadata(&mut w, s, "gemma3");
    for (name, t) in &weights {
        w.add_tensor(name, &t.dims, GgmlType::F32, f32_bytes(&t.data))
            .expect("valid tensor");
    }
    (w, weights)
}

/// The tiny model with tensor `bad` stored as `ty` (with zero bytes of the right size) and
/// general.architecture `arch`; for error tests.
pub fn tiny_writer_with(s: &TinySpec, arch: &str, bad: Option<(&str, GgmlType)>) -> GgufWriter {
    let weights = tiny_weights(s);
    let mut w = GgufWriter::new();
    tiny_metadata(&mut w, s, arch);
    for (name, t) in &weights {
        match bad {
            Some((b, ty)) if b == name => {
                let n: u64 = t.dims.iter().product();
                let bytes = n / ty.block_size() * ty.type_size();
                w.add_tensor(name, &t.dims, ty, vec![0u8; bytes as usize])
                    .expect("valid tensor");
            }
            _ => w
                .add_tensor(name, &t.dims, GgmlType::F32, f32_bytes(&t.data))
                .expect("valid tensor"),
        }
    }
    w
}
