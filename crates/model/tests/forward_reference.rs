//! The forward pass on a tiny synthetic Gemma 3 (F32 weights, so no activation quantization)
//! against an independent plain f64 implementation written from the HF modelling code
//! (`common/reference.rs`), plus batching invariants the scheduler relies on.
//!
//! Dimensions: d_model 64, 4 query heads and 2 KV heads of 32, d_ff 96, 6 layers (layer 5
//! global, RoPE base 1e6; layers 0–4 local, base 1e4, window 8), vocabulary 300. Sequences are
//! 40 tokens, so the window matters, and 600 tokens, so the local layers' KV ring (window +
//! 512 slots) wraps and a prefill spans two micro-batches.

mod common;

use common::reference::Reference;
use common::tiny::{tiny_writer, Rng, TinySpec, TinyTensor};
use common::{compare, prefill};
use gemma3_gguf::GgufFile;
use gemma3_model::{Batch, ForwardState, KvCache, Model, ModelError, Output};
use std::collections::BTreeMap;

/// Tolerances, relative to the largest |logit| at a position.
///
/// Ours computes in f32 and the reference in f64. Both round where ggml does (the reference's
/// `ggml_rounding`): the scaled queries, K and V to f16, and GELU's input and output to f16.
/// Where no f16 rounding plays a part they agree to f32 precision (position 0's logits:
/// 7e-7). But a value whose f32 result lies within f32 rounding error of an f16 rounding
/// boundary rounds to the neighbouring f16 in one of them (one f16 ulp, 2^-11 ≈ 4.9e-4
/// relative), and the difference cascades through the layers: with f16 K/V alone, 4 of the
/// 2560 keys of layer 0 rounded differently on the 40-token sequence, 68 in layer 1 and 636
/// in layer 5. Observed logit differences: max 4.3e-4 / rms 1.5e-4 (40 tokens), max 1.04e-3
/// / rms 3.0e-4 (600 tokens, where the f32 RoPE angles add their share). The bounds are ~4
/// f16 ulps for the largest difference and 2× the largest observed rms. They cannot tell
/// ggml's rounding from none (2.0e-3 / 6.6e-4), but a real math error (a RoPE base, a norm,
/// the window, the GELU variant, the query scale) moves logits by 1e-2 or more.
const TOL_MAX: f64 = 2e-3;
const TOL_RMS: f64 = 6e-4;

fn open(spec: &TinySpec) -> (Model, BTreeMap<String, TinyTensor>) {
    let (w, weights) = tiny_writer(spec);
    let f = GgufFile::from_bytes(w.to_bytes()).expect("tiny model parses");
    let m = Model::from_gguf(f).expect("tiny model loads");
    (m, weights)
}

fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}

/// Decode `toks` one at a time into a fresh cache of `ctx` positions,
/// handing each position's logits to `check`.
fn decode_one_by_one(m: &Model, toks: &[u32], ctx: usize, mut check: impl FnMut(usize, &[f32])) {
    let mut cache = KvCache::new(&m.config, ctx);
    let mut st = ForwardState::new();
    for (p, &t) in toks.iter().enumerate() {
        let mut b = Batch::default();
        b.push(t, p, 0, true);
        let got = m
            .forward(&b, std::slice::from_mut(&mut cache), &mut st)
            .expect("forward");
        check(p, got);
    }
}

