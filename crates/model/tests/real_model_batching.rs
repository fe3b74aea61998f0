//! Batching invariants on the real model (quantized weights, 8-bit activations, SIMD kernels):
//! a token's logits do not depend on how the tokens around it were batched — one prefill,
//! token-by-token decoding, uneven chunks, or another sequence in the same batch give the same
//! bits. The server's continuous batching relies on this.
//!
//! The model is read from `$GEMMA3_MODEL`, else `~/.cache/gemma3/gemma-3-270m-q4_k_m.gguf`;
//! if it is missing the test fails, unless `GEMMA3_SKIP_MODEL_TESTS=1`.

use gemma3_model::{Batch, ForwardState, KvCache, Model};
use std::path::PathBuf;

fn model() -> Option<Model> {
    let path = match std::env::var_os("GEMMA3_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/gemma3/gemma-3-270m-q4_k_m.gguf"),
    };
    if !path.exists() {
        if std::env::var("GEMMA3_SKIP_MODEL_TESTS").as_deref() == Ok("1") {
            eprintln!("note: SKIPPED, {} not found", path.display());
            return None;
        }
        panic!(
            "model file {} is missing: run `gemma3 pull`, set GEMMA3_MODEL, or set \
             GEMMA3_SKIP_MODEL_TESTS=1 to skip",
            path.display()
        );
    }
    Some(Model::open(&path).unwrap_or_else(|e| panic!("{e}")))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// "The capital of France is the capital of the country of France. It is" (llama.cpp ids).
const TOKENS: [u32; 14] = [
    2, 818, 5279, 529, 7001, 563, 506, 5279, 529, 506, 2891, 529, 7001, 236761,
];

#[test]
fn real_model_logits_do_not_depend_on_batching() {
    let Some(m) = model() else { return };
    let v = m.config.vocab_size;
    let mut st = ForwardState::new();
    let mut cache = KvCache::new(&m.config, 64);
    let prefill = m
        .forward(
            &Batch::for_sequence(&TOKENS, 0, true),
            std::slice::from_mut(&mut cache),
            &mut st,
        )
        .unwrap()
        .to_vec();
    assert!(prefill.iter().all(|x| x.is_finite()));

    // Token by token.
    let mut cache = KvCache::new(&m.config, 64);
    for (p, &t) in TOKENS.iter().enumerate() {
        let mut b = Batch::default();
        b.push(t, p, 0, true);
        let got = m
            .forward(&b, std::slice::from_mut(&mut cache), &mut st)
            .unwrap();
        assert_eq!(
            bits(got),
            bits(&prefill[p * v..(p + 1) * v]),
            "position {p}: decode differs from prefill"
        );
    }

    // Uneven chunks (5, 1, 8).
    let mut cache = KvCache::new(&m.config, 64);
    let mut start = 0;
    for len in [5, 1, 8] {
        let b = Batch::for_sequence(&TOKENS[start..start + len], start, true);
        let got = m
            .forward(&b, std::slice::from_mut(&mut cache), &mut st)
            .unwrap();
        assert_eq!(
            bits(got),
            bits(&prefill[start * v..(start + len) * v]),
            "chunk at {start}"
        );
        start += len;
    }

    // Two sequences in one batch: the same prompt's second half decoding in sequence 1 while
    // sequence 0 prefills it from the start.
    let mut caches = vec![KvCache::new(&m.config, 64), KvCache::new(&m.config, 64)];
    m.forward(
        &Batch::for_sequence(&TOKENS[..9], 0, false),
        &mut caches[1..],
        &mut st,
    )
    .unwrap();
    let mut b = Batch::default();
    for (p, &t) in TOKENS.iter().enumerate() {
        b.push(t, p, 0, true);
    }
    b.push(TOKENS[9], 9, 1, true);
    let got = m.forward(&b, &mut caches, &mut st).unwrap();
    assert_eq!(bits(&got[..TOKENS.len() * v]), bits(&prefill), "sequence 0");
    assert_eq!(
        bits(&got[TOKENS.len() * v..]),
        bits(&prefill[9 * v..10 * v]),
        "sequence 1"
    );
}