/// Per-layer comparison of the engine's traced intermediates with the reference's: one line
/// per (layer, name) with max|ours − ref| / max|ref|, to find the first layer that diverges.
fn layer_report(m: &Model, r: &Reference, toks: &[u32]) -> String {
    use std::sync::{Arc, Mutex};
    type Seen = Arc<Mutex<Vec<(usize, &'static str, Vec<f32>)>>>;
    let seen: Seen = Arc::default();
    let mut cache = KvCache::new(&m.config, toks.len());
    let mut st = ForwardState::new();
    let sink = seen.clone();
    st.trace = Some(Box::new(move |l, name, v: &[f32]| {
        sink.lock().unwrap().push((l, name, v.to_vec()))
    }));
    m.forward(
        &Batch::for_sequence(toks, 0, true),
        std::slice::from_mut(&mut cache),
        &mut st,
    )
    .unwrap();
    let mut want = Vec::new();
    r.logits_traced(toks, &mut |l, name, v| want.push((l, name, v)));
    let seen = seen.lock().unwrap();
    let mut out = String::new();
    for (l, name, v) in want {
        let Some((_, _, ours)) = seen.iter().find(|(a, b, _)| *a == l && *b == name) else {
            out += &format!("layer {l} {name}: not traced by the engine\n");
            continue;
        };
        let scale = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let err = ours
            .iter()
            .zip(&v)
            .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
        out += &format!("layer {l} {name:>8}: {:.2e}\n", err / scale);
    }
    out
}

/// Compare and print; on failure show the per-layer divergence when `m` is given.
fn check(label: &str, ours: &[f32], reference: &[Vec<f64>], vocab: usize, positions: &[usize]) {
    let (max, rms) = compare(ours, reference, vocab, positions);
    eprintln!(
        "{label}: logit error vs the reference: max {max:.2e} (tolerance {TOL_MAX:e}), \
         rms {rms:.2e} (tolerance {TOL_RMS:e})"
    );
    assert!(
        max < TOL_MAX && rms < TOL_RMS,
        "{label}: logits differ from the reference: max {max:e}, rms {rms:e}"
    );
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn config_is_read_from_the_metadata() {
    let spec = TinySpec::default();
    let (m, _) = open(&spec);
    let c = &m.config;
    assert_eq!(
        (
            c.d_model,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.d_ff,
            c.n_layers,
            c.vocab_size
        ),
        (64, 4, 2, 32, 96, 6, 300)
    );
    assert_eq!(c.sliding_window, 8);
    let globals: Vec<usize> = (0..6).filter(|&l| c.is_global(l)).collect();
    assert_eq!(globals, [5]);
    assert_eq!(c.rope_base_global, 1e6);
    assert_eq!(c.rope_base_local, 1e4);
    assert!((c.attn_scale - 1.0 / 32f32.sqrt()).abs() < 1e-7);
    assert!(m.output.is_none(), "tied head");
}

#[test]
fn prefill_matches_the_naive_reference() {
    let spec = TinySpec::default();
    let (m, w) = open(&spec);
    let toks = tokens(11, 40, spec.vocab);
    let ours = prefill(&m, &toks, 64);
    let reference = Reference {
        spec: &spec,
        w: &w,
        ggml_rounding: true,
    }
    .logits(&toks);
    let positions: Vec<usize> = (0..40).collect();
    let r = Reference {
        spec: &spec,
        w: &w,
        ggml_rounding: true,
    };
    let (max, rms) = compare(&ours, &reference, spec.vocab, &positions);
    if !(max < TOL_MAX && rms < TOL_RMS) {
        panic!(
            "logits differ from the reference: max {max:e}, rms {rms:e}; per layer \
             (max|ours − ref| / max|ref| of each traced intermediate; 'q' and 'k' differ by \
             the reference's f16 rounding):\n{}",
            layer_report(&m, &r, &toks)
        );
    }
    check(
        "tiny model, 40 tokens",
        &ours,
        &reference,
        spec.vocab,
        &positions,
    );
    // For information: the same reference in f64 throughout (what the f16 attention costs).
    let exact = Reference {
        spec: &spec,
        w: &w,
        ggml_rounding: false,
    }
    .logits(&toks);
    let (max, rms) = compare(&ours, &exact, spec.vocab, &positions);
    eprintln!("  (vs a reference without f16 rounding: max {max:.2e}, rms {rms:.2e})");
    // The window must matter: a reference with every layer global would differ.
    let mut all_global = spec.clone();
    all_global.sliding_window = 1 << 20;
    let no_window = Reference {
        spec: &all_global,
        w: &w,
        ggml_rounding: true,
    }
    .logits(&toks);
    let (err_no_window, _) = compare(&ours, &no_window, spec.vocab, &positions);
    eprintln!("  (vs a reference without the sliding window: max {err_no_window:.2e})");
    assert!(
        err_no_window > 10.0 * TOL_MAX,
        "the sliding window has no visible effect ({err_no_window:e}): the test is too weak"
    );
}

#[test]
fn untied_output_head_matches_the_reference() {
    let spec = TinySpec {
        untied_output: true,
        seed: 2,
        ..TinySpec::default()
    };
    let (m, w) = open(&spec);
    assert!(m.output.is_some());
    let toks = tokens(12, 13, spec.vocab);
    let ours = prefill(&m, &toks, 32);
    let reference = Reference {
        spec: &spec,
        w: &w,
        ggml_rounding: true,
    }
    .logits(&toks);
    check(
        "tiny model, untied head",
        &ours,
        &reference,
        spec.vocab,
        &(0..13).collect::<Vec<_>>(),
    );
}

#[test]
fn long_sequence_wraps_the_window_ring_and_spans_micro_batches() {
    let spec = TinySpec::default();
    let (m, w) = open(&spec);
    let n = 600; // > window + 512 ring slots, > one 512-token micro-batch
    let toks = tokens(13, n, spec.vocab);
    let reference = Reference {
        spec: &spec,
        w: &w,
        ggml_rounding: true,
    }
    .logits(&toks);
    let ours = prefill(&m, &toks, 1024);
    let all: Vec<usize> = (0..n).collect();
    check(
        "tiny model, 600-token prefill",
        &ours,
        &reference,
        spec.vocab,
        &all,
    );

    // Prefill 530, then decode one token at a time past the ring's wrap point.
    let mut cache = KvCache::new(&m.config, 1024);
    let mut st = ForwardState::new();
    m.forward(
        &Batch::for_sequence(&toks[..530], 0, false),
        std::slice::from_mut(&mut cache),
        &mut st,
    )
    .unwrap();
    for p in 530..n {
        let mut b = Batch::default();
        b.push(toks[p], p, 0, true);
        let got = m
            .forward(&b, std::slice::from_mut(&mut cache), &mut st)
            .unwrap()
            .to_vec();
        let (max, rms) = compare(&got, &reference, spec.vocab, &[p]);
        assert!(
            max < TOL_MAX && rms < TOL_RMS,
            "decode at position {p}: max {max:e}, rms {rms:e}"
        );
        // Decoding and batched prefill give the same bits.
        assert_eq!(
            bits(&got),
            bits(&ours[p * spec.vocab..(p + 1) * spec.vocab]),
            "position {p}: decode differs from prefill"
        );
    }
}

#[test]
fn decoding_token_by_token_equals_one_batched_prefill() {
    let spec = TinySpec::default();
    let (m, _) = open(&spec);
    let toks = tokens(14, 40, spec.vocab);
    let batched = prefill(&m, &toks, 64);
    decode_one_by_one(&m, &toks, 64, |p, got| {
        assert_eq!(
            bits(got),
            bits(&batched[p * spec.vocab..(p + 1) * spec.vocab]),
            "position {p}: token-by-token decode differs from the batched prefill"
        )
    });
    // Prefill in uneven pieces (7, 1, 20, 12) with logits everywhere: same bits again.
    let mut cache = KvCache::new(&m.config, 64);
    let mut st = ForwardState::new();
    let mut start = 0;
    for len in [7, 1, 20, 12] {
        let b = Batch::for_sequence(&toks[start..start + len], start, true);
        let got = m
            .forward(&b, std::slice::from_mut(&mut cache), &mut st)
            .unwrap();
        assert_eq!(
            bits(got),
            bits(&batched[start * spec.vocab..(start + len) * spec.vocab]),
            "chunk at {start}"
        );
        start += len;
    }
}

/// With one KV head, a decoded token's attention is a single tile, which
/// several threads share (each a run of its chunks of keys, whose softmax
/// states are then merged in order). Its bits must not depend on the
/// thread count, and must equal those of a one-thread
/// batched prefill (where tiles of 4 tokens take every block in turn), on
/// global and sliding-window layers alike, past the window ring's wrap (560
/// positions > 8 + 512 slots), for head widths of whole 16-lane chunks and
/// with a tail (40). With a window of 200 the sliding-window layers span
/// two or three chunks of 128 keys, so they are shared too, across their
/// ring's wrap (800 positions > 200 + 512 slots).
#[test]
fn one_kv_head_decode_on_any_thread_count_equals_the_prefill() {
    for (head_dim, n, window) in [(32, 560, 8), (40, 60, 8), (32, 800, 200)] {
        let spec = TinySpec {
            n_kv_heads: 1,
            head_dim,
            sliding_window: window,
            ..TinySpec::default()
        };
        one_kv_head_case(&spec, n);
    }
}

fn one_kv_head_case(spec: &TinySpec, n: usize) {
    let (m, w) = open(spec);
    let toks = tokens(21, n, spec.vocab);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let batched = one.install(|| prefill(&m, &toks, 1024));
    let reference = Reference {
        spec,
        w: &w,
        ggml_rounding: true,
    }
    .logits(&toks[..40]);
    let first: Vec<usize> = (0..40).collect();
    let label = format!("one KV head of width {}", spec.head_dim);
    check(
        &label,
        &batched[..40 * spec.vocab],
        &reference,
        spec.vocab,
        &first,
    );
    for threads in [2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            decode_one_by_one(&m, &toks, 1024, |p, got| {
                assert_eq!(
                    bits(got),
                    bits(&batched[p * spec.vocab..(p + 1) * spec.vocab]),
                    "{label}, {threads} threads, position {p}: decode differs from the prefill"
                )
            })
        });
    }
}

#[test]
fn sequences_batched_together_equal_each_alone() {
    let spec = TinySpec::default();
    let (m, _) = open(&spec);
    let a = tokens(15, 30, spec.vocab);
    let b = tokens(16, 17, spec.vocab);
    let alone_a = prefill(&m, &a, 64);
    let alone_b = prefill(&m, &b, 64);
    let v = spec.vocab;

    // Both prompts in one batch, interleaved, with two caches.
    let mut caches = vec![KvCache::new(&m.config, 64), KvCache::new(&m.config, 64)];
    let mut st = ForwardState::new();
    let mut batch = Batch::default();
    let mut order = Vec::new();
    for i in 0..a.len().max(b.len()) {
        if i < a.len() {
            batch.push(a[i], i, 0, true);
            order.push((0, i));
        }
        if i < b.len() {
            batch.push(b[i], i, 1, true);
            order.push((1, i));
        }
    }
    let got = m.forward(&batch, &mut caches, &mut st).unwrap().to_vec();
    for (row, &(s, p)) in order.iter().enumerate() {
        let want = if s == 0 { &alone_a } else { &alone_b };
        assert_eq!(
            bits(&got[row * v..(row + 1) * v]),
            bits(&want[p * v..(p + 1) * v]),
            "sequence {s} position {p}: batched with another sequence differs from alone"
        );
    }

    // A mixed step: sequence 1 decodes while sequence 0 prefills a new prompt.
    let c = tokens(17, 9, spec.vocab);
    let alone_c = prefill(&m, &c, 64);
    let mut caches = vec![KvCache::new(&m.config, 64), KvCache::new(&m.config, 64)];
    m.forward(
        &Batch::for_sequence(&b[..16], 0, false),
        &mut caches[1..],
        &mut st,
    )
    .unwrap();
    let mut batch = Batch::default();
    for (i, &t) in c.iter().enumerate() {
        batch.push(t, i, 0, i + 1 == c.len());
    }
    batch.push(b[16], 16, 1, true);
    let got = m.forward(&batch, &mut caches, &mut st).unwrap().to_vec();
    assert_eq!(bits(&got[..v]), bits(&alone_c[8 * v..9 * v]), "prefill row");
    assert_eq!(
        bits(&got[v..2 * v]),
        bits(&alone_b[16 * v..17 * v]),
        "decode row"
    );
}

/// The last layer runs only for the tokens that want logits (moved to the
/// front of the batch): whichever tokens ask, each gets the bits it gets
/// when every token asks, and the cache it leaves decodes the same.
#[test]
fn logits_for_some_tokens_equal_those_for_all() {
    let spec = TinySpec::default();
    let (m, _) = open(&spec);
    let v = spec.vocab;
    let a = tokens(18, 40, v);
    let b = tokens(19, 23, v);
    let (all_a, all_b) = (prefill(&m, &a, 64), prefill(&m, &b, 64));
    let want_a = |i: usize| [0, 5, 6, 21, 39].contains(&i);
    let want_b = |i: usize| i % 7 == 3;
    let mut caches = vec![KvCache::new(&m.config, 64), KvCache::new(&m.config, 64)];
    let mut st = ForwardState::new();
    let mut batch = Batch::default();
    let mut rows = Vec::new();
    for i in 0..a.len() {
        batch.push(a[i], i, 0, want_a(i));
        if want_a(i) {
            rows.push(&all_a[i * v..(i + 1) * v]);
        }
        if i < b.len() {
            batch.push(b[i], i, 1, want_b(i));
            if want_b(i) {
                rows.push(&all_b[i * v..(i + 1) * v]);
            }
        }
    }
    let got = m.forward(&batch, &mut caches, &mut st).unwrap().to_vec();
    assert_eq!(got.len(), rows.len() * v);
    for (k, want) in rows.iter().enumerate() {
        assert_eq!(bits(&got[k * v..(k + 1) * v]), bits(want), "logits row {k}");
    }
    // The next token of each: its last layer attends over keys of tokens
    // that wanted no logits.
    let (next_a, next_b) = (tokens(20, 1, v)[0], tokens(22, 1, v)[0]);
    let mut step = Batch::default();
    step.push(next_a, a.len(), 0, true);
    step.push(next_b, b.len(), 1, true);
    let got = m.forward(&step, &mut caches, &mut st).unwrap().to_vec();
    let longer = |t: &[u32], x: u32| [t, &[x]].concat();
    let (full_a, full_b) = (
        prefill(&m, &longer(&a, next_a), 64),
        prefill(&m, &longer(&b, next_b), 64),
    );
    assert_eq!(bits(&got[..v]), bits(&full_a[a.len() * v..]), "next of a");
    assert_eq!(bits(&got[v..]), bits(&full_b[b.len() * v..]), "next of b");
}

/// Hidden-state outputs (an embedding's input) are the reference's final
/// normed states; in a batch mixing tokens with no output, with their hidden
/// state and with logits, each gets the bits it gets when all ask alike, also
/// over 600 tokens (two micro-batches, past the window ring's wrap).
#[test]
fn hidden_states_match_the_reference_and_mix_with_logits() {
    let spec = TinySpec::default();
    let (m, w) = open(&spec);
    let (v, d) = (spec.vocab, spec.d_model);
    for n in [40, 600] {
        let toks = tokens(23 + n as u64, n, v);
        let run = |out: &dyn Fn(usize) -> Output| {
            let mut cache = KvCache::new(&m.config, n);
            let mut st = ForwardState::new();
            let mut batch = Batch::default();
            for (i, &t) in toks.iter().enumerate() {
                batch.push_out(t, i, 0, out(i));
            }
            let logits = m.forward(&batch, std::slice::from_mut(&mut cache), &mut st);
            (logits.expect("forward").to_vec(), st.hidden().to_vec())
        };
        let (none, hidden) = run(&|_| Output::Hidden);
        assert!(none.is_empty(), "no logits asked for");
        assert_eq!(hidden.len(), n * d);
        if n == 40 {
            let reference = Reference {
                spec: &spec,
                w: &w,
                ggml_rounding: true,
            }
            .hidden(&toks);
            let positions: Vec<usize> = (0..n).collect();
            let (max, rms) = compare(&hidden, &reference, d, &positions);
            eprintln!("hidden states vs the reference: max {max:.2e}, rms {rms:.2e}");
            assert!(
                max < TOL_MAX && rms < TOL_RMS,
                "hidden states differ from the reference: max {max:e}, rms {rms:e}"
            );
        }
        let (all_logits, hidden_too) = run(&|_| Output::Logits);
        assert_eq!(
            bits(&hidden_too),
            bits(&hidden),
            "{n}: logits rows' hidden states"
        );
        let kind = |i: usize| match i % 3 {
            0 => Output::None,
            1 => Output::Hidden,
            _ => Output::Logits,
        };
        let (logits, mixed) = run(&kind);
        let want_logits: Vec<f32> = (0..n)
            .filter(|&i| kind(i) == Output::Logits)
            .flat_map(|i| all_logits[i * v..(i + 1) * v].to_vec())
            .collect();
        assert_eq!(
            bits(&logits),
            bits(&want_logits),
            "{n}: logits of the mixed batch"
        );
        let want_hidden: Vec<f32> = (0..n)
            .filter(|&i| kind(i) != Output::None)
            .flat_map(|i| hidden[i * d..(i + 1) * d].to_vec())
            .collect();
        assert_eq!(
            bits(&mixed),
            bits(&want_hidden),
            "{n}: hidden states of the mixed batch"
        );
    }
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let spec = TinySpec::default();
    let (m, _) = open(&spec);
    let mut caches = vec![KvCache::new(&m.config, 16)];
    let mut st = ForwardState::new();
    let e = m
        .forward(&Batch::for_sequence(&[300], 0, true), &mut caches, &mut st)
        .unwrap_err();
    assert!(
        matches!(
            e,
            ModelError::BadToken {
                id: 300,
                vocab: 300
            }
        ),
        "{e}"
    );
    let e = m
        .forward(&Batch::for_sequence(&[5], 16, true), &mut caches, &mut st)
        .unwrap_err();
    assert!(
        matches!(e, ModelError::ContextOverflow { pos: 16, ctx: 16 }),
        "{e}"
    );
    let mut b = Batch::default();
    b.push(5, 0, 1, true);
    let e = m.forward(&b, &mut caches, &mut st).unwrap_err();
    assert!(matches!(e, ModelError::BadBatch(_)), "{e}");
}
